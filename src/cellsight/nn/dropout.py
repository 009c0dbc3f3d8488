"""Dropout with a cheaper random mask than ``torch.nn.functional.dropout`` (CPU), shared by the
torch path (:func:`fast_dropout`, :class:`FastDropout`) and the fused kernels
(:mod:`cellsight.nn.fused_layers`, :mod:`cellsight.models.fadvi.fast_step`), which draw the
same random numbers with :func:`dropout_bits` and so drop the same units for the same seed.

torch's CPU dropout draws one 32-bit random number per unit (about 8 ns each, a tenth of a
FADVI step); here four 15-bit uniforms are cut out of each 64-bit number of torch's generator.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LEVELS", "FastDropout", "dropout_bits", "dropout_threshold", "fast_dropout"]

LEVELS = 1 << 15  # the resolution of the uniforms (15 bits)


def dropout_threshold(p: float, training: bool = True) -> int:
    """The threshold on the 15-bit uniforms for drop probability ``p``: a unit is kept when its
    uniform is ``>= round(p * 2**15)``; 0 means no dropout (nothing is drawn)."""
    if not training or p <= 0.0:
        return 0
    if not p < 1.0:
        raise ValueError(f"dropout p={p} must be < 1.")
    return round(p * LEVELS)


def dropout_bits(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random numbers of ``n`` units: ``(n + 3) // 4`` 64-bit integers of torch's generator
    viewed as ``int16`` (four uniforms each once the top bit is cleared; seeded by
    ``torch.manual_seed`` like any torch randomness)."""
    return torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_().view(
        torch.int16)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with a cheaper random mask than ``torch.nn.functional.dropout``.

    Each unit is kept when a 15-bit uniform integer (:func:`dropout_bits`) is
    ``>= round(p * 2**15)``, so the drop probability is ``p`` rounded to a multiple of
    ``2**-15`` (0.1 becomes 0.100006); kept units are scaled by the inverse of the exact keep
    probability, so ``E[output] = x``.

    Parameters
    ----------
    x
        Any tensor.
    p
        Drop probability in ``[0, 1)``.
    training
        Without it (or with ``p == 0``) ``x`` is returned unchanged.
    """
    threshold = dropout_threshold(p, training)
    if threshold == 0:
        return x
    n = x.numel()
    u_n = dropout_bits(n, x.device)[:n] & (LEVELS - 1)
    if threshold < LEVELS:
        # 1 where u >= threshold, else 0, by the sign of u - threshold (no comparison and no
        # bool-to-float conversion, the two slow steps on CPU): 30% cheaper, the same mask
        keep = ((u_n - threshold) >> 15).add_(1).view(x.shape).to(x.dtype)
    else:
        keep = (u_n >= threshold).view(x.shape).to(x.dtype)
    return x * keep.mul_(LEVELS / (LEVELS - threshold))


class FastDropout(nn.Module):
    """Module form of :func:`fast_dropout` (a drop-in for ``nn.Dropout``)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
