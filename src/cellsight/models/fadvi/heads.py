"""FADVI's classifier heads, evaluated together in one batched pass.

Each head is the network of ``scvi.module.Classifier``: ``n_layers`` hidden layers of
``Linear -> BatchNorm1d (momentum 0.01, eps 1e-3) -> [LayerNorm] -> ReLU -> Dropout`` and a
``Linear`` output of logits. The heads share nothing: head ``g``'s weights are slice ``g`` of
stacked parameters, inputs narrower than the widest are zero-padded (the padded weight rows
then get zero gradients and stay zero) and outputs narrower than the widest are sliced, so the
result equals that of independent classifiers; batched matrix products and one normalisation
call per layer replace the per-head calls, which dominate a small model's step on CPU.

Dropout here (and, swapped in by the module, in FADVI's encoders) is
:func:`cellsight.nn.dropout.fast_dropout` (re-exported here), which cuts four 15-bit uniforms
out of each random 64-bit word (a counter-based generator seeded from torch's).

FADVI's default layout trains through :mod:`cellsight.models.fadvi.fast_step`, which runs the
heads' forward and backward as C passes itself; the paths below serve the other layouts,
``fast_step=False`` and inference.

Fused path. Without BatchNorm, a hidden layer's ``[LayerNorm] -> ReLU -> Dropout`` tail runs
as one fused C kernel forward and one backward (:func:`cellsight.nn.fused_layers.
ln_relu_dropout`, the same values and, for the same torch generator state, the same dropout
mask), and :meth:`ParallelClassifiers.cross_entropy_g` as one more
(:func:`cellsight.nn.fused_layers.masked_cross_entropy`), where about sixteen torch operations
per layer ran before. The fused tail is used in training mode and in gradient-free evaluation;
evaluation with gradients (attributions) keeps the torch operations. For float32 CPU inputs
only; otherwise, or with ``CELLSIGHT_NATIVE=0``, the torch operations run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellsight.nn.dropout import FastDropout, fast_dropout
from cellsight.nn.fused_layers import ln_relu_dropout, masked_cross_entropy

__all__ = ["ParallelClassifiers", "FastDropout", "fast_dropout"]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (broadcast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class ParallelClassifiers(nn.Module):
    """``G`` independent MLP classifiers with one batched forward.

    Parameters
    ----------
    specs
        ``(n_input, n_classes)`` of each head.
    n_hidden, n_layers, dropout_rate
        Width, number of hidden layers and dropout of every head.
    use_batch_norm, use_layer_norm
        Normalisation in the hidden layers (as ``scvi.nn.FCLayers``).
    """

    def __init__(
        self,
        specs: Sequence[tuple[int, int]],
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if not specs or n_layers < 1:
            raise ValueError("ParallelClassifiers needs at least one head and one hidden layer.")
        self.n_inputs = [int(k) for k, _ in specs]
        self.n_classes = [int(c) for _, c in specs]
        g, k_max, c_max, h = len(specs), max(self.n_inputs), max(self.n_classes), int(n_hidden)
        self.n_heads, self.n_hidden, self.dropout_rate = g, h, float(dropout_rate)
        fan_in = [list(self.n_inputs)] + [[h] * g] * (n_layers - 1) + [[h] * g]
        shapes = [(k_max, h)] + [(h, h)] * (n_layers - 1) + [(h, c_max)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fans, (n_in, n_out) in zip(fan_in, shapes):
            w = torch.zeros(g, n_in, n_out)
            b = torch.zeros(g, 1, n_out)
            for i, fan in enumerate(fans):  # nn.Linear's initialisation, per head
                bound = 1.0 / math.sqrt(fan)
                w[i, :fan].uniform_(-bound, bound)
                b[i].uniform_(-bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(g * h, momentum=0.01, eps=0.001) if use_batch_norm else nn.Identity()
            for _ in range(n_layers)
        )
        self.layer_norms = nn.ModuleList(
            nn.LayerNorm(h, elementwise_affine=False) if use_layer_norm else nn.Identity()
            for _ in range(n_layers)
        )
        pad_gc = torch.arange(c_max)[None, :] >= torch.tensor(self.n_classes)[:, None]
        self.register_buffer("padding_g1c_mask", pad_gc[:, None, :], persistent=False)
        self.n_classes_g = torch.tensor(self.n_classes, dtype=torch.int64)  # CPU, for the kernel

    def _tail(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``Dropout(ReLU([LayerNorm](h)))`` of hidden layer ``layer`` (heads without
        BatchNorm): fused in training mode and without gradients, torch operations in
        evaluation with gradients (attributions)."""
        ln = self.layer_norms[layer]
        if self.training or not torch.is_grad_enabled():
            is_ln = isinstance(ln, nn.LayerNorm)
            return ln_relu_dropout(h, self.dropout_rate, self.training,
                                   eps=ln.eps if is_ln else 1e-5, layer_norm=is_ln)
        return fast_dropout(F.relu(ln(h)), self.dropout_rate, self.training)

    def _hidden(self, h_gnh: torch.Tensor, layer: int) -> torch.Tensor:
        g, n, k = h_gnh.shape
        norm = self.norms[layer]
        if isinstance(norm, nn.BatchNorm1d):
            h_gnh = norm(h_gnh.transpose(0, 1).reshape(n, g * k)).reshape(n, g, k).transpose(0, 1)
            h_gnh = F.relu(self.layer_norms[layer](h_gnh))
            return fast_dropout(h_gnh, self.dropout_rate, self.training)
        return self._tail(h_gnh, layer)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of every head: ``inputs[g]`` is ``(n, n_inputs[g])``, all with the same ``n``."""
        out = self.logits_gnc(inputs)
        return [out[g, :, :c] for g, c in enumerate(self.n_classes)]

    def logits_gnc(
        self, inputs: Sequence[torch.Tensor], grad_scale_g: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stacked logits ``(heads, n, max classes)``; columns past a head's classes are padding
        (:meth:`cross_entropy_g` ignores them).

        ``grad_scale_g`` multiplies the gradient reaching head ``g``'s input by its entry (e.g.
        ``-alpha``: gradient reversal of per-head strength), in one operation for all heads.
        """
        if len(inputs) != self.n_heads:
            raise ValueError(f"{len(inputs)} inputs for {self.n_heads} heads.")
        k_max = self.weights[0].shape[1]
        x_gnk = torch.stack(
            [x if x.shape[-1] == k_max else F.pad(x, (0, k_max - x.shape[-1])) for x in inputs]
        )
        if grad_scale_g is not None:
            x_gnk = _ScaleGradient.apply(x_gnk, grad_scale_g.reshape(-1, 1, 1))
        h = x_gnk
        for layer in range(len(self.norms)):
            h = self._hidden(torch.baddbmm(self.biases[layer], h, self.weights[layer]), layer)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1])

    def cross_entropy_g(
        self, logits_gnc: torch.Tensor, target_gn: torch.Tensor, weight_gn: torch.Tensor
    ) -> torch.Tensor:
        """Weighted mean cross-entropy of each head, ``(heads,)``: ``sum_n w ce / max(sum_n w,
        1)``, one log-softmax for all heads (padding columns masked out). With weights 1 it is
        ``F.cross_entropy`` per head; weights 0 drop cells (unlabelled ones) without host
        synchronisation, and a head whose weights are all 0 gives 0, still in the graph. One
        fused kernel forward and backward on float32 CPU tensors
        (:func:`cellsight.nn.fused_layers.masked_cross_entropy`), else torch operations."""
        return masked_cross_entropy(logits_gnc, target_gn, weight_gn, self.n_classes_g,
                                    self.padding_g1c_mask)

    def forward_one(self, index: int, x_nk: torch.Tensor) -> torch.Tensor:
        """Logits of head ``index`` alone (its parameter and normalisation slices)."""
        h = x_nk
        cols = slice(index * self.n_hidden, (index + 1) * self.n_hidden)
        for layer, norm in enumerate(self.norms):
            w = self.weights[layer][index]
            h = h @ w[: h.shape[-1]] + self.biases[layer][index]
            if isinstance(norm, nn.BatchNorm1d):
                h = F.batch_norm(
                    h, norm.running_mean[cols], norm.running_var[cols], norm.weight[cols],
                    norm.bias[cols], self.training and h.shape[0] > 1, norm.momentum, norm.eps,
                )
                h = fast_dropout(F.relu(self.layer_norms[layer](h)), self.dropout_rate,
                                 self.training)
            else:
                h = self._tail(h, layer)
        out = h @ self.weights[-1][index] + self.biases[-1][index]
        return out[:, : self.n_classes[index]]
