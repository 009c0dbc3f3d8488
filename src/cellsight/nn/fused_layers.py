"""Fused small-layer operations: a hidden layer's LayerNorm/ReLU/dropout tail and the masked
cross-entropy of stacked classifier heads, each one C call forward and one backward.

On CPU a small network's step is dominated by elementwise operations rather than its matrix
products: the tail ``dropout(relu(layer_norm(h)))`` of a hidden layer is about eight torch
operations forward and as many backward, each a pass over ``h`` with its own dispatch and
allocation. :func:`ln_relu_dropout` and :func:`masked_cross_entropy` do each in one loop of
the C kernels of ``csrc/dense.c`` (built and loaded by :mod:`cellsight.nn.native`), wrapped in
``torch.autograd.Function`` objects; the matrix products stay with torch.

Both return what their torch compositions (:func:`ln_relu_dropout_torch`,
:func:`masked_cross_entropy_torch`) return, to float32 rounding, and use them as the fallback:
for inputs that are not float32, contiguous and on the CPU, when native kernels are disabled
(``CELLSIGHT_NATIVE=0``) or cannot be built. The dropout mask is the one of
:func:`cellsight.nn.dropout.fast_dropout`, drawn by the same call
(:func:`~cellsight.nn.dropout.dropout_bits`), so for the same ``torch.manual_seed`` the fused
and torch paths drop the same units. The fused backward passes are not differentiable
themselves (``once_differentiable``): use the torch compositions where second derivatives are
needed.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cellsight.nn import native
from cellsight.nn.dropout import LEVELS, dropout_bits, dropout_threshold, fast_dropout

__all__ = [
    "ln_relu_dropout",
    "ln_relu_dropout_torch",
    "masked_cross_entropy",
    "masked_cross_entropy_torch",
]

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_SIGNATURES = {
    "lrd_forward": (None, [_P, _P, _P, _P, _P, _I64, _I64, _F32, _I32, _F32, _I32]),
    "lrd_backward": (None, [_P, _P, _P, _P, _P, _I64, _I64, _F32, _I32]),
    "ce_forward": (_I64, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64]),
    "ce_backward": (None, [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64]),
}


def _dense() -> ctypes.CDLL | None:
    """The ``dense`` kernel library with its functions' signatures set, or ``None``."""
    return native.library("dense", _SIGNATURES)


# --------------------------------------------------------------------------- hidden-layer tail
def ln_relu_dropout_torch(
    h: torch.Tensor, p: float, training: bool = True, eps: float = 1e-5, layer_norm: bool = True
) -> torch.Tensor:
    """The torch composition that :func:`ln_relu_dropout` fuses:
    ``fast_dropout(relu(layer_norm(h)), p, training)`` (see there for the parameters)."""
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:], eps=eps)
    return fast_dropout(F.relu(h), p, training)


class _LnReluDropout(torch.autograd.Function):
    """``dropout(relu(layer_norm(h)))`` over the last dimension; ``bits`` are the dropout's
    random numbers (``None``: no dropout), ``scale`` the kept units' factor, ``lib`` the
    kernel library."""

    @staticmethod
    def forward(ctx, h, bits, threshold, scale, eps, layer_norm, lib):
        width = h.shape[-1]
        rows = h.numel() // width
        y = torch.empty_like(h)
        xhat = torch.empty_like(h) if layer_norm else None
        rstd = h.new_empty(rows) if layer_norm else None
        lib.lrd_forward(h.data_ptr(), y.data_ptr(), native.ptr(xhat), native.ptr(rstd),
                        native.ptr(bits), rows, width, eps, threshold, scale, int(layer_norm))
        ctx.scale, ctx.layer_norm, ctx.lib = scale, layer_norm, lib
        ctx.save_for_backward(y, xhat, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y, xhat, rstd = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        if grad_y.dtype != torch.float32:
            grad_y = grad_y.float()
        grad_h = torch.empty_like(y)
        width = y.shape[-1]
        ctx.lib.lrd_backward(grad_y.data_ptr(), y.data_ptr(), native.ptr(xhat),
                             native.ptr(rstd), grad_h.data_ptr(), y.numel() // width, width,
                             ctx.scale, int(ctx.layer_norm))
        return grad_h, None, None, None, None, None, None


def ln_relu_dropout(
    h: torch.Tensor, p: float, training: bool = True, eps: float = 1e-5, layer_norm: bool = True
) -> torch.Tensor:
    """``fast_dropout(relu(layer_norm(h)), p, training)`` in one fused pass (forward and
    backward), the normalisation over the last dimension without affine parameters.

    The values equal the torch composition's (:func:`ln_relu_dropout_torch`) to float32
    rounding, and the dropout mask is the same for the same state of torch's generator
    (:func:`cellsight.nn.dropout.fast_dropout`'s draw: the same call, same count).
    Falls back to that composition when ``h`` is not a float32, contiguous CPU tensor, when
    the native kernels are disabled or unavailable (:mod:`cellsight.nn.native`), or when the
    rounded drop probability is 1. The fused backward is not itself differentiable.

    Parameters
    ----------
    h
        Pre-activations, any shape (rows are its last dimension).
    p
        Drop probability in ``[0, 1)``.
    training
        Without it (or with ``p == 0``) there is no dropout and nothing is drawn.
    eps
        LayerNorm's variance epsilon.
    layer_norm
        ``False``: ``dropout(relu(h))``, no normalisation.

    Returns
    -------
    torch.Tensor
        A tensor of ``h``'s shape.
    """
    threshold = dropout_threshold(p, training)
    lib = (_dense() if threshold < LEVELS and h.dim() > 0 and h.numel() > 0
           and native.usable(h) else None)
    if lib is None:
        return ln_relu_dropout_torch(h, p, training, eps, layer_norm)
    bits = None
    scale = 1.0
    if threshold > 0:
        bits = dropout_bits(h.numel(), h.device)
        scale = LEVELS / (LEVELS - threshold)
    if not (torch.is_grad_enabled() and h.requires_grad):
        y = torch.empty_like(h)
        width = h.shape[-1]
        lib.lrd_forward(h.data_ptr(), y.data_ptr(), None, None, native.ptr(bits),
                        h.numel() // width, width, eps, threshold, scale, int(layer_norm))
        return y
    return _LnReluDropout.apply(h, bits, threshold, scale, eps, layer_norm, lib)


# --------------------------------------------------------------------------- cross-entropy
def masked_cross_entropy_torch(
    logits_gnc: torch.Tensor, target_gn: torch.Tensor, weight_gn: torch.Tensor,
    padding_g1c: torch.Tensor,
) -> torch.Tensor:
    """The torch form of :func:`masked_cross_entropy`, given the padding mask ``(heads, 1,
    max classes)`` (``True`` in the columns past each head's classes)."""
    logp_gnc = torch.log_softmax(logits_gnc.masked_fill(padding_g1c, -math.inf), -1)
    nll_gn = logp_gnc.gather(-1, target_gn.unsqueeze(-1)).squeeze(-1)
    return -(nll_gn * weight_gn).sum(-1) / weight_gn.sum(-1).clamp(min=1.0)


def _ce_forward(lib, logits_gnc, target_gn, weight_gn, n_classes_g):
    """The fused forward with kernel library ``lib``: ``(ce_g, lse_gn, denom_g)`` (row
    log-sum-exps and ``max(sum w, 1)`` per head, for the backward)."""
    g, n, c = logits_gnc.shape
    ce_g = logits_gnc.new_empty(g)
    lse_gn = logits_gnc.new_empty(g, n)
    denom_g = logits_gnc.new_empty(g)
    bad = lib.ce_forward(
        logits_gnc.data_ptr(), target_gn.data_ptr(), weight_gn.data_ptr(),
        n_classes_g.data_ptr(), ce_g.data_ptr(), lse_gn.data_ptr(), denom_g.data_ptr(), g, n, c,
    )
    if bad:
        raise ValueError(f"{bad} cross-entropy targets are outside their head's classes.")
    return ce_g, lse_gn, denom_g


class _MaskedCrossEntropy(torch.autograd.Function):
    """Per-head weighted cross-entropy of stacked logits (see :func:`masked_cross_entropy`)."""

    @staticmethod
    def forward(ctx, logits_gnc, target_gn, weight_gn, n_classes_g, lib):
        ce_g, lse_gn, denom_g = _ce_forward(lib, logits_gnc, target_gn, weight_gn, n_classes_g)
        ctx.lib = lib
        ctx.save_for_backward(logits_gnc, target_gn, weight_gn, n_classes_g, lse_gn, denom_g)
        return ce_g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g):
        logits_gnc, target_gn, weight_gn, n_classes_g, lse_gn, denom_g = ctx.saved_tensors
        grad_g = grad_g.contiguous()
        if grad_g.dtype != torch.float32:
            grad_g = grad_g.float()
        d_logits = torch.empty_like(logits_gnc)
        g, n, c = logits_gnc.shape
        ctx.lib.ce_backward(
            logits_gnc.data_ptr(), lse_gn.data_ptr(), target_gn.data_ptr(),
            weight_gn.data_ptr(), denom_g.data_ptr(), grad_g.data_ptr(), n_classes_g.data_ptr(),
            d_logits.data_ptr(), g, n, c,
        )
        return d_logits, None, None, None, None


def masked_cross_entropy(
    logits_gnc: torch.Tensor, target_gn: torch.Tensor, weight_gn: torch.Tensor,
    n_classes_g: torch.Tensor, padding_g1c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean cross-entropy of each of ``G`` stacked classifier heads, fused.

    Head ``g``'s value is ``-sum_n w[g, n] log_softmax(logits[g, n, :C_g])[target[g, n]] /
    max(sum_n w[g, n], 1)``, where the columns from ``C_g = n_classes_g[g]`` on are padding
    (ignored, zero gradient): with weights 1 it is ``F.cross_entropy`` per head, weights 0 drop
    cells, and a head whose weights are all 0 gives 0 (gradient 0). One C call forward and one
    backward; falls back to :func:`masked_cross_entropy_torch` (same values to float32
    rounding) unless the logits and weights are float32 and, with the targets and
    ``n_classes_g``, contiguous CPU tensors, the weights need no gradient and native kernels
    are available. The fused backward is not itself differentiable.

    Parameters
    ----------
    logits_gnc
        ``(heads, cells, max classes)`` logits.
    target_gn
        ``(heads, cells)`` int64 class codes, each below its head's number of classes (the
        fused path raises ``ValueError`` otherwise).
    weight_gn
        ``(heads, cells)`` cell weights.
    n_classes_g
        ``(heads,)`` int64 number of classes of each head (a CPU tensor).
    padding_g1c
        The padding mask ``(heads, 1, max classes)`` for the fallback (built from
        ``n_classes_g`` when not given).

    Returns
    -------
    torch.Tensor
        ``(heads,)`` cross-entropies.
    """
    g, n, c = logits_gnc.shape
    if (target_gn.dtype == torch.int64 and target_gn.device.type == "cpu"
            and target_gn.is_contiguous() and target_gn.shape == (g, n)
            and weight_gn.shape == (g, n) and not weight_gn.requires_grad
            and n_classes_g.dtype == torch.int64 and n_classes_g.device.type == "cpu"
            and n_classes_g.is_contiguous() and n_classes_g.shape == (g,)
            and native.usable(logits_gnc, weight_gn)):
        lib = _dense()
        if lib is not None and torch.is_grad_enabled() and logits_gnc.requires_grad:
            return _MaskedCrossEntropy.apply(logits_gnc, target_gn, weight_gn, n_classes_g, lib)
        if lib is not None:
            return _ce_forward(lib, logits_gnc, target_gn, weight_gn, n_classes_g)[0]
    if padding_g1c is None:
        cols = torch.arange(c, device=logits_gnc.device)
        padding_g1c = (cols[None, :] >= n_classes_g.to(logits_gnc.device)[:, None])[:, None, :]
    return masked_cross_entropy_torch(logits_gnc, target_gn, weight_gn, padding_g1c)

