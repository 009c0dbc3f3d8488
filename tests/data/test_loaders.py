"""In-memory loader: exact coverage, seeded shuffles, rank splits, resume, registry arrays."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS as K

from cellsight.data import loaders as L
from cellsight.data.registry import register, setup_anndata
from toymodel import toy_adata


def _arrays(n=50, g=4):
    x = torch.arange(n * g, dtype=torch.float32).reshape(n, g)
    return {"X": x, "batch": torch.zeros(n, 1)}


def _cells(batches):
    return np.concatenate([b["X"][:, 0].numpy() / 4 for b in batches]).astype(int)


def test_every_cell_once_per_epoch_in_order_without_shuffle():
    loader = L.TensorBatchLoader(_arrays(), batch_size=8, distributed=False)
    assert len(loader) == 7
    np.testing.assert_array_equal(_cells(list(loader)), np.arange(50))


def test_shuffle_depends_only_on_seed_and_epoch():
    a = L.TensorBatchLoader(_arrays(), batch_size=8, shuffle=True, seed=3)
    b = L.TensorBatchLoader(_arrays(), batch_size=8, shuffle=True, seed=3)
    e0 = _cells(list(a))
    assert sorted(e0) == list(range(50))
    np.testing.assert_array_equal(e0, _cells(list(b)))
    np.testing.assert_array_equal(e0, _cells(list(a)))  # same epoch, same order
    a.set_epoch(1)
    e1 = _cells(list(a))
    assert sorted(e1) == list(range(50)) and not np.array_equal(e0, e1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_cover_all_cells_without_overlap_when_not_padded(world):
    order = np.random.default_rng(0).permutation(50)
    parts = [L.rank_slice(order, r, world, pad=False) for r in range(world)]
    joined = np.concatenate(parts)
    assert len(joined) == 50 and set(joined) == set(range(50))


@pytest.mark.parametrize("world", [2, 3])
def test_padded_rank_slices_have_equal_length_and_cover_all_cells(world):
    order = np.arange(50)
    parts = [L.rank_slice(order, r, world, pad=True) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    assert set(np.concatenate(parts)) == set(range(50))
    assert sum(map(len, parts)) - 50 < world  # at most world-1 repeats


def test_resume_mid_epoch_serves_exactly_the_remaining_batches():
    loader = L.TensorBatchLoader(_arrays(), batch_size=8, shuffle=True, seed=1)
    loader.set_epoch(2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = list(it)
    resumed = L.TensorBatchLoader(_arrays(), batch_size=8, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(_cells(list(resumed)), _cells(rest))
    assert sorted(np.concatenate([_cells(first), _cells(rest)])) == list(range(50))
    # after the resumed epoch the loader serves whole epochs again
    assert len(_cells(list(resumed))) == 50


def test_drop_last_drops_the_short_batch():
    loader = L.TensorBatchLoader(_arrays(), batch_size=8, drop_last=True, distributed=False)
    assert len(loader) == 6 and len(_cells(list(loader))) == 48


def test_sparse_x_gives_the_same_minibatches_as_dense():
    x = np.random.default_rng(0).poisson(0.3, (40, 7)).astype(np.float32)
    dense = L.TensorBatchLoader({"X": torch.from_numpy(x)}, batch_size=16)
    sparse = L.TensorBatchLoader({"X": sp.csr_matrix(x)}, batch_size=16)
    for a, b in zip(dense, sparse):
        assert torch.equal(a["X"], b["X"])


def test_registry_arrays_match_the_anndata():
    adata = toy_adata(n_cells=30, n_genes=5)
    adata.X = sp.csr_matrix(adata.X)
    args = setup_anndata(
        adata, "Toy", batch_key="batch", categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["age"],
    )
    arrays = L.registry_arrays(register(adata, args, "Toy"))
    np.testing.assert_array_equal(arrays[K.X_KEY].numpy(), adata.X.toarray())
    codes = adata.obs["batch"].astype("category").cat.codes.to_numpy()
    np.testing.assert_array_equal(arrays[K.BATCH_KEY].numpy()[:, 0], codes)
    np.testing.assert_allclose(arrays[K.CONT_COVS_KEY].numpy()[:, 0], adata.obs["age"], rtol=1e-6)
    assert arrays[K.CAT_COVS_KEY].shape == (30, 1)
