"""The ZINB log-likelihood and its gradients in one C pass (``csrc/zinb.c``), the training
path of :func:`cellsight.nn.likelihoods.zinb_log_likelihood_n` when native kernels are available
(:mod:`cellsight.nn.native`).

The formulas are those of :class:`cellsight.nn.zinb_grad.ZINBLogLikelihood` (scvi-tools'
parameterisation and ``eps``). What differs is how they are evaluated: the forward computes,
entry by entry, the log-likelihood and its three derivatives (with respect to ``mu``,
``zi_logits`` and ``theta``) in one loop over the ``(cells, genes)`` matrix, in place of about
forty torch operations (each a pass over memory) for the forward and backward of the torch
version; the backward multiplies them by the upstream gradient of each cell (and sums over
cells for a per-gene ``theta``). The gamma-function terms at a small integer count ``x <= 32``
are finite sums (``lgamma(x + theta) - lgamma(theta) = sum_{j<x} log(theta + j)``, and the
digamma difference ``sum_{j<x} 1 / (theta + j)``) evaluated in double precision, which is more
accurate than the difference of two float32 ``lgamma`` values. Values agree with scvi-tools'
``ZeroInflatedNegativeBinomial.log_prob`` and gradients with autograd's to float32 rounding
(tests).

Used when the counts need no gradient, ``theta`` is ``(g,)`` or ``(n, g)``, and every input is a
float32, contiguous CPU tensor; :func:`zinb_native_usable` says so.
"""

from __future__ import annotations

import ctypes

import torch

from cellsight.nn import native

__all__ = ["NativeZINBLogLikelihood", "zinb_native_usable"]

_I64, _P = ctypes.c_int64, ctypes.c_void_p


_SIGNATURES = {
    "zinb_forward": (ctypes.c_int, [_I64, _I64, _P, _P, _P, _I64, _P, _P, _P, _P, _P]),
    "zinb_backward": (None, [_I64, _I64, _P, _P, _P, _P, _I64, _P, _P, _P]),
}


def _kernels():
    return native.library("zinb", _SIGNATURES)


def zinb_native_usable(x_ng, mu_ng, theta, zi_logits_ng) -> bool:
    """Whether :class:`NativeZINBLogLikelihood` takes these inputs (and its kernels built)."""
    if x_ng.requires_grad or x_ng.dim() != 2 or x_ng.shape[0] == 0:
        return False
    if not (mu_ng.shape == x_ng.shape and zi_logits_ng.shape == x_ng.shape
            and (theta.shape == x_ng.shape or theta.shape == x_ng.shape[-1:])):
        return False
    return native.usable(x_ng, mu_ng, theta, zi_logits_ng) and _kernels() is not None


class NativeZINBLogLikelihood(torch.autograd.Function):
    """``sum_g log ZINB(x | mu, theta, zi_logits)`` per cell, forward and derivatives in one
    C pass (see the module docstring); ``apply(x_ng, mu_ng, theta, zi_logits_ng)``."""

    @staticmethod
    def forward(ctx, x_ng, mu_ng, theta, zi_ng):
        n, g = x_ng.shape
        ll_n = x_ng.new_empty(n)
        dmu, dzi, dtheta = (torch.empty_like(mu_ng) for _ in range(3))
        per_gene = int(theta.dim() == 1)
        status = _kernels().zinb_forward(
            n, g, x_ng.data_ptr(), mu_ng.data_ptr(), theta.data_ptr(), per_gene,
            zi_ng.data_ptr(), ll_n.data_ptr(), dmu.data_ptr(), dzi.data_ptr(), dtheta.data_ptr())
        if status != 0:
            raise MemoryError(f"the ZINB kernel could not allocate its scratch memory (g={g}).")
        ctx.per_gene = per_gene
        ctx.save_for_backward(dmu, dzi, dtheta)
        return ll_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_n):
        dmu, dzi, dtheta = ctx.saved_tensors
        need_mu, need_theta, need_zi = ctx.needs_input_grad[1:4]
        n, g = dmu.shape
        grad_n = grad_n.contiguous().float()
        gmu = torch.empty_like(dmu) if need_mu else None
        gzi = torch.empty_like(dzi) if need_zi else None
        gtheta = None
        if need_theta:
            gtheta = dmu.new_empty(g) if ctx.per_gene else torch.empty_like(dtheta)
        _kernels().zinb_backward(n, g, grad_n.data_ptr(), dmu.data_ptr(), dzi.data_ptr(),
                                 dtheta.data_ptr(), ctx.per_gene, native.ptr(gmu),
                                 native.ptr(gzi), native.ptr(gtheta))
        return None, gmu, gtheta, gzi
