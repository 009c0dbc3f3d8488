"""``read_shards`` orders the categories of obs columns as the AnnData the shards came from."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellsight.data import read_shards
from cellsight.data.shards import merge_category_orders

ORDER = ["naive", "memory", "effector", "Unknown"]  # a deliberate, non-alphabetical order


def _cells() -> ad.AnnData:
    labels = ["memory", "naive", "memory", "effector", "naive", "Unknown"]
    obs = pd.DataFrame(
        {"state": pd.Categorical(labels, categories=ORDER)},
        index=[f"c{i}" for i in range(len(labels))],
    )
    x = sp.csr_matrix(np.arange(len(labels) * 3, dtype=np.float32).reshape(-1, 3))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))


def test_read_shards_keeps_the_order_when_a_shard_lacks_a_category(tmp_path):
    """Shard 0 (cells 0-2) has no 'effector' and no 'Unknown' cell: AnnData drops them when the
    shard is written, yet the stub gets the original order (not 'effector' after the rest)."""
    cells = _cells()
    paths = []
    for k, (lo, hi) in enumerate([(0, 3), (3, 6)]):
        paths.append(str(tmp_path / f"s{k}.h5ad"))
        cells[lo:hi].copy().write_h5ad(paths[-1])
    assert list(ad.read_h5ad(paths[0]).obs["state"].cat.categories) == ["naive", "memory"]
    stub = read_shards(paths)
    assert list(stub.obs["state"].cat.categories) == ORDER
    assert list(stub.obs["state"].astype(str)) == list(cells.obs["state"].astype(str))


def test_merge_keeps_every_shards_order_and_breaks_ties_by_first_appearance():
    assert merge_category_orders([["b", "d"], ["a", "b", "c", "d"]]) == ["a", "b", "c", "d"]
    # 'x' and 'a' are never in one shard: the one seen first comes first; 'y' waits for 'a'
    assert merge_category_orders([["x"], ["y"], ["a", "y"]]) == ["x", "a", "y"]
    assert merge_category_orders([[3, 1], [1, 2]]) == [3, 1, 2]
    assert merge_category_orders([]) == []


def test_merge_of_contradictory_orders_still_gives_each_category_once():
    merged = merge_category_orders([["a", "b"], ["b", "a"], ["c"]])
    assert sorted(merged) == ["a", "b", "c"] and len(merged) == 3
    assert merged.index("a") < merged.index("b")  # the first-seen category is released first
