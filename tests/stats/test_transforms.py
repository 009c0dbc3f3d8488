"""Per-batch transforms against scanpy, and gene filtering by name."""

import numpy as np
import pytest
import scanpy as sc
import torch
from stats_helpers import mouse

from cellsight.stats import Densify, Filter, Log1p, NormalizeTotal, ZScore
from cellsight.stats.transforms import apply_transforms, standard_transforms


@pytest.fixture(scope="module")
def cells():
    a = mouse(500, 100)
    return a


def test_normalize_log_zscore_match_scanpy(cells):
    ref = cells.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    logged = ref.X.toarray().astype(np.float64)
    sc.pp.scale(ref, max_value=5)
    x = torch.as_tensor(cells.X.toarray(), dtype=torch.float64)
    out = apply_transforms([NormalizeTotal(1e4), Log1p()], x)
    np.testing.assert_allclose(out.numpy(), logged, rtol=1e-6, atol=1e-6)
    z = ZScore(logged.mean(0), logged.std(0, ddof=1), cells.var_names, max_value=5)
    z.setup_genes(np.asarray(cells.var_names))
    np.testing.assert_allclose(z(out).numpy(), ref.X, rtol=1e-5, atol=1e-5)


def test_zero_total_cells_stay_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    np.testing.assert_allclose(NormalizeTotal(100)(x).numpy(), [[0, 0], [25, 75]])


def test_filter_reorders_and_handles_missing_genes():
    genes = np.array(["a", "b", "c"])
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    f = Filter(["c", "a"])
    assert list(f.setup_genes(genes)) == ["c", "a"]
    np.testing.assert_array_equal(f(x).numpy(), [[3, 1], [6, 4]])
    with pytest.raises(ValueError, match="1 gene\\(s\\) of filter_list are not in the data"):
        Filter(["c", "z"]).setup_genes(genes)
    fz = Filter(["z", "b"], missing="zero")
    assert list(fz.setup_genes(genes)) == ["z", "b"]
    np.testing.assert_array_equal(fz(x).numpy(), [[0, 2], [0, 5]])
    with pytest.raises(ValueError, match="duplicated"):
        Filter(["a", "a"])


def test_zscore_picks_statistics_by_gene_name_and_reads_csv(tmp_path):
    import pandas as pd

    path = tmp_path / "mv.csv"
    pd.DataFrame({"mean": [1.0, 2.0, 3.0], "std": [1.0, 0.0, 2.0]},
                 index=["a", "b", "c"]).to_csv(path)
    z = ZScore(stats_path=str(path))
    z.setup_genes(np.array(["c", "b"]))
    np.testing.assert_allclose(z(torch.tensor([[5.0, 2.5]])).numpy(), [[1.0, 0.5]])
    with pytest.raises(ValueError, match="no mean/std for 1 input gene"):
        z.setup_genes(np.array(["c", "d"]))
    with pytest.raises(ValueError, match="does not exist"):
        ZScore(stats_path=str(tmp_path / "missing.csv"))


def test_densify_and_standard_chain():
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_array_equal(Densify()(dense.to_sparse()).numpy(), dense.numpy())
    np.testing.assert_array_equal(Densify()(dense.to_sparse_csr()).numpy(), dense.numpy())
    chain = standard_transforms(10.0, True, ["b"])
    assert [type(t).__name__ for t in chain] == ["NormalizeTotal", "Log1p", "Filter"]


def test_a_model_rejects_transforms_that_end_on_other_genes(cells):
    from cellsight.stats import OnePassMeanVarStd, StatisticPlan

    model = OnePassMeanVarStd(cells.var_names[:10], output_path=None)
    with pytest.raises(ValueError, match="built for other genes|expects minibatches"):
        StatisticPlan(model, [Filter(cells.var_names[1:11])], cells.var_names)
