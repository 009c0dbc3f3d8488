"""The stacked kernels' matrix product (``csrc/gemm.c``, AVX-512) and its selection, against
float64 products."""

from __future__ import annotations

import pytest
import torch

from cellsight.models.fadvi import fast_kernels
from cellsight.models.fadvi.fast_step import fast_step_reason
from cellsight.nn import native


@pytest.fixture
def lib(monkeypatch):
    """The stacked kernels, built even where ``CELLSIGHT_NATIVE=0`` is set for the run; on a
    machine without a C compiler, ``None`` after checking that this is why."""
    monkeypatch.setenv("CELLSIGHT_NATIVE", "1")
    built = fast_kernels.mlp_kernels()
    if built is None:  # the fallback: no compiler (or no BLAS sgemm in torch)
        assert native._compiler() is None or native.blas_sgemm() is None
    return built


@pytest.fixture(params=["native", "blas"])
def kernel(request, lib):
    """Each product kernel in turn (the machine's choice restored afterwards). Where gemm.c
    was not built (no AVX-512), choosing it must be refused and the BLAS runs instead."""
    if lib is None:
        yield None
        return
    want = int(request.param == "native")
    before = lib.set_native_gemm(int(native.native_gemm_wanted()))
    assert lib.set_native_gemm(want) == (want if lib.has_native_gemm() else 0)
    yield lib
    lib.set_native_gemm(before)


def _without_kernels() -> None:
    """What a machine without the kernels must do instead: FADVI's fast step is declined."""
    import anndata as ad
    import numpy as np

    from cellsight.models import FADVI

    adata = ad.AnnData(np.random.default_rng(0).poisson(2.0, (20, 6)).astype(np.float32))
    adata.obs["batch"] = ["a", "b"] * 10
    FADVI.setup_anndata(adata, batch_key="batch")
    assert "native kernels" in fast_step_reason(FADVI(adata, n_hidden=8).module)


def _gemm(lib, ta, tb, a, b, c, alpha, beta):
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    lib.gemm_for_tests(ta, tb, m, n, k, alpha, a.data_ptr(), a.stride(0), b.data_ptr(),
                       b.stride(0), beta, c.data_ptr(), c.stride(0))


SHAPES = [  # (m, n, k): FADVI's shapes, tile edges (14 x 32 tiles, k in blocks of 256)
    (128, 128, 765), (128, 765, 128), (118, 765, 70), (128, 10, 128), (30, 128, 128),
    (14, 32, 256), (15, 33, 257), (1, 1, 1), (3, 70, 600), (97, 5, 13),
]


@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_gemm_matches_a_float64_product(kernel, ta, tb, m, n, k):
    if kernel is None:
        return _without_kernels()
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = torch.randn((k, m) if ta else (m, k), generator=g)
    b = torch.randn((n, k) if tb else (k, n), generator=g)
    for alpha, beta in [(1.0, 0.0), (1.0, 1.0), (0.5, -2.0)]:
        c0 = torch.randn(m, n, generator=g)
        if beta == 0.0:
            c0[0, 0] = float("nan")  # beta = 0: C is written, never read
        c = c0.clone()
        _gemm(kernel, ta, tb, a, b, c, alpha, beta)
        ref = alpha * ((a.T if ta else a).double() @ (b.T if tb else b).double())
        if beta != 0.0:
            ref = ref + beta * c0.double()
        tol = 2e-6 * (k ** 0.5) * float(ref.abs().max()) + 1e-6
        assert float((c.double() - ref).abs().max()) <= tol


def test_gemm_with_row_strides_wider_than_the_matrices(kernel):
    """Sub-blocks of larger matrices (lda, ldb, ldc > the widths), as the kernels pass them."""
    if kernel is None:
        return _without_kernels()
    g = torch.Generator().manual_seed(0)
    big_a, big_b = torch.randn(50, 300, generator=g), torch.randn(400, 90, generator=g)
    a, b = big_a[:, 10:270], big_b[5:265, :40]  # (50, 260) @ (260, 40)
    big_c = torch.randn(60, 70, generator=g)
    c0 = big_c.clone()
    c = big_c[:50, 3:43]
    _gemm(kernel, 0, 0, a, b, c, 1.0, 0.0)
    torch.testing.assert_close(c, a @ b, rtol=1e-5, atol=1e-4)
    c0[:50, 3:43] = big_c[:50, 3:43]
    assert torch.equal(big_c, c0)  # nothing outside the block written


def test_the_kernel_choice_follows_the_environment_and_the_vendor(monkeypatch):
    monkeypatch.setattr(native, "_cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.delenv("CELLSIGHT_NATIVE_GEMM", raising=False)
    assert native.native_gemm_wanted() is False  # MKL runs its AVX-512 kernels there
    monkeypatch.setattr(native, "_cpu_vendor", lambda: "AuthenticAMD")
    assert native.native_gemm_wanted() is True
    monkeypatch.setenv("CELLSIGHT_NATIVE_GEMM", "0")
    assert native.native_gemm_wanted() is False
    monkeypatch.setattr(native, "_cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv("CELLSIGHT_NATIVE_GEMM", "1")
    assert native.native_gemm_wanted() is True


def test_the_native_kernel_cannot_be_chosen_where_it_was_not_built(lib):
    if lib is None:
        return _without_kernels()
    before = lib.set_native_gemm(int(native.native_gemm_wanted()))
    try:
        assert lib.set_native_gemm(1) == lib.has_native_gemm()
        assert lib.set_native_gemm(0) == 0
    finally:
        lib.set_native_gemm(before)
