"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, ``-alpha * grad`` backward.

Placed between a representation and an adversarial classifier, it lets one backward pass train
the classifier to predict a nuisance variable while pushing the representation to hide it: the
classifier's parameters receive the ordinary gradient of its loss, everything upstream of the
layer receives the gradient scaled by ``-alpha``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GradientReversal", "grad_reverse"]


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad_output, None


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``x`` unchanged; its gradient multiplied by ``-alpha`` on the way back.

    Parameters
    ----------
    x
        Any tensor.
    alpha
        Strength of the reversal (``0``: upstream receives no gradient from downstream, as
        ``x.detach()``; must be >= 0).
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0 (it scales the reversed gradient).")
    return _ReverseGrad.apply(x, float(alpha))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` with a settable ``alpha`` (e.g. for a schedule).

    Parameters
    ----------
    alpha
        Strength of the reversal (>= 0).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0 (it scales the reversed gradient).")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
