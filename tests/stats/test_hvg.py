"""Seurat v3 HVG: the same gene sets as scanpy on the bundled mouse 10k counts."""

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from stats_helpers import mouse

import cellsight.pp as cpp
from cellsight.stats import HVGSeuratV3, fit_statistic, stream_data


@pytest.fixture(scope="module")
def cells():
    return mouse()  # all 10,000 cells x 1,000 genes


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
@pytest.mark.parametrize("batch_key", [None, "sample"])
def test_hvg_matches_scanpy_gene_set(cells, flavor, batch_key):
    """Jaccard 1.0 with scanpy, ranks equal, statistics to 1e-10 (float64 both sides).

    The boundary at 300 genes falls inside a group of genes tied on normalised variance
    (single-count genes); the set still agrees because tied genes tie exactly here too and
    are ordered by the same sort."""
    ours, ref = cells.copy(), cells.copy()
    df = cpp.highly_variable_genes(ours, 300, flavor=flavor, batch_key=batch_key,
                                   batch_size=700)
    sc.pp.highly_variable_genes(ref, n_top_genes=300, flavor=flavor, batch_key=batch_key)
    assert _jaccard(ours.var_names[ours.var["highly_variable"]],
                    ref.var_names[ref.var["highly_variable"]]) == 1.0
    cols = ["means", "variances", "variances_norm"]
    np.testing.assert_allclose(ours.var[cols].to_numpy(), ref.var[cols].to_numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(ours.var["highly_variable_rank"].to_numpy(),
                                  ref.var["highly_variable_rank"].to_numpy())
    if batch_key is not None:
        np.testing.assert_array_equal(ours.var["highly_variable_nbatches"],
                                      ref.var["highly_variable_nbatches"])
    else:
        assert "highly_variable_nbatches" not in df
    assert ours.uns["hvg"] == {"flavor": flavor}
    assert df["highly_variable"].sum() == 300


def test_several_n_top_genes_in_one_run_and_csv_output(cells, tmp_path):
    src = stream_data(cells, batch_key="sample", batch_size=2000)
    out = tmp_path / "hvg.csv"
    model = HVGSeuratV3(src.var_names_g, [100, 500], n_batch=3, use_batch_key=True,
                        output_path=str(out))
    fit_statistic(model, src.datamodule, input_var_names_g=src.var_names_g)
    for n in (100, 500):
        ref = sc.pp.highly_variable_genes(cells.copy(), n_top_genes=n, flavor="seurat_v3",
                                          batch_key="sample", inplace=False)
        got = model.hvg_dfs[n]
        assert _jaccard(got.index[got["highly_variable"]], ref.index[ref["highly_variable"]]) == 1
    table = pd.read_csv(out, index_col=0)
    assert table["highly_variable_100"].sum() == 100 and table["highly_variable_500"].sum() == 500


def test_n_batch_minimum_keeps_only_genes_variable_in_enough_batches(cells):
    src = stream_data(cells, batch_key="sample", batch_size=5000)
    model = HVGSeuratV3(src.var_names_g, 200, n_batch=3, use_batch_key=True, output_path=None,
                        n_batch_minimum=3)
    fit_statistic(model, src.datamodule, input_var_names_g=src.var_names_g)
    df = model.hvg_df
    assert (df.loc[df["highly_variable"], "highly_variable_nbatches"] == 3).all()
    assert df["highly_variable"].sum() == min(200, int((df["highly_variable_nbatches"] == 3).sum()))


def test_hvg_rejects_non_counts_and_unfinished_fits(cells):
    bad = cells[:300].copy()
    bad.X = bad.X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        cpp.highly_variable_genes(bad, 50)
    model = HVGSeuratV3(cells.var_names, 10, output_path=None)
    model(torch.ones(4, cells.n_vars))
    with pytest.raises(ValueError, match="two passes"):
        _ = model.hvg_df
    with pytest.raises(ValueError, match="larger than the number of genes"):
        HVGSeuratV3(["a", "b"], 5)
    with pytest.raises(ValueError, match="flavor"):
        HVGSeuratV3(cells.var_names, 5, flavor="cell_ranger")
