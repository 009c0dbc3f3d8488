"""cellsight's SCVI: options, outputs, determinism, save/load and input validation."""

import numpy as np
import pandas as pd
import pytest
import torch
from scvi_helpers import count_adata

from cellsight.models import SCVI, SingleCellVariationalInference
from cellsight.train import TrainingPlan

SETUP = {
    "batch_key": "batch",
    "labels_key": "label",
    "categorical_covariate_keys": ["donor"],
    "continuous_covariate_keys": ["age"],
}


def _model(adata=None, setup=None, **params):
    adata = count_adata() if adata is None else adata
    SCVI.setup_anndata(adata, **(SETUP if setup is None else setup))
    return SCVI(adata, n_hidden=16, n_latent=4, **params), adata


def _fit(model, epochs=1, **kw):
    return model.train(max_epochs=epochs, batch_size=32, enable_progress_bar=False, **kw)


OPTIONS = [
    {"gene_likelihood": "nb"},
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson"},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-label"},
    {"dispersion": "gene-cell", "gene_likelihood": "nb"},
    {"latent_distribution": "ln"},
    {"log_variational": False},
    {"encode_covariates": True, "deeply_inject_covariates": False, "n_layers": 2},
    {"batch_embedded": True, "n_latent_batch": 2},
    {"batch_embedded": True, "batch_representation_sampled": True, "batch_kl_weight_max": 0.5},
    {"batch_embedded": True, "batch_representation_sampled": True, "encode_covariates": True},
    {"input_gene_dropout_rate": 0.2},
    {"use_batch_norm": "encoder", "use_layer_norm": "decoder"},
    {"use_batch_norm": "none", "use_layer_norm": "both"},
    {"kl_warmup_epochs": None, "kl_warmup_steps": 3, "kl_annealing_start": 0.5},
    {"z_kl_weight_max": 0.5},
    {"use_size_factor_key": True},
    {"use_flow": True, "flow_hidden_features": [8, 8]},
    {"use_flow": True, "latent_distribution": "ln", "gene_likelihood": "nb"},
    {
        "encoder": {"n_hidden": 8, "n_layers": 2},
        "decoder": {"hidden_layers": [{"init_args": {"out_features": 12}}]},
    },
]


@pytest.mark.parametrize(
    "params", OPTIONS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items())
)
def test_every_option_builds_trains_and_gives_finite_losses(params):
    setup = dict(SETUP, size_factor_key="sf") if params.get("use_size_factor_key") else SETUP
    model, adata = _model(setup=setup, **params)
    hist = _fit(model, epochs=2)
    assert len(hist) == 2
    for col in ("elbo_train", "reconstruction_loss_train", "kl_local_train", "elbo_validation"):
        assert np.isfinite(hist[col]).all(), col
    assert np.isfinite(model.get_elbo())
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z).all()
    expr = model.get_normalized_expression(n_samples=2)
    assert np.isfinite(expr.to_numpy()).all()


def test_gene_batch_dispersion_is_per_gene_and_batch():
    model, adata = _model(dispersion="gene-batch", gene_likelihood="nb")
    assert tuple(model.module.px_r.shape) == (adata.n_vars, 3)
    tensors = next(iter(model._loader(batch_size=10)))
    model.module.eval()
    with torch.no_grad():
        _, gen = model.module(tensors, compute_loss=False)
    batch_n = tensors["batch"].long().reshape(-1)
    expected = torch.exp(model.module.px_r.T[batch_n])
    assert torch.equal(gen["px"].theta, expected)


def test_kl_schedule_reaches_the_training_plan_and_the_loss():
    model, _ = _model(
        kl_warmup_epochs=None, kl_warmup_steps=7, kl_annealing_start=0.25, z_kl_weight_max=0.5
    )
    kwargs = model._plan_kwargs()
    assert kwargs == {
        "n_epochs_kl_warmup": None,
        "n_steps_kl_warmup": 7,
        "min_kl_weight": 0.25,
        "max_kl_weight": 1.0,
    }
    plan = TrainingPlan(model.module, **kwargs)
    assert plan.n_steps_kl_warmup == 7 and plan.min_kl_weight == 0.25
    tensors = next(iter(model._loader(batch_size=20)))
    model.module.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        _, _, out = model.module(tensors, loss_kwargs={"kl_weight": 0.4})
    rec, kl = out.reconstruction_loss["reconstruction_loss"], out.kl_local["kl_divergence_z"]
    torch.testing.assert_close(out.loss, torch.mean(rec + 0.4 * 0.5 * kl))


def test_flow_prior_trains_and_its_kl_is_a_monte_carlo_estimate():
    model, _ = _model(use_flow=True, flow_hidden_features=[8, 8], gene_likelihood="nb")
    flow_before = {k: v.clone() for k, v in model.module.flow_prior.state_dict().items()}
    hist = _fit(model, epochs=6, plan_kwargs={"lr": 1e-2, "n_epochs_kl_warmup": None})
    changed = [
        not torch.equal(v, model.module.flow_prior.state_dict()[k]) for k, v in flow_before.items()
    ]
    assert any(changed)  # the prior is learned jointly
    assert hist["elbo_validation"].iloc[-1] < hist["elbo_validation"].iloc[0]
    # kl_z is log q(u|x) - log p_flow(u) at the drawn u: check it against both densities
    tensors = next(iter(model._loader(batch_size=16)))
    model.module.eval()
    with torch.no_grad():
        inf = model.module.inference(**model.module._get_inference_input(tensors))
        expected = inf["qz"].log_prob(inf["u_nk"]).sum(-1) - model.module.flow_prior.log_prob(
            inf["u_nk"]
        )
        torch.testing.assert_close(model.module.kl_z(inf), expected)


def test_reconstruct_mean_over_batches_is_the_average_of_each_batch():
    model, adata = _model(gene_likelihood="nb")
    _fit(model)
    kw = {"use_latent_mean": True, "library_size": 5000, "indices": np.arange(20)}
    per_batch = [
        model.get_reconstructed_counts(transform_batch=b, **kw) for b in ("b0", "b1", "b2")
    ]
    mean = model.get_reconstructed_counts(transform_batch="mean", **kw)
    np.testing.assert_allclose(mean.to_numpy(), sum(p.to_numpy() for p in per_batch) / 3, rtol=1e-5)
    # NB mean counts at a common library size: each row sums to that library size
    np.testing.assert_allclose(mean.sum(axis=1), 5000, rtol=1e-4)
    assert not np.allclose(per_batch[0].to_numpy(), per_batch[1].to_numpy())
    genes = ["gene3", "gene1"]
    sub = model.get_reconstructed_counts(transform_batch="mean", gene_list=genes, **kw)
    assert list(sub.columns) == genes
    np.testing.assert_allclose(sub.to_numpy(), mean[genes].to_numpy(), rtol=1e-5)


def test_reconstruct_importance_sampling_gives_a_weighted_mean_of_the_samples():
    model, _ = _model(gene_likelihood="nb")
    _fit(model)
    kw = {"indices": np.arange(10), "n_latent_samples": 64}
    plain = model.get_reconstructed_counts(**kw).to_numpy()
    weighted = model.get_reconstructed_counts(use_importance_sampling=True, **kw).to_numpy()
    mean = model.get_reconstructed_counts(use_latent_mean=True, **kw).to_numpy()
    assert np.isfinite(weighted).all() and not np.allclose(plain, weighted)
    # all three estimate the same expected counts
    np.testing.assert_allclose(weighted, mean, rtol=0.5)
    np.testing.assert_allclose(weighted.sum(1), 1e4, rtol=1e-4)


def test_normalized_expression_rows_sum_to_library_size_with_names():
    model, adata = _model(gene_likelihood="zinb")
    _fit(model)
    expr = model.get_normalized_expression(library_size=1e4, transform_batch=["b0", "b2"])
    assert isinstance(expr, pd.DataFrame)
    assert list(expr.index) == list(adata.obs_names) and list(expr.columns) == list(adata.var_names)
    np.testing.assert_allclose(expr.sum(axis=1), 1e4, rtol=1e-4)
    samples = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert samples.shape == (3, adata.n_obs, adata.n_vars)
    latent = model.get_normalized_expression(library_size="latent", indices=[0, 5])
    np.testing.assert_allclose(
        latent.sum(axis=1), np.asarray(adata.X[[0, 5]].sum(1)).ravel(), rtol=1e-4
    )
    with pytest.raises(ValueError, match="not a batch of this model"):
        model.get_normalized_expression(transform_batch="b7")
    with pytest.raises(ValueError, match="does not know"):
        model.get_normalized_expression(gene_list=["gene0", "nope"])


def test_same_seed_gives_identical_latents_and_history():
    m1, _ = _model(seed=3)
    m2, _ = _model(seed=3)
    h1, h2 = _fit(m1, epochs=2), _fit(m2, epochs=2)
    assert h1.equals(h2)
    assert np.array_equal(m1.get_latent_representation(), m2.get_latent_representation())
    assert np.array_equal(
        m1.get_latent_representation(give_mean=False), m2.get_latent_representation(give_mean=False)
    )
    assert m1.get_elbo() == m2.get_elbo()
    m3, _ = _model(seed=4)
    _fit(m3, epochs=2)
    assert not np.array_equal(m1.get_latent_representation(), m3.get_latent_representation())


def test_save_load_round_trip_is_exact(tmp_path):
    model, adata = _model(
        batch_embedded=True,
        batch_representation_sampled=True,
        use_flow=True,
        flow_hidden_features=[8],
    )
    _fit(model, epochs=2)
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=adata)
    assert np.array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    pd.testing.assert_frame_equal(
        model.get_normalized_expression(), loaded.get_normalized_expression()
    )
    assert model.get_elbo() == loaded.get_elbo()
    assert loaded.history.equals(model.history)
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key


def test_query_with_reordered_genes_is_rejected():
    model, adata = _model()
    query = adata[:, adata.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="another order"):
        model.get_latent_representation(query)


def test_query_with_an_unseen_batch_is_rejected():
    model, adata = _model()
    query = adata.copy()
    query.obs["batch"] = query.obs["batch"].cat.add_categories("new")
    query.obs.iloc[0, query.obs.columns.get_loc("batch")] = "new"
    with pytest.raises(ValueError, match="not trained with"):
        model.get_latent_representation(query)


def test_query_cells_get_the_same_latents_as_the_reference_cells():
    model, adata = _model()
    query = adata[10:30].copy()
    np.testing.assert_allclose(
        model.get_latent_representation(query),
        model.get_latent_representation(indices=np.arange(10, 30)),
        rtol=1e-6,
    )


def test_cells_with_zero_counts_are_rejected():
    adata = count_adata()
    x = adata.X.toarray()
    x[4] = 0
    adata.X = x
    with pytest.raises(ValueError, match="zero total counts.*cell4"):
        _model(adata)


def test_non_integer_counts_are_rejected():
    adata = count_adata()
    adata.X = adata.X.toarray() + 0.5
    with pytest.raises(ValueError, match="non-integer"):
        _model(adata)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"gene_likelihood": "normal"}, "gene_likelihood"),
        ({"dispersion": "gene-donor"}, "dispersion"),
        ({"n_latent_batch": 2}, "batch_embedded=True"),
        ({"batch_representation_sampled": True}, "batch_embedded=True"),
        ({"use_batch_norm": "all"}, "use_batch_norm"),
        ({"input_gene_dropout_rate": 1.0}, "input_gene_dropout_rate"),
        ({"use_size_factor_key": True}, "size_factor_key"),
        ({"encoder": {"width": 3}}, "unsupported key"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_message(params, match):
    with pytest.raises(ValueError, match=match):
        _model(**params)


def test_module_checks_its_gene_names_and_reconstructs_a_subset_of_genes():
    module = SingleCellVariationalInference(["a", "b", "c"], n_batch=2, n_hidden=8, n_latent=2)
    module.eval()
    x_ng = torch.tensor([[1.0, 0.0, 3.0], [2.0, 5.0, 1.0]])
    batch_n = torch.tensor([0, 1])
    out = module.reconstruct(
        x_ng,
        var_names_g=["a", "b", "c"],
        gene_inds=[2, 0],
        batch_index_n=batch_n,
        use_latent_mean=True,
        reconstructed_library_size=100,
    )
    full = module.reconstruct(
        x_ng, batch_index_n=batch_n, use_latent_mean=True, reconstructed_library_size=100
    )
    torch.testing.assert_close(out, full[:, [2, 0]])
    with pytest.raises(ValueError, match="var_names_g"):
        module.reconstruct(x_ng, var_names_g=["a", "c", "b"], batch_index_n=batch_n)
    with pytest.raises(ValueError, match="transform_batch"):
        module.reconstruct(x_ng, batch_index_n=batch_n, transform_batch=5)


def test_fixing_categorical_covariates_matches_the_cells_own_values():
    model, adata = _model(gene_likelihood="nb")
    _fit(model)
    d0 = np.flatnonzero(adata.obs["donor"].to_numpy() == "d0")[:15]
    kw = {"use_latent_mean": True, "indices": d0}
    own = model.get_reconstructed_counts(**kw)
    fixed = model.get_reconstructed_counts(transform_categorical_covariates={"donor": "d0"}, **kw)
    other = model.get_reconstructed_counts(transform_categorical_covariates=["d1"], **kw)
    np.testing.assert_allclose(fixed.to_numpy(), own.to_numpy(), rtol=1e-6)
    assert not np.allclose(other.to_numpy(), own.to_numpy())
    with pytest.raises(ValueError, match="not a category"):
        model.get_reconstructed_counts(transform_categorical_covariates={"donor": "d9"}, **kw)


def test_seed_helpers_give_one_hot_batch_and_covariate_codes():
    model, _ = _model()
    module = model.module
    torch.testing.assert_close(
        module.batch_representation_from_batch_index(torch.tensor([2, 0])),
        torch.eye(3)[[2, 0]],
    )
    onehot = module.categorical_onehot_from_categorical_index(torch.tensor([[1], [0]]))
    torch.testing.assert_close(onehot, torch.eye(2)[[1, 0]])
    embedded, _ = _model(batch_embedded=True, n_latent_batch=2)
    rep = embedded.module.batch_representation_from_batch_index(torch.tensor([1]))
    torch.testing.assert_close(rep, embedded.module.batch_embedding.mean_bd[[1]])


def test_attributions_of_the_latent_cover_every_gene_and_latent_dimension():
    model, adata = _model(gene_likelihood="nb")
    _fit(model)
    attr = model.get_feature_attributions(target="latent", indices=range(6))
    assert attr.shape == (6, adata.n_vars, 4) and np.isfinite(attr).all()
    assert np.abs(attr).sum() > 0
