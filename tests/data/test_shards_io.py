"""Sharded data: the stub, schema checks, values equal to the in-memory rows, value checks."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS as K
from shard_helpers import cut, mouse_cells, write_shards

from cellsight.data import ShardedDataModule, is_sharded, read_shards, validate_shards
from cellsight.data.loaders import registry_arrays
from cellsight.data.registry import register, setup_anndata
from cellsight.data.shards_io import ShardReader
from cellsight.data.shards_loader import obs_arrays

SETUP = dict(
    batch_key="batch", labels_key="label", unlabeled_category="unknown",
    categorical_covariate_keys=["donor"], continuous_covariate_keys=["age"], size_factor_key="sf",
)


@pytest.fixture
def cells():
    return mouse_cells(n_cells=300, n_genes=120)


def _set(adata, i, j, value):
    x = adata.X.tolil()
    x[i, j] = value
    adata.X = x.tocsr()


def _all_batches(dm, loader="predict_dataloader"):
    return list(getattr(dm, loader)())


def test_stub_has_all_obs_shard0_var_and_a_zero_matrix_that_costs_nothing(cells, tmp_path):
    paths = write_shards(cells, tmp_path, cut(300, 3))
    stub = read_shards(paths)
    assert is_sharded(stub) and not is_sharded(cells)
    assert stub.shape == cells.shape
    pd.testing.assert_index_equal(stub.obs_names, cells.obs_names)
    pd.testing.assert_index_equal(stub.var_names, cells.var_names)
    np.testing.assert_array_equal(stub.obs["batch"].astype(str), cells.obs["batch"])
    np.testing.assert_allclose(stub.obs["age"], cells.obs["age"])
    assert sp.issparse(stub.X) and stub.X.nnz == 0


def test_categories_are_the_union_over_all_shards(cells, tmp_path):
    cells.obs["site"] = pd.Categorical(["A"] * 100 + ["B"] * 100 + ["C"] * 100)
    paths = write_shards(cells, tmp_path, [(0, 100), (100, 200), (200, 300)])
    stub = read_shards(paths)
    assert list(stub.obs["site"].cat.categories) == ["A", "B", "C"]
    np.testing.assert_array_equal(stub.obs["site"].astype(str), cells.obs["site"].astype(str))


def test_repeated_cell_names_get_a_shard_suffix(cells, tmp_path):
    a, b = cells[:50].copy(), cells[:40].copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    stub = read_shards([tmp_path / "a.h5ad", tmp_path / "b.h5ad"])
    assert stub.obs_names.is_unique
    assert stub.obs_names[0] == f"{a.obs_names[0]}-0"
    assert stub.obs_names[50] == f"{b.obs_names[0]}-1"


def test_shard_with_other_genes_is_rejected_naming_shard_and_genes(cells, tmp_path):
    cells[:100].copy().write_h5ad(tmp_path / "a.h5ad")
    cells[100:, 1:].copy().write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match=r"Shard 1 .*b\.h5ad.*1 gene\(s\) of shard 0 are missing"):
        read_shards([tmp_path / "a.h5ad", tmp_path / "b.h5ad"])


def test_shard_with_genes_in_another_order_is_rejected(cells, tmp_path):
    cells[:100].copy().write_h5ad(tmp_path / "a.h5ad")
    order = np.r_[1, 0, 2 : cells.n_vars]
    cells[100:, order].copy().write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match="another order.*position 0"):
        read_shards([tmp_path / "a.h5ad", tmp_path / "b.h5ad"])


def test_shard_missing_an_obs_column_is_rejected(cells, tmp_path):
    cells[:100].copy().write_h5ad(tmp_path / "a.h5ad")
    b = cells[100:].copy()
    del b.obs["donor"]
    b.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match=r"Shard 1 .*lacks obs column\(s\) \['donor'\]"):
        read_shards([tmp_path / "a.h5ad", tmp_path / "b.h5ad"])


def test_csc_shard_and_missing_layer_are_rejected(cells, tmp_path):
    c = cells[:50].copy()
    c.X = sp.csc_matrix(c.X)
    c.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC"):
        read_shards([tmp_path / "csc.h5ad"])
    cells[:50].copy().write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="no layer 'counts'"):
        read_shards([tmp_path / "a.h5ad"], layer="counts")


def test_minibatches_equal_the_in_memory_registry_rows(cells, tmp_path):
    """Every key of every minibatch equals the in-memory loader's arrays for those cells."""
    paths = write_shards(cells, tmp_path, cut(300, 3))
    stub = read_shards(paths)
    manager = register(stub, setup_anndata(stub, "Toy", **SETUP), "Toy")
    mem = registry_arrays(register(cells, setup_anndata(cells, "Toy", **SETUP), "Toy"))
    dm = ShardedDataModule(stub, manager, batch_size=37, block_size=8, buffer_blocks=3,
                           train_size=0.8, return_indices=True)
    n = 0
    for batch in list(dm.train_dataloader()) + list(dm.val_dataloader()):
        idx = batch[K.INDICES_KEY][:, 0].numpy()
        assert set(batch) == set(mem) | {K.INDICES_KEY}
        for key, arr in mem.items():
            assert batch[key].dtype == torch.float32
            np.testing.assert_array_equal(batch[key].numpy(), arr[idx].numpy(), err_msg=key)
        n += len(idx)
    assert n == dm.n_train + dm.n_validation


def test_obs_codes_follow_the_registry_of_another_anndata(cells, tmp_path):
    """A manager registered on other data encodes the shards with its own category order."""
    ref = cells[:120].copy()
    ref.obs["batch"] = pd.Categorical(ref.obs["batch"], categories=["b2", "b0", "b1"])
    manager = register(ref, setup_anndata(ref, "Toy", batch_key="batch"), "Toy")
    stub = read_shards(write_shards(cells, tmp_path, cut(300, 2)))
    codes = obs_arrays(stub.obs, manager)[K.BATCH_KEY][:, 0]
    expect = cells.obs["batch"].map({"b2": 0, "b0": 1, "b1": 2}).to_numpy()
    np.testing.assert_array_equal(codes, expect)


def test_unknown_category_for_a_foreign_registry_is_rejected(cells, tmp_path):
    ref = cells[:120].copy()
    ref.obs["batch"] = "b0"
    manager = register(ref, setup_anndata(ref, "Toy", batch_key="batch"), "Toy")
    stub = read_shards(write_shards(cells, tmp_path, cut(300, 2)))
    with pytest.raises(ValueError, match="categories the model was not trained with"):
        obs_arrays(stub.obs, manager)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_shards_serve_the_same_minibatches_as_h5ad(cells, tmp_path, zarr_format):
    h5 = read_shards(write_shards(cells, tmp_path, cut(300, 3)))
    with ad.settings.override(zarr_write_format=zarr_format):
        zr = read_shards(write_shards(cells, tmp_path, cut(300, 3), fmt="zarr", name="z"))
    kw = dict(batch_key="batch", batch_size=40, block_size=8, buffer_blocks=2, seed=5)
    a = list(ShardedDataModule(h5, **kw).train_dataloader())
    b = list(ShardedDataModule(zr, **kw).train_dataloader())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["X"].numpy(), y["X"].numpy())
        np.testing.assert_array_equal(x["batch"].numpy(), y["batch"].numpy())


def test_dense_shards_and_layers_are_streamed(cells, tmp_path):
    dense = cells.copy()
    dense.X = np.asarray(cells.X.toarray()) / 2.0  # X: not counts
    dense.layers["counts"] = cells.X.toarray()
    stub = read_shards(write_shards(dense, tmp_path, cut(300, 2)), layer="counts")
    batches = _all_batches(ShardedDataModule(stub, return_indices=True, batch_size=64))
    x = np.concatenate([b["X"].numpy() for b in batches])
    idx = np.concatenate([b["ind_x"][:, 0].numpy() for b in batches])
    np.testing.assert_array_equal(idx, np.arange(300))
    np.testing.assert_array_equal(x, cells.X.toarray())
    # a model set up with layer="counts" on the stub streams the same layer
    manager = register(stub, setup_anndata(stub, "Toy", layer="counts"), "Toy")
    dm = ShardedDataModule(stub, manager, batch_size=300, shuffle=False)
    np.testing.assert_array_equal(next(iter(dm.train_dataloader()))["X"].numpy(), x)


def test_reading_a_minibatch_reads_only_its_rows_not_the_file(cells, tmp_path):
    paths = write_shards(cells, tmp_path, [(0, 300)])
    stub = read_shards(paths)
    reader = ShardReader(paths, [300], None, stub.var_names)
    x = reader.read(np.arange(100, 132))
    np.testing.assert_array_equal(x.toarray(), cells.X[100:132].toarray())
    rows_bytes = cells.X[100:132].nnz * 8 + 33 * 4  # float32 data + int32 indices + indptr
    assert reader.bytes_read <= rows_bytes * 2  # exact up to the int64/int32 indptr width
    assert reader.bytes_read < cells.X.nnz * 8 / 5


def test_validate_shards_summarises_every_shard(cells, tmp_path):
    bounds = cut(300, 3)
    table = validate_shards(write_shards(cells, tmp_path, bounds))
    assert list(table["n_obs"]) == [b - a for a, b in bounds]
    assert list(table["nnz"]) == [cells.X[a:b].nnz for a, b in bounds]
    assert table["max"].max() == cells.X.max()


def test_validate_shards_names_the_first_non_count_value(cells, tmp_path):
    bad = cells.copy()
    _set(bad, 250, 3, 1.5)
    paths = write_shards(bad, tmp_path, [(0, 150), (150, 300)])
    validate_shards(paths, require_counts=False)  # finite values pass without counts
    with pytest.raises(ValueError, match=(
        rf"s1\.h5ad.*1 non-integer value\(s\) \(first at cell '{bad.obs_names[250]}', "
        rf"gene '{bad.var_names[3]}'\)"
    )):
        validate_shards(paths)


def test_streaming_rejects_negative_counts_in_the_first_bad_chunk(cells, tmp_path):
    bad = cells.copy()
    _set(bad, 10, 0, -2)
    stub = read_shards(write_shards(bad, tmp_path, [(0, 300)]))
    ok = ShardedDataModule(stub, batch_size=50)  # no count check requested: streams
    assert len(list(ok.predict_dataloader())) == 6
    dm = ShardedDataModule(stub, batch_size=50, require_counts=True, likelihood="nb")
    with pytest.raises(ValueError, match=r"negative value\(s\).*'nb' likelihood needs raw counts"):
        list(dm.predict_dataloader())


def test_nan_is_rejected_while_streaming_even_without_count_checks(cells, tmp_path):
    bad = cells.copy()
    _set(bad, 5, 5, np.nan)
    stub = read_shards(write_shards(bad, tmp_path, [(0, 300)]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        list(ShardedDataModule(stub).predict_dataloader())


def test_subsetting_a_stub_is_caught(cells, tmp_path):
    stub = read_shards(write_shards(cells, tmp_path, cut(300, 2)))
    with pytest.raises(ValueError, match="do not subset a sharded stub"):
        ShardedDataModule(stub[:10].copy())


def test_stub_survives_an_h5ad_round_trip(cells, tmp_path):
    stub = read_shards(write_shards(cells, tmp_path, cut(300, 2)))
    stub.write_h5ad(tmp_path / "stub.h5ad")
    back = ad.read_h5ad(tmp_path / "stub.h5ad")
    assert is_sharded(back)
    a = list(ShardedDataModule(back, batch_size=100).predict_dataloader())
    np.testing.assert_array_equal(a[0]["X"].numpy(), cells.X[:100].toarray())
