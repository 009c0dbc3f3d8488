"""FADVI's encoder helpers: the three encoders in one pass, Gaussian parameters, fast dropout.

In the one-pass form (:func:`encode_fused`, FADVI's autograd training path) each hidden layer's
``LayerNorm -> ReLU -> Dropout`` tail is one fused C kernel forward and one backward
(:func:`cellsight.nn.fused_layers.ln_relu_dropout`: the same values, and the same dropout mask
for the same torch generator state, as the modules) when the layer holds exactly those
modules; other layers, non-float32 inputs and ``CELLSIGHT_NATIVE=0`` run the modules' torch
operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi.nn import Encoder
from torch import nn

from cellsight.nn.dropout import FastDropout
from cellsight.nn.fused_layers import ln_relu_dropout

__all__ = ["encode_fused", "gaussian_params", "layer_parts", "with_fast_dropout"]


def encode_fused(encs: tuple[Encoder, Encoder, Encoder],
                 x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``loc`` and ``scale`` of ``q(z_b, z_l, z_r | x)`` (concatenated), the three encoders
    run together from their own parameters (``encs``: the ``z_b``, ``z_l``, ``z_r`` encoders).

    The first layers (same input) are three matrix products whose outputs are stacked
    (stacking the three weight matrices instead copies 1.2 MB a step: 2.4 against 2.2 ms
    for the layer's forward and backward measured alone, within noise in a whole step),
    the deeper hidden layers one batched product, the LayerNorm (no affine
    parameters, per encoder and cell), ReLU and dropout one call per layer for all three,
    and the variance activation one call for the three latents: the same function as three
    ``scvi.nn.Encoder`` calls with about a third of the kernel launches (the encoders'
    modules and state dict are unchanged; ``FactorDisentanglementVAE.encode_mean`` runs one encoder
    alone). A layer whose tail is ``[LayerNorm without affine] -> ReLU -> [FastDropout]`` (no
    BatchNorm) runs it as one fused call (:func:`~cellsight.nn.fused_layers.ln_relu_dropout`).
    """
    stacks = [enc.encoder.fc_layers for enc in encs]
    h3_gnh = None
    for i in range(len(stacks[0])):
        layers = [stack[i] for stack in stacks]
        lin = [layer[0] for layer in layers]
        if i == 0:
            h3_gnh = torch.stack([F.linear(x_in, m.weight, m.bias) for m in lin])
        else:
            w_ghh = torch.stack([m.weight for m in lin]).transpose(1, 2)
            b_g1h = torch.stack([m.bias for m in lin]).unsqueeze(1)
            h3_gnh = torch.baddbmm(b_g1h, h3_gnh, w_ghh)
        tail = _fusable_tail(layers[0])
        if tail is not None:
            h3_gnh = ln_relu_dropout(h3_gnh, *tail)
            continue
        norm = layers[0][2]
        if norm is not None:
            h3_gnh = F.layer_norm(h3_gnh, norm.normalized_shape, eps=norm.eps)
        h3_gnh = layers[0][3](h3_gnh)
        if layers[0][4] is not None:
            h3_gnh = layers[0][4](h3_gnh)
    loc_nk = torch.cat([enc.mean_encoder(h3_gnh[g]) for g, enc in enumerate(encs)], -1)
    act, eps = encs[0].var_activation, encs[0].var_eps
    if all(enc.var_activation is act and enc.var_eps == eps for enc in encs):
        v_nk = torch.cat([enc.var_encoder(h3_gnh[g]) for g, enc in enumerate(encs)], -1)
        return loc_nk, (act(v_nk) + eps).sqrt()
    scales = [gaussian_params(enc, h3_gnh[g])[1] for g, enc in enumerate(encs)]
    return loc_nk, torch.cat(scales, -1)


def layer_parts(layer: nn.Sequential) -> tuple[nn.Linear, float | None, float] | None:
    """``(linear, LayerNorm eps or None, dropout p)`` of an ``scvi.nn.FCLayers`` layer of the
    form ``Linear, [LayerNorm without affine parameters over its outputs], ReLU, [dropout]``
    (no BatchNorm; the dropout a :class:`~cellsight.nn.dropout.FastDropout`, whose mask the
    fused kernels reproduce, or a torch one of rate 0); ``None`` for any other form. The fused
    paths (:func:`encode_fused`, :mod:`cellsight.models.fadvi.fast_step`) cover these."""
    lin, batch_norm, norm, act, drop = (list(layer) + [None] * 5)[:5]
    if (not isinstance(lin, nn.Linear) or batch_norm is not None or type(act) is not nn.ReLU
            or len(layer) != 5):
        return None
    if norm is not None and (type(norm) is not nn.LayerNorm or norm.elementwise_affine
                             or tuple(norm.normalized_shape) != (lin.out_features,)):
        return None
    if drop is not None and not isinstance(drop, FastDropout) and not (
            isinstance(drop, nn.Dropout) and drop.p == 0):
        return None
    return lin, (None if norm is None else float(norm.eps)), (0.0 if drop is None else drop.p)


def _fusable_tail(layer: nn.Sequential) -> tuple[float, bool, float, bool] | None:
    """``(p, training, eps, layer_norm)`` for :func:`~cellsight.nn.fused_layers.ln_relu_dropout`
    of a layer :func:`layer_parts` covers, else ``None``."""
    parts = layer_parts(layer)
    if parts is None:
        return None
    _, eps, p = parts
    drop = layer[4]
    training = bool(drop is not None and drop.training)
    return p, training, 1e-5 if eps is None else eps, eps is not None


def gaussian_params(enc: Encoder, h_nh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of an ``scvi.nn.Encoder``'s Normal from its last hidden layer."""
    loc = enc.mean_encoder(h_nh)
    return loc, (enc.var_activation(enc.var_encoder(h_nh)) + enc.var_eps).sqrt()


def with_fast_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with each ``nn.Dropout`` replaced by :class:`~cellsight.models.fadvi.heads.
    FastDropout` of the same rate (no parameters change; see that module for why)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Dropout):
            setattr(module, name, FastDropout(child.p))
        else:
            with_fast_dropout(child)
    return module

