"""CauTrigger's outputs as targets of the shared interpretation engine.

Each target is ``f(module, tensors)`` of the raw upstream counts ``tensors[X_KEY]`` (the
module standardises them itself, as in training), so ``get_feature_attributions``,
``rank_features`` and ``get_feature_significance`` explain a CauTrigger model with every
engine method (IG, GradientShap, gradients, input x gradient, DeepLIFT, SHAP) and test, as
they do SCVI and FADVI. CauTrigger's own scores (``get_up_feature_weights``,
``get_up_significance``) explain the standardised input instead, as the seed does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS

__all__ = ["CAUTRIGGER_TARGETS", "DOWNSTREAM_TARGETS"]


def _xt(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    return module.transform(tensors[REGISTRY_KEYS.X_KEY])


def state_probability(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Causal-path probability of each state (cells x states)."""
    return torch.softmax(module.causal_logits(_xt(module, tensors)), -1)


def state_logit(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Log-odds of each state on the causal path, ``log p - log(1 - p)`` (cells x states)."""
    logp = F.log_softmax(module.causal_logits(_xt(module, tensors)), -1)
    return logp - torch.log(-torch.expm1(logp).clamp_max(-1e-12))


def latent(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Posterior means ``[z_c, z_s]`` (cells x latent)."""
    return module.latent_from_input(_xt(module, tensors))


def downstream(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Decoded standardised downstream features on the causal path (2L; cells x downstream)."""
    return module.down_from_input(_xt(module, tensors), causal=True)


CAUTRIGGER_TARGETS = {
    "state_probability": state_probability,
    "state_logit": state_logit,
    "latent": latent,
}
DOWNSTREAM_TARGETS = {"downstream": downstream}
