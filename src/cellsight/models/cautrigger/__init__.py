"""CauTrigger: causal trigger discovery with a dual (causal / spurious) VAE, 1 and 2 layers."""

from cellsight.models.cautrigger.hierarchy import HierarchyResult, fit_hierarchy
from cellsight.models.cautrigger.model import CauTrigger1L, CauTrigger2L
from cellsight.models.cautrigger.module import CauTriggerModule

__all__ = ["CauTrigger1L", "CauTrigger2L", "CauTriggerModule", "HierarchyResult",
           "fit_hierarchy"]
