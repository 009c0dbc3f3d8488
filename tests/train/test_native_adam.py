"""NativeAdam (one C call per step) against torch.optim.Adam / AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from cellsight.nn import native
from cellsight.train.native_adam import NativeAdam

needs_native = pytest.mark.skipif(native.library("adam") is None,
                                  reason="native kernels unavailable")


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(30, 7), (7,), (1,), (3, 4, 5)]]


def _run(cls, init, steps: int = 40, grads_from: dict | None = None, **kwargs):
    """Train copies of ``init`` with ``cls`` on a fixed random gradient stream; parameter
    ``i`` gets gradients from step ``grads_from.get(i, 0)`` on."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    lr = kwargs.pop("lr", 1e-2)
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2}], lr=lr, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            p.grad = grad if step >= (grads_from or {}).get(i, 0) else None
        opt.step()
    return params, opt


@needs_native
@pytest.mark.parametrize("kwargs", [
    {}, {"weight_decay": 0.05}, {"weight_decay": 0.05, "decoupled_weight_decay": True},
    {"maximize": True}, {"betas": (0.5, 0.9), "eps": 1e-3},
])
def test_matches_torch_adam(kwargs):
    init = _params()
    ref, ref_opt = _run(torch.optim.Adam, init, fused=True, **kwargs)
    ours, opt = _run(NativeAdam, init, fused=True, **kwargs)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for a, b in zip(ref, ours):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key],
                                       rtol=1e-5, atol=1e-8)


@needs_native
def test_late_gradients_get_their_own_step_count():
    init = _params()
    late = {1: 10, 3: 25}
    ref, ref_opt = _run(torch.optim.Adam, init, grads_from=late)
    ours, opt = _run(NativeAdam, init, grads_from=late)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert [float(opt.state[p]["step"]) for p in ours] == [40.0, 30.0, 40.0, 15.0]


@needs_native
def test_the_c_step_is_used(monkeypatch):
    """The C call, not torch's step, updates the parameters (torch's step would raise)."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch's Adam.step was called")

    monkeypatch.setattr(torch.optim.Adam, "step", refuse)
    params, _ = _run(NativeAdam, _params(), steps=3)
    assert not torch.equal(params[0].detach(), _params()[0])


@pytest.mark.parametrize("kwargs", [{"amsgrad": True}, {"lr": torch.tensor(1e-2)}])
def test_options_the_c_step_lacks_use_torch(kwargs):
    init = _params()
    ref, _ = _run(torch.optim.Adam, init, steps=10, **kwargs)
    ours, _ = _run(NativeAdam, init, steps=10, **kwargs)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_float64_and_disabled_kernels_use_torch(monkeypatch):
    init = [p.double() for p in _params()]
    ref, _ = _run(torch.optim.Adam, init, steps=10)
    ours, _ = _run(NativeAdam, init, steps=10)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    init = _params()
    ref, _ = _run(torch.optim.Adam, init, steps=10, fused=True)
    ours, _ = _run(NativeAdam, init, steps=10, fused=True)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


@needs_native
def test_state_dict_round_trip_with_torch_adam():
    """NativeAdam's state continues in torch's Adam and vice versa."""
    init = _params()
    ours, opt = _run(NativeAdam, init, steps=20)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref_opt = torch.optim.Adam([{"params": ref[:2]}, {"params": ref[2:], "lr": 3e-2}], lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    back = NativeAdam([{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-2}], lr=1e-2)
    back.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        for a, b in zip(ref, ours):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ref_opt.step()
        back.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@needs_native
def test_closure_is_evaluated_first():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = NativeAdam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == 5.0  # the loss before the step
    # Adam's first step moves each coordinate by lr against the gradient's sign
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9]))


@pytest.mark.parametrize("adversarial", ["alternating", "reversal"])
def test_training_plans_step_with_native_adam(adversarial):
    import anndata as ad
    import numpy as np

    from cellsight.models import FADVI
    from cellsight.models.fadvi.plan import FADVITrainingPlan

    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(2.0, (40, 12)).astype(np.float32))
    adata.obs["batch"] = rng.choice(["a", "b"], 40)
    adata.obs["labels"] = rng.choice(["x", "y"], 40)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    module = FADVI(adata, n_hidden=8).module
    plan = FADVITrainingPlan(module, adversarial_training=adversarial)
    out = plan.configure_optimizers()
    optimizers = out if isinstance(out, list) else [out["optimizer"]]
    assert optimizers and all(type(opt) is NativeAdam for opt in optimizers)
    n_params = sum(len(g["params"]) for opt in optimizers for g in opt.param_groups)
    assert n_params == len(list(module.parameters()))


@needs_native
def test_kept_pointer_arrays_follow_loaded_state_and_moved_parameters():
    """The arrays kept between steps are rebuilt after ``load_state_dict`` (new state
    tensors), when a parameter's storage changes and when another set of parameters has
    gradients; each time the result is torch's."""
    init = _params()
    ours, opt = _run(NativeAdam, init, steps=5)       # arrays built and reused
    ref, ref_opt = _run(torch.optim.Adam, init, steps=5)
    checkpoint = copy.deepcopy(ref_opt.state_dict())
    for _ in range(3):                                # ours moves on, then is rolled back
        for p in ours:
            p.grad = torch.ones_like(p)
        opt.step()
    with torch.no_grad():
        for a, b in zip(ours, ref):
            a.copy_(b)
    opt.load_state_dict(copy.deepcopy(checkpoint))
    ours[0].data = ours[0].data.clone()               # new storage for one parameter
    g = torch.Generator().manual_seed(9)
    for step in range(8):
        for i, (a, b) in enumerate(zip(ref, ours)):
            grad = torch.randn(a.shape, generator=g) if (step % 3 or i != 1) else None
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for a, b in zip(ref, ours):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key], rtol=0,
                                       atol=1e-6)
