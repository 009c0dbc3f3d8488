"""The native (C) kernels: the loader, and the fused ZINB log-likelihood against scvi-tools.

The ZINB kernel must equal ``ZeroInflatedNegativeBinomial.log_prob(x).sum(-1)`` in value and
gradient (autograd of scvi-tools' formula) for per-gene and per-cell ``theta``, integer and
non-integer counts, counts above any lookup range, and extreme dispersions; without native
kernels the torch path must be taken and give the same numbers.
"""

import ctypes
import warnings

import pytest
import torch
from scvi.distributions import ZeroInflatedNegativeBinomial

from cellsight.nn import native
from cellsight.nn.likelihoods import zinb_log_likelihood_n
from cellsight.nn.zinb_grad import ZINBLogLikelihood
from cellsight.nn.zinb_native import NativeZINBLogLikelihood, zinb_native_usable

pytestmark = pytest.mark.skipif(
    native.library("zinb") is None,
    reason="native kernels unavailable (no C compiler, or CELLSIGHT_NATIVE=0)")


def _data(per_cell_theta: bool, seed: int = 0, n: int = 40, g: int = 37,
          theta_scale: float = 10.0, counts: str = "poisson"):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.rand(n, g, generator=gen) * 6 + 1e-3
    if counts == "poisson":
        x = torch.poisson(mu * (torch.rand(n, g, generator=gen) < 0.3), generator=gen)
    elif counts == "large":
        x = torch.poisson(mu * 300, generator=gen) * (torch.rand(n, g, generator=gen) < 0.5)
    else:  # non-integer (e.g. scaled) counts
        x = torch.rand(n, g, generator=gen) * 4 * (torch.rand(n, g, generator=gen) < 0.4)
    x[0] = 0.0
    shape = (n, g) if per_cell_theta else (g,)
    theta = torch.rand(shape, generator=gen) * theta_scale + theta_scale * 5e-3
    logits = torch.randn(n, g, generator=gen) * 3
    return x, mu.requires_grad_(), theta.requires_grad_(), logits.requires_grad_()


def _value_and_grads(fn, params, weight):
    value = fn()
    return value.detach(), torch.autograd.grad((value * weight).sum(), params)


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("counts", ["poisson", "large", "fractional"])
@pytest.mark.parametrize("theta_scale", [1e-2, 10.0, 1e4])
def test_native_zinb_matches_scvi_tools(per_cell_theta, counts, theta_scale):
    x, mu, theta, logits = _data(per_cell_theta, theta_scale=theta_scale, counts=counts)
    assert zinb_native_usable(x, mu, theta, logits)
    weight = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1))
    params = (mu, theta, logits)
    # the reference in float64; the check: as accurate as the float64 reference to 1e-6 of
    # the value (1e-5 of the largest gradient), or at least as accurate as scvi-tools' own
    # float32 evaluation (for theta = 1e4 the float32 terms of d/d theta cancel to 1e-4)
    def scvi(ps, xx):
        return ZeroInflatedNegativeBinomial(mu=ps[0], theta=ps[1], zi_logits=ps[2]).log_prob(
            xx).sum(-1)

    params64 = [p.detach().double().requires_grad_() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fractional counts: outside the support
        ref = _value_and_grads(lambda: scvi(params64, x.double()), params64, weight.double())
        f32 = _value_and_grads(lambda: scvi(params, x), params, weight)
    ours = _value_and_grads(lambda: NativeZINBLogLikelihood.apply(x, mu, theta, logits),
                            params, weight)
    outputs = [(ours[0], f32[0], ref[0], 1e-6)] + [
        (a, b, c, 1e-5) for a, b, c in zip(ours[1], f32[1], ref[1])]
    for name, (a, b, c, tol) in zip(["value", "d mu", "d theta", "d zi"], outputs):
        err_ours = float((a.double() - c).abs().max())
        err_f32 = float((b.double() - c).abs().max())
        allowed = max(tol * float(c.abs().max()), 2.0 * err_f32)
        assert err_ours <= allowed, (name, err_ours, err_f32, allowed)


def test_training_path_uses_native_and_agrees_with_torch_path(monkeypatch):
    x, mu, theta, logits = _data(False, seed=3)
    fn = zinb_log_likelihood_n(x, mu, theta, logits).grad_fn
    assert type(fn).__name__.startswith("NativeZINBLogLikelihood")
    v1 = zinb_log_likelihood_n(x, mu, theta, logits)
    g1 = torch.autograd.grad(v1.sum(), (mu, theta, logits))
    monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    assert not zinb_native_usable(x, mu, theta, logits)
    v2 = zinb_log_likelihood_n(x, mu, theta, logits)
    assert type(v2.grad_fn).__name__.startswith("ZINBLogLikelihood")
    g2 = torch.autograd.grad(v2.sum(), (mu, theta, logits))
    torch.testing.assert_close(v1, v2.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_native_not_used_where_it_does_not_apply():
    x, mu, theta, logits = _data(False)
    assert not zinb_native_usable(x.double(), mu.double(), theta.double(), logits.double())
    assert not zinb_native_usable(x.t(), mu.t(), theta, logits.t())  # not (n, g) contiguous
    assert not zinb_native_usable(x.requires_grad_(), mu, theta, logits)  # counts need grad
    assert not zinb_native_usable(x[:0], mu[:0], theta, logits[:0])
    # float64 still gives the right answer (the torch path)
    v = zinb_log_likelihood_n(x.detach().double(), mu.double(), theta.double(), logits.double())
    assert v.dtype == torch.float64


def test_backward_twice_with_retained_graph_is_consistent():
    x, mu, theta, logits = _data(False)
    v = NativeZINBLogLikelihood.apply(x, mu, theta, logits).sum()
    g1 = torch.autograd.grad(v, (mu, theta), retain_graph=True)
    g2 = torch.autograd.grad(v, (mu, theta))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    ref = ZINBLogLikelihood.apply(x, mu, theta, logits).sum()
    torch.testing.assert_close(g1[0], torch.autograd.grad(ref, mu)[0], rtol=1e-4, atol=1e-5)


def test_loading_a_kernel_keeps_denormals():
    """The libraries are linked without -ffast-math: loading one must not switch the process
    to flush-to-zero (which would change every later torch result near underflow)."""
    native.library("zinb")
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert float(tiny * 1.0) > 0.0
    assert float(ctypes.c_float(1e-40).value) > 0.0


def test_library_is_cached_and_disabled_by_env(monkeypatch, tmp_path):
    assert native.library("zinb") is native.library("zinb")
    monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    assert native.library("zinb") is None
    assert not native.usable(torch.zeros(2))


def test_build_goes_to_the_cache_dir_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSIGHT_CACHE_DIR", str(tmp_path))
    path = native._build("zinb")
    assert path.parent == tmp_path / "native" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native._build("zinb") == path and path.stat().st_mtime_ns == mtime


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_LIBS", {})
    monkeypatch.setattr(native, "_WARNED", set())
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert native.library("zinb") is None
    assert native.library("zinb") is None  # cached, no second warning


def test_signatures_are_set_by_the_first_caller_that_passes_them(monkeypatch):
    monkeypatch.setenv("CELLSIGHT_NATIVE", "1")  # built even where the run disables them
    monkeypatch.setattr(native, "_LIBS", {})
    calls = []
    lib = native.library("random_bits")  # loaded without signatures (e.g. a skip check)
    if lib is None:  # no C compiler: nothing to bind, and nothing is called
        assert native._compiler() is None
        assert native.library("random_bits", {}, init=calls.append) is None and calls == []
        return
    assert lib.splitmix_words.argtypes is None
    sig = {"splitmix_words": (None, [ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p])}
    assert native.library("random_bits", sig, init=calls.append) is lib
    assert lib.splitmix_words.argtypes == sig["splitmix_words"][1] and calls == [lib]
    native.library("random_bits", sig, init=calls.append)
    assert calls == [lib]  # once
