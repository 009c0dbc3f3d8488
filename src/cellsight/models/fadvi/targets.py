"""Attribution targets of FADVI's classifier heads, for :mod:`cellsight.interpret`.

Each is ``f(module, tensors) -> (cells, classes)`` on raw counts: the module's own log1p and
library size run inside, and the latents are posterior means, so the explained function is
deterministic (as path-integral methods need).
"""

from __future__ import annotations

import torch

__all__ = ["FADVI_TARGETS", "head_logits"]


def head_logits(module: torch.nn.Module, tensors: dict, which: str) -> torch.Tensor:
    """Logits of the ``"label"`` or ``"batch"`` head at the posterior mean latents."""
    key = "z_b" if which == "batch" else "z_l"
    return module.class_logits({key: module.encode_mean(tensors, key[-1])}, which)


def _label_logit(module, tensors):
    return head_logits(module, tensors, "label")


def _label_probability(module, tensors):
    return torch.softmax(head_logits(module, tensors, "label"), dim=-1)


def _batch_logit(module, tensors):
    return head_logits(module, tensors, "batch")


def _batch_probability(module, tensors):
    return torch.softmax(head_logits(module, tensors, "batch"), dim=-1)


FADVI_TARGETS = {
    "label_logit": _label_logit,
    "label_probability": _label_probability,
    "batch_logit": _batch_logit,
    "batch_probability": _batch_probability,
}
