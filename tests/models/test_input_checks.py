"""Bad arguments to the models are rejected before any training, with messages that say what
to change; boolean masks and positions select the same cells everywhere."""

import numpy as np
import pandas as pd
import pytest
import torch
from scvi_helpers import count_adata

from cellsight.datasets.causal import simulate_causal_cascade, split_cascade
from cellsight.models import FADVI, SCVI, CauTrigger2L

torch.set_num_threads(1)

QUICK = dict(max_epochs=1, batch_size=32, enable_progress_bar=False)


@pytest.fixture(scope="module")
def scvi_model():
    adata = count_adata(n_cells=100, n_genes=20)
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_latent=3, n_hidden=16, seed=0)
    m.train(**QUICK)
    return m


@pytest.fixture(scope="module")
def cascade():
    a = simulate_causal_cascade(n_cells=120, n_up=12, n_down=8, n_up_causal=3, n_up_spurious=3,
                                n_down_causal=2, n_down_spurious=2, seed=0)
    a = split_cascade(a)
    CauTrigger2L.setup_anndata(a)
    return a


def _fadvi_data(labels):
    adata = count_adata(n_cells=90, n_genes=20)
    adata.obs["cell_type"] = pd.Categorical(labels(adata.n_obs))
    return adata


# ---------------------------------------------------------------- cells: masks and positions
def test_a_boolean_mask_selects_the_same_cells_as_their_positions(scvi_model):
    mask = np.zeros(scvi_model.adata.n_obs, dtype=bool)
    mask[[3, 10, 57]] = True
    z_all = scvi_model.get_latent_representation()
    z_mask = scvi_model.get_latent_representation(indices=mask)
    # the same rows (to float rounding: matrix products block differently per minibatch size)
    np.testing.assert_allclose(z_mask, z_all[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(z_mask, scvi_model.get_latent_representation(indices=[3, 10, 57]))
    expr = scvi_model.get_normalized_expression(indices=mask)
    assert list(expr.index) == list(scvi_model.adata.obs_names[mask])


@pytest.mark.parametrize("indices, error, match", [
    ([0, 100], ValueError, r"outside \[0, 100\)"),
    ([-1], ValueError, "outside"),
    (np.array([0.0, 1.0]), TypeError, "integer positions or a boolean mask"),
    (np.ones(7, dtype=bool), ValueError, "mask of length 7 for 100 cells"),
    ("cell0", TypeError, "not a string"),
])
def test_bad_indices_are_rejected(scvi_model, indices, error, match):
    with pytest.raises(error, match=match):
        scvi_model.get_latent_representation(indices=indices)


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_latent=2.5), TypeError, "n_latent=2.5 must be an integer"),
    (dict(n_latent="10"), TypeError, "n_latent='10' must be an integer"),
    (dict(n_hidden=0), ValueError, "n_hidden=0 must be >= 1"),
    (dict(n_layers=0), ValueError, "n_layers=0 must be >= 1"),
    (dict(dropout_rate=-0.1), ValueError, r"dropout_rate=-0.1 must be in \[0, 1\)"),
    (dict(kl_warmup_epochs=-1), ValueError, "kl_warmup_epochs=-1 must be >= 0"),
])
def test_scvi_rejects_out_of_range_architecture_arguments(kwargs, error, match):
    adata = count_adata(n_cells=40, n_genes=10)
    SCVI.setup_anndata(adata)
    with pytest.raises(error, match=match):
        SCVI(adata, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_hidden=0), ValueError, "n_hidden=0 must be >= 1"),
    (dict(dropout_rate=-0.1), ValueError, "dropout_rate"),
    (dict(n_latent_b=2.5), TypeError, "n_latent_b=2.5 must be an integer"),
    (dict(n_hidden_head=0), ValueError, "n_hidden_head=0 must be >= 1"),
])
def test_fadvi_rejects_out_of_range_architecture_arguments(kwargs, error, match):
    adata = _fadvi_data(lambda n: np.array(["T", "B", "NK"])[np.arange(n) % 3])
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    with pytest.raises(error, match=match):
        FADVI(adata, **kwargs)


# ---------------------------------------------------------------- FADVI labels
def test_fadvi_rejects_an_unlabeled_category_spelt_differently_from_the_data():
    adata = _fadvi_data(lambda n: np.array(["T", "B", "unknown"])[np.arange(n) % 3])
    with pytest.raises(ValueError, match="'unknown' does"):
        FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    assert "_cellsight_setup" not in adata.uns
    # the exact spelling makes them unlabelled; None keeps them as a class
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type",
                        unlabeled_category="unknown")
    assert FADVI(adata, n_hidden=8).class_names == ["B", "T"]
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type",
                        unlabeled_category=None)
    assert sorted(FADVI(adata, n_hidden=8).class_names) == ["B", "T", "unknown"]


def test_fadvi_warns_when_a_placeholder_label_would_be_trained_as_a_class():
    adata = _fadvi_data(lambda n: np.array(["T", "B", "unlabelled"])[np.arange(n) % 3])
    with pytest.warns(UserWarning, match="pass unlabeled_category='unlabelled'"):
        FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    assert "unlabelled" in FADVI(adata, n_hidden=8).class_names


def test_a_fadvi_query_without_labels_is_told_how_to_fill_them():
    adata = _fadvi_data(lambda n: np.array(["T", "B", "Unknown"])[np.arange(n) % 3])
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    m = FADVI(adata, n_hidden=8, n_latent_b=2, n_latent_l=2, n_latent_r=2)
    query = adata.copy()
    del query.obs["cell_type"]
    with pytest.raises(ValueError, match=r"adata.obs\['cell_type'\] = 'Unknown'"):
        m.predict(adata=query)
    query.obs["cell_type"] = "Unknown"
    np.testing.assert_array_equal(np.asarray(m.predict(adata=query)), np.asarray(m.predict()))


# ---------------------------------------------------------------- training arguments
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_epochs=0), ValueError, "max_epochs=0 must be >= 1"),
    (dict(max_epochs=-1), ValueError, "max_epochs=-1 must be >= 1"),
    (dict(max_epochs=2.5), TypeError, "max_epochs=2.5 must be an integer"),
    (dict(batch_size=0), ValueError, "batch_size=0 must be >= 1"),
    (dict(batch_size=True), TypeError, "batch_size=True must be an integer"),
    (dict(lr=-1.0), ValueError, "lr=-1.0 must be a number >= 0"),
    (dict(devices=0), ValueError, "devices=0 must be a positive number"),
    (dict(plan_kwargs={"bogus": 1}), ValueError, r"plan_kwargs \['bogus'\] are not arguments"),
    (dict(plan_kwargs={"weight_decay": -1.0}), ValueError, "weight_decay=-1.0 must be"),
    (dict(batch_size=1), ValueError, "batch_size=1 cannot train a model with BatchNorm"),
    (dict(early_stopping=True, early_stopping_monitor="val_loss"), ValueError,
     "early_stopping_monitor='val_loss' is not an epoch metric"),
    (dict(early_stopping=True, early_stopping_monitor="elbo_validaton"), ValueError,
     "'<metric>_validation'"),
    (dict(plan_kwargs={"reduce_lr_on_plateau": True, "lr_scheduler_metric": "bogus"}),
     ValueError, "lr_scheduler_metric='bogus' is not an epoch metric"),
])
def test_scvi_train_rejects_bad_arguments_before_training(kwargs, error, match):
    adata = count_adata(n_cells=40, n_genes=10)
    SCVI.setup_anndata(adata)
    m = SCVI(adata, n_hidden=8)
    with pytest.raises(error, match=match):
        m.train(**{**QUICK, **kwargs})
    assert not m.is_trained_ and m.history_ is None


@pytest.mark.parametrize("monitor", ["elbo_validation", "reconstruction_loss_train",
                                     "validation_loss"])
def test_well_formed_early_stopping_monitors_are_accepted(monitor):
    adata = count_adata(n_cells=40, n_genes=10)
    SCVI.setup_anndata(adata)
    m = SCVI(adata, n_hidden=8)
    hist = m.train(**{**QUICK, "max_epochs": 2}, early_stopping=True,
                   early_stopping_monitor=monitor)
    assert monitor in hist.columns


def test_cautrigger_train_rejects_bad_arguments_before_the_prior(cascade, monkeypatch):
    m = CauTrigger2L(cascade, n_latent=4, n_causal=2)

    def no_prior(*args, **kwargs):
        raise AssertionError("the prior was computed before the arguments were checked")

    monkeypatch.setattr(m, "_named_prior", no_prior)
    for kwargs, match in ((dict(max_epochs=0), "max_epochs=0"), (dict(lr=-1.0), "lr=-1.0"),
                          (dict(batch_size=0), "batch_size=0")):
        with pytest.raises(ValueError, match=match):
            m.train(**{**QUICK, **kwargs})
    assert not m.is_trained_


def test_inference_batch_size_is_checked_not_replaced(scvi_model):
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        scvi_model.get_latent_representation(batch_size=0)
    np.testing.assert_allclose(scvi_model.get_latent_representation(batch_size=7),
                               scvi_model.get_latent_representation(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- expression
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(library_size=-5), ValueError, "library_size=-5 must be a positive number"),
    (dict(library_size=0), ValueError, "library_size=0 must be a positive number"),
    (dict(n_samples=0), ValueError, "n_samples=0 must be >= 1"),
    (dict(n_samples=1.5), TypeError, "n_samples=1.5 must be an integer"),
])
def test_normalized_expression_rejects_bad_arguments(scvi_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        scvi_model.get_normalized_expression(**kwargs)


def test_latent_mc_samples_must_be_positive(scvi_model):
    with pytest.raises(ValueError, match="mc_samples=0 must be >= 1"):
        scvi_model.get_latent_representation(mc_samples=0)


# ---------------------------------------------------------------- registration
def test_setup_rejects_non_string_keys_and_non_numeric_matrices():
    adata = count_adata(n_cells=30, n_genes=8)
    with pytest.raises(TypeError, match="batch_key=3 must be an obs column name"):
        SCVI.setup_anndata(adata, batch_key=3)
    with pytest.raises(TypeError, match=r"continuous_covariate_keys=\['age', 1\] must be a list"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["age", 1])
    obj = adata.copy()
    obj.X = obj.X.toarray().astype(object)
    with pytest.raises(TypeError, match="dtype object, not numbers"):
        SCVI.setup_anndata(obj)


# ---------------------------------------------------------------- CauTrigger2L queries
def test_cautrigger2l_query_downstream_features_must_match(cascade):
    m = CauTrigger2L(cascade, n_latent=4, n_causal=2)
    m.train(**{**QUICK, "n_alpha": 3, "n_beta": 4})
    fewer = cascade.copy()
    fewer.obsm["X_down"] = np.asarray(fewer.obsm["X_down"])[:, :5]
    with pytest.raises(ValueError, match="has 5 columns but the model was set up with 8"):
        m.get_up_feature_weights(fewer, method="Grad")
    reordered = cascade.copy()
    order = np.arange(8)[::-1]
    reordered.obsm["X_down"] = np.asarray(reordered.obsm["X_down"])[:, order]
    reordered.uns["X_down_feature"] = np.asarray(m.down_feature_names, dtype=object)[order]
    with pytest.raises(ValueError, match="differ from the model's"):
        m.get_up_feature_weights(reordered, method="Grad")
    with pytest.raises(ValueError, match=r"use 0..1 \(or -2..-1"):
        m.get_up_feature_weights(method="Grad", class_idx=2)


def test_cautrigger_information_flow_rejects_bad_draw_counts(cascade):
    m = CauTrigger2L(cascade, n_latent=4, n_causal=2)
    m.train(**{**QUICK, "n_alpha": 3, "n_beta": 4})
    for kwargs, error in ((dict(n_cells=-1), ValueError), (dict(n_cells=2.5), TypeError),
                          (dict(n_beta=0), ValueError)):
        with pytest.raises(error, match=next(iter(kwargs))):
            m.compute_information_flow(plot_info_flow=False, **kwargs)


def test_ranked_features_check_top_n_before_computing_attributions(monkeypatch):
    adata = _fadvi_data(lambda n: np.array(["T", "B", "NK"])[np.arange(n) % 3])
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    m = FADVI(adata, n_hidden=8, n_latent_b=2, n_latent_l=2, n_latent_r=2)

    def no_predict(*args, **kwargs):
        raise AssertionError("attributions were computed before top_n was checked")

    monkeypatch.setattr(m, "predict", no_predict)
    with pytest.raises(TypeError, match="top_n=2.5 must be an integer >= 1"):
        m.get_ranked_features(top_n=2.5)


def test_cautrigger2l_on_a_shard_stub_names_the_limitation(cascade, tmp_path):
    from cellsight.data import read_shards

    paths = []
    for k, (lo, hi) in enumerate([(0, 50), (50, 120)]):
        p = str(tmp_path / f"s{k}.h5ad")
        cascade[lo:hi].copy().write_h5ad(p)
        paths.append(p)
    stub = read_shards(paths)
    with pytest.raises(ValueError, match=r"obsm_keys=\['X_down'\]"):
        CauTrigger2L.setup_anndata(stub)
