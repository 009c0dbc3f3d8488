"""CSR minibatches (the streaming default for sparse data) give the dense path's results.

Every statistic that takes CSR minibatches is fitted twice on the same real counts: once from
a CSR AnnData (the minibatches stay sparse through normalise/log1p/filter) and once from the
dense copy (the dense code path). The two must agree to float64 round-off.
"""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from stats_helpers import lognorm, mouse

from cellsight.data.sparse import csr_tensor, csr_to_scipy
from cellsight.stats import (
    HVGSeuratV3,
    IncrementalPCA,
    OnePassMeanVarStd,
    TDigest,
    fit_statistic,
    stream_data,
)
from cellsight.stats.transforms import Filter, Log1p, NormalizeTotal, ZScore, apply_transforms


@pytest.fixture(scope="module")
def pair():
    a = mouse(1200, 300)
    d = a.copy()
    d.X = a.X.toarray()
    return a, d


def _fit(model_fn, adata, transforms=(), batch_key=None, batch_size=256):
    src = stream_data(adata, batch_key=batch_key, batch_size=batch_size)
    model = model_fn(src)
    fit_statistic(model, src.datamodule, transforms=[t() for t in transforms],
                  input_var_names_g=src.var_names_g)
    return model


def test_stream_data_serves_csr_minibatches_for_sparse_data(pair):
    a, d = pair
    sparse_batch = next(iter(stream_data(a, batch_size=64).datamodule.train_dataloader()))
    dense_batch = next(iter(stream_data(d, batch_size=64).datamodule.train_dataloader()))
    assert sparse_batch["X"].layout == torch.sparse_csr
    assert dense_batch["X"].layout == torch.strided
    np.testing.assert_array_equal(sparse_batch["X"].to_dense().numpy(), dense_batch["X"].numpy())


@pytest.mark.parametrize("algorithm", ["naive", "shifted_data"])
def test_mean_var_from_csr_equals_dense_per_batch(pair, algorithm):
    a, d = pair
    trans = (NormalizeTotal, Log1p)

    def make(src):
        return OnePassMeanVarStd(src.var_names_g, algorithm=algorithm, n_batch=src.n_batch,
                                 output_path=None)

    ms = _fit(make, a, trans, batch_key="sample")
    md = _fit(make, d, trans, batch_key="sample")
    ref = lognorm(a.X.toarray())
    for b, name in enumerate(["s0", "s1", "s2"]):
        rows = (a.obs["sample"] == name).to_numpy()
        np.testing.assert_allclose(ms.batch_mean_bg[b].numpy(), ref[rows].mean(0), rtol=1e-10)
        np.testing.assert_allclose(ms.batch_var_bg[b].numpy(), ref[rows].var(0), rtol=1e-9,
                                   atol=1e-12)
    np.testing.assert_allclose(ms.batch_var_bg.numpy(), md.batch_var_bg.numpy(), rtol=1e-10,
                               atol=1e-13)


def test_shifted_sparse_sums_stay_accurate_with_a_large_offset():
    """Sparse data whose non-zeros sit at 1e6 + noise 0.1: shifted sums keep the spread."""
    rng = np.random.default_rng(1)
    x = np.where(rng.random((500, 20)) < 0.3, 1e6 + 0.1 * rng.standard_normal((500, 20)), 0.0)
    a = ad.AnnData(sp.csr_matrix(x))
    src = stream_data(a, batch_size=64)
    m = OnePassMeanVarStd(src.var_names_g, algorithm="shifted_data", output_path=None)
    fit_statistic(m, src.datamodule, input_var_names_g=src.var_names_g)
    x32 = x.astype(np.float32).astype(np.float64)  # the loader serves float32 values
    np.testing.assert_allclose(m.var_g.numpy(), x32.var(0), rtol=1e-9)


def test_tdigest_from_csr_equals_dense(pair):
    a, d = pair
    ts = _fit(lambda s: TDigest(s.var_names_g), a, (NormalizeTotal, Log1p))
    td = _fit(lambda s: TDigest(s.var_names_g), d, (NormalizeTotal, Log1p))
    np.testing.assert_array_equal(ts.count_g.numpy(), td.count_g.numpy())
    np.testing.assert_allclose(ts.quantiles([0.5, 0.9]).numpy(), td.quantiles([0.5, 0.9]).numpy(),
                               rtol=1e-12, equal_nan=True)


def test_hvg_from_csr_equals_dense(pair):
    a, d = pair

    def make(src):
        return HVGSeuratV3(src.var_names_g, n_top_genes=50, n_batch=src.n_batch,
                           use_batch_key=True, output_path=None)

    hs = _fit(make, a, batch_key="sample").to_dataframe()
    hd = _fit(make, d, batch_key="sample").to_dataframe()
    assert list(hs.index[hs["highly_variable"]]) == list(hd.index[hd["highly_variable"]])
    np.testing.assert_allclose(hs["variances_norm"], hd["variances_norm"], rtol=1e-10)


def test_gram_pca_from_csr_equals_dense_and_exact_svd(pair):
    a, d = pair
    trans = (NormalizeTotal, Log1p)
    ps = _fit(lambda s: IncrementalPCA(s.var_names_g, 5, algorithm="gram"), a, trans)
    pd_ = _fit(lambda s: IncrementalPCA(s.var_names_g, 5, algorithm="gram"), d, trans)
    x = lognorm(a.X.toarray())
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    np.testing.assert_allclose(ps.explained_variance_k.numpy(), s[:5] ** 2 / len(x), rtol=1e-9)
    np.testing.assert_allclose(ps.explained_variance_k.numpy(),
                               pd_.explained_variance_k.numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.abs(ps.components_kg.numpy()),
                               np.abs(pd_.components_kg.numpy()), atol=1e-8)


def test_gram_pca_keeps_precision_for_a_gene_without_zeros():
    """A CSR minibatch with one always-non-zero gene at 1e4 + noise: it is shifted exactly."""
    rng = np.random.default_rng(2)
    x = np.where(rng.random((400, 30)) < 0.2, rng.poisson(3, (400, 30)), 0).astype(float)
    x[:, 0] = 1e4 + rng.standard_normal(400)
    a = ad.AnnData(sp.csr_matrix(x.astype(np.float32)))
    src = stream_data(a, batch_size=100)
    p = IncrementalPCA(src.var_names_g, 3, algorithm="gram")
    fit_statistic(p, src.datamodule, input_var_names_g=src.var_names_g)
    x32 = x.astype(np.float32).astype(np.float64)
    s = np.linalg.svd(x32 - x32.mean(0), compute_uv=False)
    np.testing.assert_allclose(p.explained_variance_k.numpy(), s[:3] ** 2 / len(x), rtol=1e-9)


def test_gram_pca_of_float32_csr_is_exact_for_the_float32_values():
    """Non-integer float32 CSR minibatches given to the model directly (log-normalised
    values, with and without a gene lacking zeros): products and sums are taken in float64,
    so the spectrum equals the exact one of the float32 values to 1e-9 (float32 accumulation
    is off by ~1e-6)."""
    rng = np.random.default_rng(3)
    x = np.log1p(np.where(rng.random((600, 40)) < 0.15, rng.gamma(2.0, 3.0, (600, 40)), 0.0))
    for offset_gene in (False, True):
        if offset_gene:
            x[:, 0] = 50 + rng.standard_normal(600)
        x32 = x.astype(np.float32)
        p = IncrementalPCA([f"g{i}" for i in range(40)], 4, algorithm="gram")
        for start in range(0, 600, 150):  # float32 torch CSR minibatches, fed directly
            p(csr_tensor(sp.csr_matrix(x32[start:start + 150]), dtype=torch.float32))
        xe = x32.astype(np.float64)
        s = np.linalg.svd(xe - xe.mean(0), compute_uv=False)
        np.testing.assert_allclose(p.explained_variance_k.numpy(), s[:4] ** 2 / len(x),
                                   rtol=1e-9)


@pytest.mark.parametrize("missing", ["error", "zero"])
def test_sparse_transform_chain_matches_dense_and_densifies_before_zscore(pair, missing):
    a, _ = pair
    genes = list(a.var_names[[5, 2, 7]]) + (["NOT_A_GENE"] if missing == "zero" else [])
    x_sp = a.X[:50]
    chain = [NormalizeTotal(), Log1p(), Filter(genes, missing=missing)]
    chain[-1].setup_genes(np.asarray(a.var_names))
    out_sparse = apply_transforms(chain, csr_tensor(x_sp, torch.float64), keep_sparse=True)
    out_dense = apply_transforms(chain, torch.as_tensor(x_sp.toarray(), dtype=torch.float64))
    assert out_sparse.layout == torch.sparse_csr
    np.testing.assert_allclose(csr_to_scipy(out_sparse).toarray(), out_dense.numpy(),
                               rtol=1e-12)
    z = ZScore(np.ones(len(genes)), np.full(len(genes), 2.0), genes)
    z.setup_genes(np.asarray(genes))
    zs = apply_transforms(chain + [z], csr_tensor(x_sp, torch.float64), keep_sparse=True)
    assert zs.layout == torch.strided
    np.testing.assert_allclose(zs.numpy(), (out_dense.numpy() - 1) / 2, rtol=1e-12)
