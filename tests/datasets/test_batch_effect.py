"""simulate_batch_effect: planted per-gene effects and depths recovered from the counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from cellsight.datasets import pbmc68k_reduced, simulate_batch_effect


@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k_reduced()


def test_planted_per_gene_ratios_are_recovered_from_the_resampled_counts(pbmc):
    out = simulate_batch_effect(pbmc, sigma=0.7, depth_sigma=0.3, seed=1)
    x = out.X.toarray()
    assert sp.issparse(out.X) and np.array_equal(x, np.round(x)) and (x.sum(1) > 0).all()
    b = out.obs["batch"].to_numpy() == "batch1"
    # the original counts' mean of each gene in each group (cells were assigned at random,
    # so the groups differ by chance as well): the effect is measured against them
    x0 = pbmc.X.toarray()
    expressed = (x0[b].sum(0) > 20) & (x0[~b].sum(0) > 20)
    x, x0 = x[:, expressed], x0[:, expressed]
    observed_g = np.log(x[b].sum(0) / x0[b].sum(0)) - np.log(x[~b].sum(0) / x0[~b].sum(0))
    effect_gb, depth_b = out.varm["batch_effect"][expressed], out.uns["batch_depth"]
    planted_g = np.log(effect_gb[:, 1] * depth_b[1]) - np.log(effect_gb[:, 0] * depth_b[0])
    # Poisson noise on >= 20 counts per group: sd of a log ratio <= sqrt(2/20) ~ 0.32, against
    # a planted spread of 0.7 * sqrt(2) ~ 1: correlation well above 0.9
    r = np.corrcoef(observed_g, planted_g)[0, 1]
    assert expressed.sum() > 200 and r > 0.9


def test_input_is_not_modified_and_the_result_is_seeded(pbmc):
    before = pbmc.X.copy()
    a = simulate_batch_effect(pbmc, n_batches=3, seed=4)
    b = simulate_batch_effect(pbmc, n_batches=3, seed=4)
    c = simulate_batch_effect(pbmc, n_batches=3, seed=5)
    assert (pbmc.X != before).nnz == 0 and "batch" not in pbmc.obs
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert list(a.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert a.varm["batch_effect"].shape == (pbmc.n_vars, 3) and a.uns["batch_depth"].shape == (3,)
    # zero counts stay zero: the biology (who expresses what) is the original one
    assert set(zip(*a.X.nonzero())) <= set(zip(*pbmc.X.nonzero()))


def test_dense_and_sparse_input_and_a_layer_give_the_same_counts(pbmc):
    sparse = simulate_batch_effect(pbmc, seed=2)
    dense = AnnData(X=pbmc.X.toarray(), obs=pbmc.obs, var=pbmc.var)
    layered = AnnData(X=np.zeros(pbmc.shape), obs=pbmc.obs, var=pbmc.var,
                      layers={"counts": pbmc.X.copy()})
    for other in (simulate_batch_effect(dense, seed=2),
                  simulate_batch_effect(layered, layer="counts", seed=2)):
        assert (sparse.X != other.X).nnz == 0


def test_a_cell_whose_counts_all_vanish_keeps_one_count_in_its_largest_gene():
    # one count per cell and no effect (sigma = depth_sigma = 0): Poisson(1) is 0 in 37% of
    # the 200 cells (P[no such cell] = 0.63**200 ~ 1e-40); each gets its one count back
    x = np.zeros((200, 3))
    x[:, 1] = 1.0
    res = simulate_batch_effect(AnnData(X=x), n_batches=1, sigma=0.0, depth_sigma=0.0,
                                seed=0).X.toarray()
    assert (res[:, 1] >= 1).all() and (res[:, [0, 2]] == 0).all()
    assert (res[:, 1] == 1).mean() > 0.37 + 0.1  # the refilled cells plus Poisson's own ones


def test_bad_input_is_rejected_with_the_fix():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="non-negative integer counts"):
        simulate_batch_effect(AnnData(X=x * 0.5))
    with pytest.raises(ValueError, match="non-negative integer counts"):
        simulate_batch_effect(AnnData(X=-x))
    with pytest.raises(ValueError, match="layer='missing'"):
        simulate_batch_effect(AnnData(X=x), layer="missing")
    with pytest.raises(ValueError, match="n_batches"):
        simulate_batch_effect(AnnData(X=x), n_batches=0)
    with pytest.raises(ValueError, match="sigma"):
        simulate_batch_effect(AnnData(X=x), sigma=-1.0)
    with pytest.raises(ValueError, match="empty"):
        simulate_batch_effect(AnnData(X=np.zeros((0, 3))))
