"""Bundled datasets (shapes, integer counts, provenance) and the count simulator (planted truth)."""

from __future__ import annotations

import hashlib
import re
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellsight import datasets
from cellsight.datasets._files import DATA_DIR, FILES


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _is_integer(x) -> bool:
    values = x.data if sp.issparse(x) else np.asarray(x)
    return bool(np.all(values == np.round(values)) and np.all(values >= 0))


# ----------------------------------------------------------------------------- bundled files
def test_bundled_files_match_checksums_recorded_in_licenses():
    text = (DATA_DIR / "LICENSES.md").read_text()
    for name, filename in FILES.items():
        row = next((line for line in text.splitlines() if f"`{filename}`" in line), None)
        assert row is not None, f"{filename} ({name}) has no row in LICENSES.md"
        recorded = re.search(r"`([0-9a-f]{64})`", row).group(1)
        actual = hashlib.sha256((DATA_DIR / filename).read_bytes()).hexdigest()
        assert actual == recorded, filename


def test_pbmc68k_reduced_counts_are_integers_that_reproduce_the_shipped_log_normalised_data():
    adata = datasets.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert adata.X.dtype == np.float32 and _is_integer(adata.X)
    # reference: the file as scanpy ships it, read directly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = anndata.read_h5ad(DATA_DIR / FILES["pbmc68k_reduced"])
    assert adata.obs_names.equals(ref.obs_names) and adata.var_names.equals(ref.raw.var_names)
    n_counts = ref.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    exact = np.expm1(_dense(ref.raw.X).astype(np.float64)) * n_counts / 1e4
    # float32 storage of log1p values: recovered counts sit within 0.1 of an integer, and
    # on average within 1e-3 (the shared data README measured 8e-4)
    dev = np.abs(exact - _dense(adata.X))
    assert dev.max() < 0.1 and dev.mean() < 1e-3
    assert adata.X.sum() > 1e5  # not a matrix of zeros
    # the cells' counts over these 765 genes cannot exceed their total over all genes
    assert np.all(np.asarray(adata.X.sum(axis=1)).ravel() <= n_counts.ravel() + 0.5)


def test_pbmc68k_reduced_keeps_labels_and_embeddings():
    adata = datasets.pbmc68k_reduced()
    assert adata.obs["bulk_labels"].nunique() == 10
    assert adata.obs["louvain"].nunique() == 11
    assert adata.obsm["X_pca"].shape == (700, 50) and adata.obsm["X_umap"].shape == (700, 2)
    assert len(adata.uns["bulk_labels_colors"]) == 10
    assert adata.raw is None


def test_loaders_return_fresh_objects():
    a = datasets.pbmc68k_reduced()
    a.obs["bulk_labels"] = "changed"
    a.X.data[:] = -1
    b = datasets.pbmc68k_reduced()
    assert (b.obs["bulk_labels"] != "changed").all() and _is_integer(b.X)


@pytest.mark.parametrize(
    ("loader", "shape", "counts"),
    [
        (datasets.pbmc3k, (2700, 32738), True),
        (datasets.mouse_10k, (10000, 1000), True),
        (datasets.wu2020, (200, 30727), True),
        (datasets.visium_mouse_brain, (49, 1999), False),
    ],
)
def test_bundled_dataset_shape_and_content(loader, shape, counts):
    adata = loader()
    assert adata.shape == shape
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert _is_integer(adata.X) == counts


def test_mouse_10k_is_sparse_and_wu2020_has_states_and_visium_has_coordinates():
    mouse = datasets.mouse_10k()
    assert sp.issparse(mouse.X) and 0.06 < mouse.X.nnz / np.prod(mouse.shape) < 0.08
    wu = datasets.wu2020()
    assert wu.obs["cluster_orig"].nunique() == 16 and wu.obs["patient"].nunique() == 14
    vis = datasets.visium_mouse_brain()
    assert vis.obsm["spatial"].shape == (49, 2) and vis.obs["leiden"].nunique() == 5


@pytest.mark.parametrize(
    ("which", "shape", "n_proteins"), [("5k", (200, 16581), 29), ("10k", (200, 16727), 14)]
)
def test_pbmc_cite_single_experiments(which, shape, n_proteins):
    adata = datasets.pbmc_cite(which)
    assert adata.shape == shape and _is_integer(adata.X)
    prot = adata.obsm["protein_expression"]
    assert isinstance(prot, pd.DataFrame) and prot.shape == (shape[0], n_proteins)
    assert list(prot.columns) == list(adata.uns["protein_names"])
    assert _is_integer(prot.to_numpy())


def test_pbmc_cite_both_is_an_inner_join_with_a_batch_column():
    five, ten = datasets.pbmc_cite("5k"), datasets.pbmc_cite("10k")
    both = datasets.pbmc_cite("both")
    shared = five.var_names.intersection(ten.var_names)
    assert both.shape == (400, len(shared)) == (400, 15792)
    assert set(both.var_names) == set(shared) and both.obs_names.is_unique
    assert list(both.obs["batch"].cat.categories) == ["pbmc_5k", "pbmc_10k"]
    assert (both.obs["batch"].value_counts() == 200).all()
    # values are the originals, gene by name
    gene = shared[100]
    np.testing.assert_array_equal(
        _dense(both[both.obs["batch"] == "pbmc_10k", gene].X).ravel(),
        _dense(ten[:, gene].X).ravel(),
    )
    prot = both.obsm["protein_expression"]
    assert prot.shape == (400, 14) and prot.columns.isin(ten.uns["protein_names"]).all()
    np.testing.assert_array_equal(
        prot.iloc[:200]["CD3_TotalSeqB"].to_numpy(),
        five.obsm["protein_expression"]["CD3_TotalSeqB"].to_numpy(),
    )


def test_pbmc_cite_rejects_unknown_choice():
    with pytest.raises(ValueError, match="'5k', '10k', 'both'"):
        datasets.pbmc_cite("20k")


def test_cell_ontology_terms_and_ancestors():
    cl = datasets.cell_ontology()
    assert len(cl) == 3596
    t_cell = cl["CL:0000084"]
    assert t_cell["label"] == "T cell" and not t_cell["deprecated"]
    # the direct parent of 'T cell' is 'lymphocyte'
    parents = [term for term, hops in t_cell["ancestors"].items() if hops == 1]
    assert [cl[p]["label"] for p in parents] == ["lymphocyte"]


# ----------------------------------------------------------------------------- simulator
def _sim(**kw):
    args = dict(n_cells=600, n_genes=300, n_cell_types=3, n_batches=2, seed=3)
    args.update(kw)
    return datasets.simulate_counts(**args)


def test_simulate_counts_shapes_columns_and_integer_counts():
    adata = _sim()
    assert adata.shape == (600, 300) and _is_integer(adata.X)
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    assert list(adata.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert adata.var["is_marker"].sum() == 3 * 20
    assert (adata.var["marker_type"].notna() == adata.var["is_marker"]).all()
    assert adata.varm["batch_factor"].shape == (300, 2)
    np.testing.assert_allclose(adata.varm["type_profile"].sum(axis=0), 1.0, rtol=1e-12)


def test_simulate_counts_is_deterministic_by_seed():
    a, b, c = _sim(), _sim(), _sim(seed=4)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert (a.X != c.X).nnz > 0


def test_simulate_counts_markers_are_higher_in_their_type():
    adata = _sim(n_cells=1500, marker_fold_change=5.0)
    x = _dense(adata.X) / np.asarray(adata.X.sum(axis=1))  # library-normalised
    types = adata.obs["cell_type"].to_numpy()
    log_fc = []
    for gene, owner in adata.var["marker_type"].dropna().items():
        col = x[:, adata.var_names.get_loc(gene)]
        log_fc.append(np.log(col[types == owner].mean() / col[types != owner].mean()))
    log_fc = np.array(log_fc)
    assert (log_fc > 0).all()
    # planted fold change 5 (log 1.61; markers of other types shift the normalisation a little)
    assert abs(np.median(log_fc) - np.log(5.0)) < 0.3


def test_simulate_counts_batch_factors_are_recovered():
    adata = _sim(n_cells=2000, batch_effect_sd=0.5, n_markers_per_type=0)
    x = _dense(adata.X) / adata.obs["library_size"].to_numpy()[:, None]
    batch = adata.obs["batch"].to_numpy()
    est = np.log(x[batch == "batch_1"].mean(0) / x[batch == "batch_0"].mean(0))
    true = np.log(adata.varm["batch_factor"][:, 1] / adata.varm["batch_factor"][:, 0])
    expressed = x.mean(0) * 3000 > 1  # genes with > 1 count per cell on average
    assert expressed.sum() > 50
    r = np.corrcoef(est[expressed], true[expressed])[0, 1]
    slope = np.polyfit(true[expressed], est[expressed], 1)[0]
    assert r > 0.9 and 0.8 < slope < 1.2


def test_simulate_counts_follow_the_negative_binomial_variance():
    # with mean mu_ng known, Pearson residuals (x - mu)^2 / (mu + mu^2 / theta) average to 1
    theta = 4.0
    adata = _sim(n_cells=1000, dispersion=theta, batch_effect_sd=0.2)
    codes_t = adata.obs["cell_type"].cat.codes.to_numpy()
    codes_b = adata.obs["batch"].cat.codes.to_numpy()
    mu = (
        adata.obs["library_size"].to_numpy()[:, None]
        * adata.varm["type_profile"].T[codes_t]
        * adata.varm["batch_factor"].T[codes_b]
    )
    x = _dense(adata.X)
    nb = ((x - mu) ** 2 / (mu + mu**2 / theta)).mean()
    poisson = ((x - mu) ** 2 / mu).mean()
    assert abs(nb - 1.0) < 0.05  # 300k entries: the mean is tight
    assert poisson > 2.0  # clearly over-dispersed relative to Poisson


def test_simulate_counts_dropout_zeroes_entries_at_the_given_rate():
    adata = _sim(dropout=0.3)
    before = adata.layers["counts_before_dropout"]
    after = adata.X
    assert ((after != before).multiply(after != 0)).nnz == 0  # only zeros were introduced
    kept = after[before.nonzero()].A1 != 0
    assert abs((1 - kept.mean()) - 0.3) < 0.02
    assert "counts_before_dropout" not in _sim().layers


def test_simulate_counts_library_sizes_vary_as_planted():
    adata = _sim(library_size_sd=0.5, library_size=2000)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    lib = adata.obs["library_size"].to_numpy()
    assert np.corrcoef(np.log(totals), np.log(lib))[0, 1] > 0.95
    assert 0.4 < np.std(np.log(lib)) < 0.6


def test_simulate_counts_uses_given_gene_means_and_proportions():
    means = np.linspace(0.1, 10, 300)
    adata = _sim(
        gene_means=means,
        n_markers_per_type=0,
        batch_effect_sd=0.0,
        cell_type_proportions=[0.8, 0.1, 0.1],
    )
    np.testing.assert_allclose(adata.varm["type_profile"][:, 0], means / means.sum())
    assert 0.74 < (adata.obs["cell_type"] == "type_0").mean() < 0.86


def test_simulate_counts_writes_and_reads_h5ad(tmp_path):
    adata = _sim(dropout=0.1)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    back = anndata.read_h5ad(tmp_path / "sim.h5ad")
    assert (back.X != adata.X).nnz == 0 and back.var["marker_type"].equals(adata.var["marker_type"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_markers_per_type": 200}, "do not fit"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_cells": 0}, "n_cells"),
        ({"dispersion": 0.0}, "dispersion"),
        ({"cell_type_proportions": [1.0, 0.0]}, "cell_type_proportions"),
        ({"gene_means": np.ones(5)}, "gene_means"),
        ({"batch_effect_sd": -1.0}, "batch_effect_sd"),
    ],
)
def test_simulate_counts_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _sim(**kwargs)
