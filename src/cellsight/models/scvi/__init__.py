"""scVI: the module (maths) and the user-facing model."""

from cellsight.models.scvi.model import SCVI
from cellsight.models.scvi.module import SingleCellVariationalInference

__all__ = ["SCVI", "SingleCellVariationalInference"]
