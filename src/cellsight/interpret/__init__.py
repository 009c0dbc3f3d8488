"""The one interpretation engine: attributions, rankings and calibrated significance.

- :func:`attribute`: attributions of any torch callable's output to an input tensor (captum's
  IG, GradientShap, saliency, input x gradient, DeepLIFT; shap's Deep/Gradient explainers),
  batched over cells x targets x integration steps.
- :func:`rank_features`: tidy per-feature (and per-group) summaries and ranks.
- :func:`sign_test`, :func:`permutation_test`, :func:`fdr_bh`: significance, with the null
  each test assumes documented in :mod:`cellsight.interpret.significance`.
- :mod:`~cellsight.interpret.targets`: what is explained (class probabilities, latent means,
  normalised expression, losses of scvi-tools-contract modules).
- :class:`InterpretMixin`: the model-level methods (``get_feature_attributions`` ...).
"""

from cellsight.interpret import batching, targets
from cellsight.interpret.attribute import attribute
from cellsight.interpret.methods import METHODS
from cellsight.interpret.mixin import InterpretMixin
from cellsight.interpret.rank import rank_features
from cellsight.interpret.significance import fdr_bh, feature_weights, permutation_test, sign_test

__all__ = [
    "METHODS",
    "InterpretMixin",
    "attribute",
    "batching",
    "fdr_bh",
    "feature_weights",
    "permutation_test",
    "rank_features",
    "sign_test",
    "targets",
]
