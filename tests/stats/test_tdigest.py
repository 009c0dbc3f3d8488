"""t-digest quantiles of the non-zero values against numpy."""

import numpy as np
import pytest
import torch
from stats_helpers import lognorm, mouse

import cellsight.tl as ctl
from cellsight.stats import TDigest
from cellsight.stats.tdigest import compress_centroids


@pytest.fixture(scope="module")
def cells():
    return mouse()


def _numpy_nonzero_quantile(x, q):
    out = np.full(x.shape[1], np.nan)
    for g in range(x.shape[1]):
        v = x[x[:, g] != 0, g]
        if v.size:
            out[g] = np.quantile(v, q)
    return out


def test_quantiles_within_one_percent_of_numpy_on_nonzero_values(cells):
    """Median and 0.9 of every gene's non-zero log-normalised values, 10k cells streamed in
    minibatches of 1000: relative error < 1% for all 715 expressed genes."""
    df = ctl.quantiles(cells, (0.5, 0.9), normalize_total=1e4, log1p=True, batch_size=1000)
    x = lognorm(cells.X.toarray())
    assert list(df.columns) == [0.5, 0.9]
    for q in (0.5, 0.9):
        ref = _numpy_nonzero_quantile(x, q)
        expressed = ~np.isnan(ref)
        assert expressed.sum() > 700
        np.testing.assert_array_equal(np.isnan(df[q].to_numpy()), ~expressed)
        rel = np.abs(df[q].to_numpy()[expressed] / ref[expressed] - 1)
        assert rel.max() < 0.01, (q, rel.max())


def test_single_value_centroids_reproduce_numpy_linear_quantiles():
    """While every centroid holds one value the digest is exact (numpy's 'linear' rule)."""
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(60, 3)) * (rng.random((60, 3)) > 0.3)
    model = TDigest(["a", "b", "c"], compression=500)
    model(torch.as_tensor(x))
    got = model.quantiles([0.0, 0.1, 0.5, 0.77, 1.0]).numpy()
    for i, q in enumerate([0.0, 0.1, 0.5, 0.77, 1.0]):
        np.testing.assert_allclose(got[i], _numpy_nonzero_quantile(x, q), rtol=1e-12)


def test_compression_bounds_centroids_and_keeps_total_weight():
    rng = np.random.default_rng(1)
    mean_gm = torch.as_tensor(rng.normal(size=(4, 5000)))
    weight_gm = torch.ones(4, 5000, dtype=torch.float64)
    mean_gc, weight_gc = compress_centroids(mean_gm, weight_gm, 50)
    assert mean_gc.shape == (4, 50)
    np.testing.assert_allclose(weight_gc.sum(1).numpy(), 5000)
    # the mean of the data is preserved exactly by weighted centroids
    np.testing.assert_allclose((mean_gc * weight_gc).sum(1).numpy() / 5000,
                               mean_gm.mean(1).numpy(), rtol=1e-12)
    # tails stay fine-grained: the arcsine scale gives the first bucket a q-width of
    # (1 - cos(pi / 50)) / 2 ~ 0.001, i.e. ~5 of 5000 values; the middle ones ~ 5000 pi / 100
    nonempty = weight_gc[0][weight_gc[0] > 0]
    assert nonempty[0] <= 6 and nonempty[-1] <= 6
    assert nonempty.max() >= 100


def test_genes_without_nonzero_values_give_nan_and_bad_q_is_rejected(cells):
    model = TDigest(["a", "b"])
    model(torch.tensor([[0.0, 1.0], [0.0, 3.0]]))
    med = model.median_g.numpy()
    assert np.isnan(med[0]) and med[1] == 2.0
    with pytest.raises(ValueError, match="outside"):
        model.quantiles([1.5])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ctl.quantiles(cells[:50], q=(2.0,))
