"""User-facing models (named as in the seeds) and their modules."""

from cellsight.models.fadvi import FADVI
from cellsight.models.scvi import SCVI, SingleCellVariationalInference

__all__ = ["FADVI", "SCVI", "SingleCellVariationalInference"]
