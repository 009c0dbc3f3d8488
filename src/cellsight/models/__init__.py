"""User-facing models (named as in the seeds) and their modules."""

from cellsight.models.cautrigger import CauTrigger1L, CauTrigger2L
from cellsight.models.fadvi import FADVI
from cellsight.models.scvi import SCVI, SingleCellVariationalInference

__all__ = ["CauTrigger1L", "CauTrigger2L", "FADVI", "SCVI", "SingleCellVariationalInference"]
