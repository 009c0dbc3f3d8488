"""FADVI's written-out training step (``fast_step.FastTrainingStep``) against autograd.

For the same seed the fast step must give the autograd path's loss, metrics and the gradient of
every parameter (float32 rounding: 1e-5 of each parameter's largest gradient), for gradient
reversal and for the frozen adversaries of alternating optimisation, over several layouts; the
plan must use it where it applies and fall back to autograd elsewhere; and training with it
must follow the autograd path's trajectory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsight.models import FADVI
from cellsight.models.fadvi.fast_step import FastTrainingStep, fast_step_reason
from cellsight.models.fadvi.plan import FADVITrainingPlan
from cellsight.nn import native

pytestmark = pytest.mark.skipif(
    native.library("zinb") is None or native.library("dense") is None,
    reason="native kernels unavailable (no C compiler, or CELLSIGHT_NATIVE=0)")


def _adata(n_batch: int = 2, seed: int = 0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    n, g = 96, 40
    labels = rng.choice(["A", "B", "C"], n)
    mean = np.where(labels[:, None] == "A", 3.0, 1.0) * rng.gamma(2.0, 1.0, (1, g))
    adata = ad.AnnData(rng.poisson(mean * rng.gamma(1.0, 1.0, (n, g))).astype(np.float32))
    adata.var_names = [f"g{i}" for i in range(g)]
    adata.obs["batch"] = rng.choice([f"b{i}" for i in range(n_batch)], n)
    labels[rng.random(n) < 0.2] = "Unknown"
    adata.obs["labels"] = labels
    return adata


def _module_and_batch(n_batch: int = 2, **kwargs):
    adata = _adata(n_batch)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, n_hidden=32, n_latent_b=6, n_latent_l=5, n_latent_r=3, seed=0,
                  **kwargs)
    module = model.module
    module.train()
    dm = model._datamodule(0.9, None, 64, 0)
    dm.setup("fit")
    return module, next(iter(dm.train_dataloader()))


def _autograd_grads(module, batch, mode: str, kl_weight: float):
    for p in module.parameters():
        p.grad = None
    _, _, out = module(batch, loss_kwargs={"kl_weight": kl_weight, "adversarial": mode})
    frozen = list(module.adversaries.parameters()) if (
        mode == "frozen" and module.adversaries is not None) else []
    for p in frozen:
        p.requires_grad_(False)
    out.loss.backward()
    for p in frozen:
        p.requires_grad_(True)
    return out, {n: None if p.grad is None else p.grad.clone()
                 for n, p in module.named_parameters()}


def _assert_grads_close(g: dict, ref_g: dict) -> None:
    """Every parameter's gradient within 1e-5 of its largest autograd gradient (+1e-7)."""
    for name, r in ref_g.items():
        if r is not None:
            scale = float(r.abs().max()) + 1e-12
            assert float((g[name] - r).abs().max()) <= 1e-5 * scale + 1e-7, name


def _fast_grads(module, batch, mode: str, kl_weight: float):
    for p in module.parameters():
        p.grad = None
    out, backward = FastTrainingStep(module)(batch, kl_weight=kl_weight, adversarial=mode)
    backward()
    return out, {n: None if p.grad is None else p.grad.clone()
                 for n, p in module.named_parameters()}


LAYOUTS = {
    "default": {},
    "one hidden layer": {"n_layers": 1},
    "no layer norm": {"use_layer_norm": "none"},
    "no dropout": {"dropout_rate": 0.0},
    "no correlation penalty": {"gamma": 0.0},
    "no adversaries": {"alpha_bl": 0.0, "alpha_lb": 0.0, "alpha_rb": 0.0, "alpha_rl": 0.0},
    "counts not log-transformed": {"log_variational": False},
    "narrower heads, three layers": {"n_hidden_head": 16, "n_layers": 3},
}


@pytest.mark.parametrize("mode", ["reversal", "frozen"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_step_equals_autograd(layout, mode):
    module, batch = _module_and_batch(**LAYOUTS[layout])
    assert fast_step_reason(module) is None
    torch.manual_seed(3)
    ref, ref_g = _autograd_grads(module, batch, mode, 0.7)
    torch.manual_seed(3)  # the same dropout masks and posterior sample
    out, g = _fast_grads(module, batch, mode, 0.7)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-5)
    for key, value in ref.reconstruction_loss.items():
        torch.testing.assert_close(out.reconstruction_loss[key], value.detach(), rtol=1e-5,
                                   atol=1e-4)
    for key, value in ref.extra_metrics.items():
        torch.testing.assert_close(out.extra_metrics[key], value.detach(), rtol=1e-5, atol=1e-6)
    for key, value in ref.kl_local.items():
        torch.testing.assert_close(out.kl_local[key], value.detach(), rtol=1e-5, atol=1e-5)
    assert set(k for k, v in g.items() if v is not None) == set(
        k for k, v in ref_g.items() if v is not None)
    _assert_grads_close(g, ref_g)
    if mode == "frozen" and module.adversaries is not None:  # frozen: no adversary gradients
        assert all(p.grad is None for p in module.adversaries.parameters())


@pytest.mark.parametrize("native_gemm", [1, 0])
def test_fast_step_equals_autograd_with_either_product_kernel(native_gemm):
    """The stacked kernels' own AVX-512 matrix product and the BLAS sgemm give the same
    gradients (the default layout, alternating optimisation's main pass)."""
    from cellsight.models.fadvi.fast_kernels import mlp_kernels

    lib = mlp_kernels()
    module, batch = _module_and_batch()
    before = lib.set_native_gemm(int(native.native_gemm_wanted()))
    try:
        # without AVX-512 gemm.c is not built: choosing it is refused and the BLAS runs
        assert lib.set_native_gemm(native_gemm) == native_gemm * lib.has_native_gemm()
        torch.manual_seed(5)
        ref, ref_g = _autograd_grads(module, batch, "frozen", 1.0)
        torch.manual_seed(5)
        out, g = _fast_grads(module, batch, "frozen", 1.0)
    finally:
        lib.set_native_gemm(before)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(g, ref_g)


def test_fast_step_with_a_single_batch():
    module, batch = _module_and_batch(n_batch=1)
    assert module.n_batch == 1 and not module.has_head("head_batch")
    torch.manual_seed(0)
    ref, ref_g = _autograd_grads(module, batch, "reversal", 1.0)
    torch.manual_seed(0)
    out, g = _fast_grads(module, batch, "reversal", 1.0)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(g, ref_g)


@pytest.mark.parametrize("kwargs, reason", [
    ({"gene_likelihood": "nb"}, "zinb"),
    ({"dispersion": "gene-batch"}, "dispersion"),
    ({"use_observed_lib_size": False}, "library"),
    ({"use_batch_norm": "encoder", "use_layer_norm": "none"}, "encoder layer"),
    ({"encode_covariates": True}, "encode_covariates"),
])
def test_unsupported_layouts_are_named_and_train_through_autograd(kwargs, reason):
    module, _ = _module_and_batch(**kwargs)
    why = fast_step_reason(module)
    assert why is not None and reason in why
    with pytest.raises(ValueError, match="does not cover"):
        FastTrainingStep(module)
    plan = FADVITrainingPlan(module)
    assert plan._fast_training_step() is None


def test_fast_step_is_skipped_without_native_kernels(monkeypatch):
    module, _ = _module_and_batch()
    monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    assert "native" in fast_step_reason(module)


@pytest.mark.parametrize("mode", ["reversal", "alternating"])
def test_training_with_the_fast_step_follows_autograd(mode):
    """Same seed, two epochs: the per-epoch losses of the fast and autograd paths agree to
    float32 rounding drift (1e-4 relative), and the plan did take the fast path."""
    histories = []
    for fast in (True, False):
        adata = _adata()
        FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
        model = FADVI(adata, n_hidden=32, n_latent_b=6, n_latent_l=5, n_latent_r=3, seed=0,
                      adversarial_training=mode)
        model.train(max_epochs=2, batch_size=32, enable_progress_bar=False,
                    plan_kwargs={"fast_step": fast}, weight_averaging=None)
        histories.append(model.history["train_loss"].to_numpy(dtype=float).ravel())
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-4)


def test_the_plan_takes_the_fast_step_and_gradient_clipping_still_applies(monkeypatch):
    """Reversal runs the written-out gradients in Lightning's backward hook: the trainer's
    gradient clipping (applied after that hook) must see them."""
    calls, norms = [], []
    original = FastTrainingStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("adversarial"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastTrainingStep, "__call__", counted)
    original_clip = FADVITrainingPlan.configure_gradient_clipping

    def clip(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original_clip(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))

    monkeypatch.setattr(FADVITrainingPlan, "configure_gradient_clipping", clip)
    adata = _adata()
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, n_hidden=32, n_latent_b=6, n_latent_l=5, n_latent_r=3, seed=0,
                  adversarial_training="reversal")
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False,
                gradient_clip_val=1e-3, weight_averaging=None)
    assert calls and set(calls) == {"reversal"}
    assert norms and max(norms) <= 1e-3 * 1.0001


def test_fast_step_is_deterministic_for_a_seed():
    module, batch = _module_and_batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        out, grads = _fast_grads(module, batch, "reversal", 0.5)
        runs.append((out.loss, grads))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, g in runs[0][1].items():
        assert (g is None and runs[1][1][name] is None) or torch.equal(g, runs[1][1][name])


def test_cached_c_arguments_follow_a_parameter_moved_to_new_storage():
    """The step caches pointers to the weights; a parameter given new storage (``.data =``)
    must be picked up, not read from the freed old memory."""
    module, batch = _module_and_batch()
    step = FastTrainingStep(module)
    torch.manual_seed(1)
    step(batch, kl_weight=1.0)  # fills the cache
    with torch.no_grad():
        for w in (module.heads.weights[0], module.encoder_l.encoder.fc_layers[0][0].weight,
                  module.decoder.px_scale_decoder[0].weight):
            w.data = w.data.clone() * 1.5
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(2)
    out, backward = step(batch, kl_weight=1.0)
    backward()
    fast = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    torch.manual_seed(2)
    ref, ref_g = _autograd_grads(module, batch, "reversal", 1.0)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(fast, ref_g)
