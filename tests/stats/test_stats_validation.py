"""Bad arguments of cellsight.pp / cellsight.tl and the stats transforms fail clearly and early.

"Early" is checked by replacing ``fit_statistic`` with a function that fails the test: the
error must come before any pass over the data starts.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from stats_helpers import mouse, write_shards

import cellsight.pp as cpp
import cellsight.tl as ctl
from cellsight.stats import Log1p, NormalizeTotal, OnePassMeanVarStd, ZScore
from cellsight.stats.transforms import apply_transforms, bind_transforms, standard_transforms


@pytest.fixture(scope="module")
def cells():
    return mouse(300, 40)


@pytest.fixture
def no_pass(monkeypatch):
    """Make any data pass of pp / tl fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a data pass started before the arguments were checked")

    monkeypatch.setattr(cpp, "fit_statistic", fail)
    monkeypatch.setattr(ctl, "fit_statistic", fail)


def _negated(cells, rows=slice(None)):
    """``cells`` with the values of ``rows`` negated (e.g. scaled data passed by mistake)."""
    out = cells.copy()
    x = out.X.toarray()
    x[rows] = -x[rows]
    out.X = sp.csr_matrix(x)
    return out


# ----------------------------------------------------------------------------- log1p / totals
@pytest.mark.parametrize("sparse", [False, True])
def test_log1p_rejects_negative_values_dense_and_sparse(sparse):
    x = torch.tensor([[0.0, 2.0], [-0.5, 1.0]], dtype=torch.float64)
    if sparse:
        x = x.to_sparse_csr()
    with pytest.raises(ValueError, match=r"log1p needs non-negative input.*1 negative value"):
        Log1p()(x)


def test_normalize_total_rejects_negative_values_that_would_flip_signs():
    # an all-negative cell has a negative total: scaling would make it positive, so a later
    # log1p could not see the problem; normalize_total refuses it itself
    x = torch.tensor([[-1.0, -3.0], [1.0, 3.0]])
    with pytest.raises(ValueError, match="normalize_total needs non-negative input"):
        apply_transforms([NormalizeTotal(100), Log1p()], x)


def test_pp_mean_var_log1p_rejects_negative_data(cells):
    with pytest.raises(ValueError, match=r"log1p needs non-negative.*log1p=False"):
        cpp.mean_var(_negated(cells), log1p=True)


def test_pp_mean_var_log1p_rejects_negatives_in_a_later_minibatch(cells):
    # only the last cells are negative: the error comes at their minibatch, before a result
    with pytest.raises(ValueError, match="log1p needs non-negative"):
        cpp.mean_var(_negated(cells, slice(250, None)), log1p=True, batch_size=100)


def test_pp_mean_var_log1p_rejects_negatives_in_a_later_shard(cells, tmp_path):
    paths = write_shards(_negated(cells, slice(200, None)), tmp_path, [(0, 200), (200, 300)])
    with pytest.raises(ValueError, match="log1p needs non-negative"):
        cpp.mean_var(paths, log1p=True, batch_size=64)


def test_normalize_total_then_log1p_rejects_negative_data(cells):
    with pytest.raises(ValueError, match="normalize_total needs non-negative"):
        cpp.mean_var(_negated(cells), normalize_total=1e4, log1p=True)


def test_tl_pca_and_quantiles_log1p_reject_negative_data(cells):
    bad = _negated(cells)
    with pytest.raises(ValueError, match="log1p needs non-negative"):
        ctl.pca(bad, n_components=3, log1p=True)
    with pytest.raises(ValueError, match="log1p needs non-negative"):
        ctl.quantiles(bad, q=0.5, log1p=True)


def test_log1p_still_accepts_non_negative_data(cells):
    df = cpp.mean_var(cells, log1p=True)
    x = np.log1p(cells.X.toarray().astype(np.float64))
    np.testing.assert_allclose(df["mean"], x.mean(0), rtol=1e-6)


# ----------------------------------------------------------------------------- ddof
@pytest.mark.parametrize("ddof, err, match", [
    (-1, ValueError, "ddof=-1 must be >= 0"),
    (1.5, TypeError, "must be an integer >= 0"),
    (True, TypeError, "must be an integer >= 0"),
])
def test_pp_mean_var_rejects_bad_ddof_before_the_pass(cells, no_pass, ddof, err, match):
    with pytest.raises(err, match=match):
        cpp.mean_var(cells, ddof=ddof)


def test_pp_mean_var_rejects_ddof_of_at_least_n_cells_before_the_pass(cells, no_pass):
    with pytest.raises(ValueError, match="ddof=300 leaves no degrees of freedom.*300 cells"):
        cpp.mean_var(cells, ddof=300)


def test_ddof_matches_numpy_and_small_batches_get_nan_with_a_warning():
    """Batch 'a' has 1 cell, 'b' 5: with ddof=1 'a' has no degree of freedom (NaN, as
    pandas; numpy warns "Degrees of freedom <= 0"), 'b' and the pooled columns are numpy's
    (rtol 1e-10: float64 sums of 6 small values)."""
    x = np.array([[1, 0], [2, 4], [0, 1], [5, 5], [3, 0], [1, 2]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = ["g0", "g1"]
    adata.obs["batch"] = pd.Categorical(["a", "b", "b", "b", "b", "b"])
    with pytest.warns(RuntimeWarning, match="ddof=1 leaves no degrees of freedom for batch 'a'"):
        df = cpp.mean_var(adata, batch_key="batch", ddof=1)
    x = x.astype(np.float64)
    np.testing.assert_allclose(df["var"], x.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(df["var_b"], x[1:].var(0, ddof=1), rtol=1e-10)
    assert df["var_a"].isna().all() and df["std_a"].isna().all()
    np.testing.assert_allclose(df["mean_a"], x[0], rtol=1e-10)  # the mean is still defined


def test_to_dataframe_rejects_bad_ddof_and_gives_nan_when_n_le_ddof():
    model = OnePassMeanVarStd(["a", "b"], output_path=None)
    model(torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="ddof=-1 must be >= 0"):
        model.to_dataframe(ddof=-1)
    with pytest.raises(TypeError, match="must be an integer >= 0"):
        model.to_dataframe(ddof=0.5)
    with pytest.warns(RuntimeWarning, match="all cells"):
        df = model.to_dataframe(ddof=2)  # n == ddof: numpy divides by zero
    assert df["var"].isna().all()
    np.testing.assert_allclose(model.to_dataframe(ddof=1)["var"], [2.0, 4.5])


# ----------------------------------------------------------------------------- tl.pca
def test_tl_pca_rejects_more_components_than_cells_naming_n_obs(cells, no_pass):
    with pytest.raises(ValueError, match=r"n_components=20 is more than the number of cells "
                                         r"\(n_obs=10\)"):
        ctl.pca(cells[:10].copy(), n_components=20)


def test_tl_pca_rejects_more_components_than_genes(cells, no_pass):
    with pytest.raises(ValueError, match=r"n_components=5 is more than the number of genes \(3\)"):
        ctl.pca(cells, n_components=5, genes=list(cells.var_names[:3]))


@pytest.mark.parametrize("n", [2.5, True])
def test_tl_pca_rejects_non_integer_n_components(cells, no_pass, n):
    with pytest.raises(TypeError, match="n_components=.* must be an integer"):
        ctl.pca(cells, n_components=n)


@pytest.mark.parametrize("max_value", [-1, 0, float("nan")])
def test_tl_pca_rejects_non_positive_max_value_before_the_pass(cells, no_pass, max_value):
    with pytest.raises(ValueError, match="max_value=.* must be > 0"):
        ctl.pca(cells, n_components=3, zscore=True, max_value=max_value)


def test_tl_pca_rejects_max_value_without_zscore(cells, no_pass):
    with pytest.raises(ValueError, match="max_value=2.0 clips z-scores, but zscore=False"):
        ctl.pca(cells, n_components=3, max_value=2)


def test_zscore_rejects_non_positive_max_value():
    with pytest.raises(ValueError, match="max_value=0 must be > 0"):
        ZScore([0.0], [1.0], ["a"], max_value=0)
    with pytest.raises(TypeError, match="max_value must be a number"):
        ZScore([0.0], [1.0], ["a"], max_value="5")


def test_tl_pca_reports_an_unknown_gene_before_n_components(cells, no_pass):
    with pytest.raises(ValueError, match=r"1 gene\(s\) of filter_list are not in the data "
                                         r"\('nope'\)"):
        ctl.pca(cells, n_components=3, genes=["nope"])


def test_bind_transforms_returns_output_genes_and_rejects_unknown_genes():
    chain = standard_transforms(1e4, True, ["c", "a"])
    assert list(bind_transforms(chain, np.array(["a", "b", "c"]))) == ["c", "a"]
    with pytest.raises(ValueError, match="'z'"):
        bind_transforms(standard_transforms(genes=["z"]), np.array(["a"]))


# ----------------------------------------------------------------------------- tl.quantiles
def test_tl_quantiles_accepts_a_scalar_q_like_a_one_element_list(cells):
    one = ctl.quantiles(cells, q=0.5)
    listed = ctl.quantiles(cells, q=[0.5])
    pd.testing.assert_frame_equal(one, listed)
    assert list(one.columns) == [0.5]


@pytest.mark.parametrize("q, err, match", [
    ("0.5", TypeError, "q must be a number or a sequence"),
    ([0.5, True], TypeError, "q must hold numbers"),
    ([], ValueError, "q is empty"),
    (1.5, ValueError, r"must hold values in \[0, 1\], but 1.5 is outside"),
    (float("nan"), ValueError, "nan is outside"),
])
def test_tl_quantiles_rejects_bad_q_before_the_pass(cells, no_pass, q, err, match):
    with pytest.raises(err, match=match):
        ctl.quantiles(cells, q=q)


def test_hvg_count_errors_name_the_selection_not_a_model_likelihood():
    import cellsight

    a = cellsight.datasets.pbmc68k_reduced()[:60].copy()
    a.X = -a.X
    with pytest.raises(ValueError, match="Seurat v3 highly variable gene selection needs raw") as e:
        cellsight.pp.highly_variable_genes(a, n_top_genes=10)
    assert "gene_likelihood" not in str(e.value)
