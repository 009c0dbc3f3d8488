"""Bad input is rejected at set-up / query time with a ValueError that names problem and fix."""

import copy

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from cellsight.data.registry import SETUP_UNS_KEY
from cellsight.data.validate import check_query_genes, describe_gene_difference
from toymodel import ToyModel, toy_adata


@pytest.fixture
def adata():
    return toy_adata(n_cells=60, n_genes=12)


@pytest.fixture
def trained(adata):
    ToyModel.setup_anndata(adata, batch_key="batch")
    model = ToyModel(adata)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model


def test_nan_in_counts_is_rejected_with_location(adata):
    adata.X[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or infinite.*cell3.*gene5"):
        ToyModel.setup_anndata(adata)


def test_inf_in_sparse_counts_is_rejected(adata):
    x = adata.X.copy()
    x[7, 2] = np.inf
    adata.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match=r"NaN or infinite.*cell7.*gene2"):
        ToyModel.setup_anndata(adata)


def test_negative_counts_are_rejected_by_count_model(adata):
    adata.X[2, 1] = -1.0
    ToyModel.setup_anndata(adata)  # structure is fine; the count model needs counts
    with pytest.raises(ValueError, match=r"negative value.*cell2.*gene1.*layer='counts'"):
        ToyModel(adata)


def test_non_integer_counts_are_rejected_by_count_model(adata):
    adata.X = np.log1p(adata.X)
    ToyModel.setup_anndata(adata)
    with pytest.raises(ValueError, match=r"non-integer value.*raw integer counts"):
        ToyModel(adata)


def test_non_integer_counts_in_sparse_layer_are_rejected(adata):
    adata.layers["counts"] = sp.csr_matrix(adata.X * 0.5)
    ToyModel.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] has .* non-integer"):
        ToyModel(adata)


def test_missing_obs_key_is_rejected(adata):
    with pytest.raises(ValueError, match=r"batch_key='sample' is not a column of adata.obs"):
        ToyModel.setup_anndata(adata, batch_key="sample")


def test_missing_covariate_key_is_rejected(adata):
    with pytest.raises(ValueError, match=r"categorical_covariate_keys='site'"):
        ToyModel.setup_anndata(adata, categorical_covariate_keys=["donor", "site"])


def test_missing_layer_is_rejected(adata):
    with pytest.raises(ValueError, match=r"layer='counts' is not in adata.layers"):
        ToyModel.setup_anndata(adata, layer="counts")


def test_empty_anndata_zero_cells_is_rejected(adata):
    with pytest.raises(ValueError, match=r"empty \(0 cells x 12 genes\)"):
        ToyModel.setup_anndata(adata[:0].copy())


def test_empty_anndata_zero_genes_is_rejected(adata):
    with pytest.raises(ValueError, match=r"empty \(60 cells x 0 genes\)"):
        ToyModel.setup_anndata(adata[:, :0].copy())


def test_duplicate_var_names_are_rejected(adata):
    names = list(adata.var_names)
    names[4] = names[3]
    adata.var_names = names
    with pytest.raises(ValueError, match=r"duplicated name.*'gene3'.*var_names_make_unique"):
        ToyModel.setup_anndata(adata)


def test_missing_labels_values_are_rejected(adata):
    adata.obs["label"] = adata.obs["label"].astype(object)
    adata.obs.iloc[5, adata.obs.columns.get_loc("label")] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['label'\] has 1 missing value.*cell5"):
        ToyModel.setup_anndata(adata, labels_key="label")


def test_nan_continuous_covariate_is_rejected(adata):
    adata.obs.loc["cell9", "age"] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['age'\] has 1 NaN.*cell9"):
        ToyModel.setup_anndata(adata, continuous_covariate_keys=["age"])


def test_model_without_setup_is_rejected(adata):
    with pytest.raises(ValueError, match=r"has not been set up; call .*ToyModel.setup_anndata"):
        ToyModel(adata)


def test_query_with_missing_genes_says_which(trained, adata):
    query = adata[:, 2:].copy()
    with pytest.raises(ValueError, match=r"2 gene\(s\) of the model are missing.*'gene0', 'gene1'"):
        trained.get_rates(query)


def test_query_with_reordered_genes_says_where(trained, adata):
    query = adata[:, list(range(11, -1, -1))].copy()
    with pytest.raises(ValueError, match=r"another order \(first difference at position 0"):
        trained.get_rates(query)


def test_gene_differences_are_described_for_every_kind_of_mismatch():
    ref = ["a", "b", "c"]
    assert describe_gene_difference(ref, ref) == ""
    assert describe_gene_difference(ref, ["a", "b"]) == (
        "1 gene(s) of the model are missing from the query ('c')")
    assert describe_gene_difference(ref, ["a", "b", "c", "d"]) == (
        "1 gene(s) of the query are not in the model ('d')")
    # same set, a repeated name: no elementwise comparison of unequal lengths
    assert describe_gene_difference(ref, ["a", "b", "c", "c"]) == (
        "the query has 4 gene names (with repeats) against 3")
    assert describe_gene_difference(ref, ["a", "c", "b"], "shard 0", "this shard") == (
        "the genes are the same but in another order (first difference at position 1: "
        "shard 0 has 'b', this shard has 'c')")
    with pytest.raises(ValueError, match=r"with repeats\) against 3\. Subset and reorder"):
        check_query_genes(ref, ["a", "b", "c", "a"])


def test_query_with_unseen_batch_category_is_rejected(trained, adata):
    query = adata.copy()
    query.obs["batch"] = query.obs["batch"].astype(str)
    query.obs.iloc[0, query.obs.columns.get_loc("batch")] = "b_new"
    with pytest.raises(ValueError, match=r"categories the model was not trained with: \['b_new'\]"):
        trained.get_rates(query)


def test_query_with_negative_counts_is_rejected(trained, adata):
    query = adata.copy()
    query.X[0, 0] = -3
    with pytest.raises(ValueError, match="negative value"):
        trained.get_rates(query)


def test_setup_and_training_modify_only_the_documented_uns_entry(adata):
    before = copy.deepcopy(adata)
    ToyModel.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="label",
        unlabeled_category="unknown",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["age"],
    )
    model = ToyModel(adata)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.get_rates(adata)
    assert list(adata.uns.keys()) == [SETUP_UNS_KEY]
    assert adata.obs.equals(before.obs)
    assert adata.var.equals(before.var)
    np.testing.assert_array_equal(adata.X, before.X)
    assert list(adata.obsm.keys()) == [] and list(adata.layers.keys()) == []


def test_non_anndata_input_is_rejected():
    with pytest.raises(ValueError, match="Expected an anndata.AnnData"):
        ToyModel.setup_anndata(np.zeros((3, 3)))


def test_valid_float_counts_pass(adata):
    adata.X = adata.X.astype(np.float64)
    ToyModel.setup_anndata(adata)
    model = ToyModel(adata)
    assert model.summary.n_vars == 12 and isinstance(adata, AnnData)
