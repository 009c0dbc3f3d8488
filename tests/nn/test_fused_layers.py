"""The fused C kernels of :mod:`cellsight.nn.fused_layers` equal their torch compositions:
values, gradients and dropout masks, the fallbacks, and FADVI's layers that use them."""

from __future__ import annotations

import pytest
import torch
from scvi.nn import Encoder

from cellsight.models.fadvi.encoders import encode_fused, with_fast_dropout
from cellsight.models.fadvi.heads import ParallelClassifiers
from cellsight.nn import native
from cellsight.nn.fused_layers import (
    ln_relu_dropout,
    ln_relu_dropout_torch,
    masked_cross_entropy,
    masked_cross_entropy_torch,
)

FUSED_LRD = "_LnReluDropoutBackward"
FUSED_CE = "_MaskedCrossEntropyBackward"

needs_native = pytest.mark.skipif(
    native.library("dense") is None, reason="the native kernels cannot be built here"
)


def _grad_fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


def _graph_names(t: torch.Tensor) -> set[str]:
    """Names of every backward node of ``t``'s graph."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def _run(fn, x: torch.Tensor, grad: torch.Tensor, seed: int, **kw):
    """``fn(x, **kw)`` under ``torch.manual_seed(seed)``; output, input gradient, the next
    random number (whether the same count of numbers was drawn) and the grad_fn's name."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x, **kw)
    after = torch.rand(1)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), gx, after, _grad_fn_name(y)


@needs_native
@pytest.mark.parametrize("shape", [(3, 128, 128), (2, 5, 7), (33,), (1, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_ln_relu_dropout_equals_the_torch_composition(shape, p, training, layer_norm):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 3 + 0.5
    if len(shape) == 3:
        # constant rows: LayerNorm gives exact zeros (not rounding residues of x*rstd-mean*rstd)
        x[0, :5] = torch.tensor([[4.0], [-1e3], [1e3], [-55.5], [0.37]])
    grad = torch.randn(shape, generator=gen)
    kw = dict(p=p, training=training, eps=1e-5, layer_norm=layer_norm)
    y, gx, after, name = _run(ln_relu_dropout, x, grad, seed=7, **kw)
    y_ref, gx_ref, after_ref, _ = _run(ln_relu_dropout_torch, x, grad, seed=7, **kw)
    assert name == FUSED_LRD  # the kernel ran (the comparison is not torch against torch)
    assert torch.equal(y == 0, y_ref == 0)  # the same dropout and ReLU zeros
    assert torch.equal(after, after_ref)  # the same numbers drawn from the generator
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=2e-6)


@needs_native
def test_ln_relu_dropout_drops_units_and_keeps_the_mean():
    x = torch.randn(64, 512).abs() + 1.0  # all positive: ReLU keeps every unit
    torch.manual_seed(3)
    y = ln_relu_dropout(x, 0.25, True, layer_norm=False)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)


@needs_native
def test_ln_relu_dropout_without_gradient_equals_the_graph_path():
    x = torch.randn(4, 9, 32)
    torch.manual_seed(5)
    y_free = ln_relu_dropout(x, 0.3, True)  # x needs no gradient: forward kernel only
    torch.manual_seed(5)
    y_graph = ln_relu_dropout(x.clone().requires_grad_(), 0.3, True)
    torch.manual_seed(5)
    with torch.no_grad():
        y_no_grad = ln_relu_dropout(x.clone().requires_grad_(), 0.3, True)
    assert y_free.grad_fn is None and y_no_grad.grad_fn is None
    assert torch.equal(y_free, y_graph.detach()) and torch.equal(y_free, y_no_grad)


def test_ln_relu_dropout_rejects_p_one_like_fast_dropout():
    with pytest.raises(ValueError, match="must be < 1"):
        ln_relu_dropout(torch.randn(3, 4), 1.0, True)


@pytest.mark.parametrize("case", ["float64", "non-contiguous", "disabled"])
def test_ln_relu_dropout_falls_back_to_torch(case, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=gen)
    grad = torch.randn(6, 16, generator=gen)
    if case == "float64":
        x, grad = x.double(), grad.double()
    elif case == "non-contiguous":
        x, grad = x.t(), grad.t()
    else:
        monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    y, gx, _, name = _run(ln_relu_dropout, x, grad, seed=11, p=0.2)
    y_ref, gx_ref, _, name_ref = _run(ln_relu_dropout_torch, x, grad, seed=11, p=0.2)
    assert name != FUSED_LRD and name == name_ref
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def _ce_inputs():
    gen = torch.Generator().manual_seed(4)
    n_classes = [10, 3, 7, 2]
    g, n, c = len(n_classes), 128, max(n_classes)
    logits = torch.randn(g, n, c, generator=gen) * 4
    logits[1, :, 3:] = 1e4  # padding columns must not count
    target = torch.stack([torch.randint(0, k, (n,), generator=gen) for k in n_classes])
    weight = torch.rand(g, n, generator=gen) + 0.5
    weight[0, ::3] = 0.0  # unlabelled cells
    weight[2] = 0.0  # a head without labelled cells
    n_classes_g = torch.tensor(n_classes)
    padding = (torch.arange(c)[None, :] >= n_classes_g[:, None])[:, None, :]
    return logits, target, weight, n_classes_g, padding


@needs_native
def test_masked_cross_entropy_equals_the_torch_version():
    logits, target, weight, n_classes_g, padding = _ce_inputs()
    grad_g = torch.tensor([0.7, -1.3, 2.0, 0.4])
    results = []
    for fused in (True, False):
        x = logits.clone().requires_grad_()
        if fused:
            ce = masked_cross_entropy(x, target, weight, n_classes_g, padding)
            assert _grad_fn_name(ce) == FUSED_CE
        else:
            ce = masked_cross_entropy_torch(x, target, weight, padding)
        (ce * grad_g).sum().backward()
        results.append((ce.detach(), x.grad))
    (ce, d), (ce_ref, d_ref) = results
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-7)
    assert ce[2] == 0 and torch.all(d[2] == 0)  # the head without labelled cells
    assert torch.all(d[padding.expand_as(d)] == 0)  # padding columns
    assert torch.all(d[0, ::3] == 0)  # unlabelled cells
    assert torch.all(d_ref[0, 1::3].abs().sum(-1) > 0)
    with torch.no_grad():  # the forward alone
        torch.testing.assert_close(masked_cross_entropy(logits, target, weight, n_classes_g),
                                   ce_ref, rtol=1e-5, atol=1e-6)


@needs_native
def test_masked_cross_entropy_rejects_targets_in_the_padding():
    logits, target, weight, n_classes_g, padding = _ce_inputs()
    target[3, 5] = 2  # head 3 has two classes
    with pytest.raises(ValueError, match="outside"):
        masked_cross_entropy(logits, target, weight, n_classes_g, padding)


@pytest.mark.parametrize("case", ["float64", "disabled"])
def test_masked_cross_entropy_falls_back_to_torch(case, monkeypatch):
    logits, target, weight, n_classes_g, padding = _ce_inputs()
    if case == "float64":
        logits, weight = logits.double(), weight.double()
    else:
        monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    x = logits.clone().requires_grad_()
    ce = masked_cross_entropy(x, target, weight, n_classes_g)  # padding mask built from n_classes
    assert _grad_fn_name(ce) != FUSED_CE
    ce_ref = masked_cross_entropy_torch(logits, target, weight, padding)
    assert torch.equal(ce.detach(), ce_ref)


def _train_heads(native_on: bool, monkeypatch, use_layer_norm: bool):
    monkeypatch.setenv("CELLSIGHT_NATIVE", "1" if native_on else "0")
    torch.manual_seed(0)
    heads = ParallelClassifiers([(6, 4), (9, 3)], n_hidden=32, n_layers=2, dropout_rate=0.2,
                                use_batch_norm=False, use_layer_norm=use_layer_norm)
    inputs = [torch.randn(50, k) for k in heads.n_inputs]
    target = torch.stack([torch.randint(0, c, (50,)) for c in heads.n_classes])
    weight = (torch.rand(2, 50) > 0.3).float()
    ce = heads.cross_entropy_g(heads.logits_gnc(inputs), target, weight)
    names = _graph_names(ce) & {FUSED_LRD, FUSED_CE}
    (ce * torch.tensor([0.6, 1.5])).sum().backward()
    return ce.detach(), [p.grad for p in heads.parameters()], names


@needs_native
@pytest.mark.parametrize("use_layer_norm", [True, False])
def test_parallel_classifiers_fused_training_step_equals_torch(use_layer_norm, monkeypatch):
    ce, grads, names = _train_heads(True, monkeypatch, use_layer_norm)
    ce_ref, grads_ref, names_ref = _train_heads(False, monkeypatch, use_layer_norm)
    assert names == {FUSED_LRD, FUSED_CE} and not names_ref
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@needs_native
def test_parallel_classifiers_fused_only_in_training_or_without_gradients():
    torch.manual_seed(0)
    heads = ParallelClassifiers([(6, 4), (3, 2)], n_hidden=16, use_batch_norm=False,
                                use_layer_norm=True)
    x = torch.randn(5, 6, requires_grad=True)
    assert FUSED_LRD in _graph_names(heads.forward_one(0, x))
    assert FUSED_LRD in _graph_names(heads.logits_gnc([x, x[:, :3]]))
    heads.eval()  # attributions (captum) differentiate the eval-mode network: torch ops
    out = heads.forward_one(0, x)
    assert FUSED_LRD not in _graph_names(out) and "ReluBackward0" in _graph_names(out)
    with torch.no_grad():  # prediction: the fused forward, the same values
        torch.testing.assert_close(heads.forward_one(0, x), out.detach(), rtol=1e-5, atol=1e-6)


def _encoders(use_layer_norm: bool):
    torch.manual_seed(0)
    return tuple(
        with_fast_dropout(Encoder(20, k, n_layers=2, n_hidden=24, dropout_rate=0.2,
                                  use_batch_norm=False, use_layer_norm=use_layer_norm)).train()
        for k in (3, 4, 5)
    )


@needs_native
@pytest.mark.parametrize("use_layer_norm", [True, False])
def test_encode_fused_kernel_equals_the_modules(use_layer_norm, monkeypatch):
    encs = _encoders(use_layer_norm)
    x = torch.randn(30, 20).abs()
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CELLSIGHT_NATIVE", flag)
        for enc in encs:
            enc.zero_grad()
        torch.manual_seed(9)
        loc, scale = encode_fused(encs, x)
        (loc.sum() + scale.square().sum()).backward()
        out.append((loc.detach(), scale.detach(),
                    [p.grad.clone() for enc in encs for p in enc.parameters()]))
    (loc, scale, grads), (loc_ref, scale_ref, grads_ref) = out
    torch.testing.assert_close(loc, loc_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
