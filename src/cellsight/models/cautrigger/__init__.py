"""CauTrigger: causal trigger discovery with a dual (causal / spurious) VAE, 1 and 2 layers."""

from cellsight.models.cautrigger.explain import ensemble_up_feature_weights
from cellsight.models.cautrigger.hierarchy import HierarchyResult, fit_hierarchy
from cellsight.models.cautrigger.model import CauTrigger1L, CauTrigger2L
from cellsight.models.cautrigger.module import CauTriggerModule

__all__ = ["CauTrigger1L", "CauTrigger2L", "CauTriggerModule", "HierarchyResult",
           "ensemble_up_feature_weights", "fit_hierarchy"]
