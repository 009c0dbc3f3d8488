"""FADVI's parts on small data: gradient reversal, the correlation penalty, unlabelled cells,
every parameter trained, KL warm-up, options, registry construction, metrics, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scvi import REGISTRY_KEYS as K
from scvi_helpers import count_adata

from cellsight.models import FADVI
from cellsight.models.fadvi import cross_correlation_penalty
from cellsight.models.fadvi.data import hide_labels
from cellsight.models.fadvi.metrics import (
    cross_correlation,
    integration_scores,
    latent_predictability,
    silhouette_label,
)
from cellsight.nn.gradient_reversal import GradientReversal, grad_reverse

SMALL = dict(n_hidden=16, n_latent_b=3, n_latent_l=3, n_latent_r=2, n_layers=1)


def small_adata(n_cells: int = 120, unlabeled: int = 20, seed: int = 0):
    adata = count_adata(n_cells=n_cells, n_genes=30, n_batch=2, seed=seed)
    labels = adata.obs["label"].astype(str).to_numpy().copy()
    labels[:unlabeled] = "Unknown"
    adata.obs["label_obs"] = pd.Categorical(labels)
    return adata


def small_model(adata=None, setup=None, **params) -> FADVI:
    adata = small_adata() if adata is None else adata
    FADVI.setup_anndata(adata, **(setup or {"batch_key": "batch", "labels_key": "label_obs"}))
    return FADVI(adata, **{**SMALL, **params})


def one_batch(model: FADVI, indices=None) -> dict:
    return next(iter(model._loader(indices=indices, batch_size=1000)))


# ---------------------------------------------------------------- gradient reversal
def test_gradient_reversal_is_identity_forward_and_scales_gradient_by_minus_alpha():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), -2.5 * np.tile(np.arange(3.0), (5, 1)))
    layer = GradientReversal(0.0)
    x.grad = None
    layer(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    with pytest.raises(ValueError, match="alpha"):
        grad_reverse(x, -1.0)


# ---------------------------------------------------------------- correlation penalty
def test_cross_correlation_penalty_is_scale_free_and_equals_squared_pearson_sum():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    b = 0.5 * a[:, :2] + torch.randn(200, 2, generator=gen, dtype=torch.float64)
    c = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    value = cross_correlation_penalty(a, b, c, eps=0.0)
    corr = np.corrcoef(np.hstack([a.numpy(), b.numpy(), c.numpy()]).T)
    expected = (corr[:3, 3:5] ** 2).sum() + (corr[:3, 5:] ** 2).sum() + (corr[3:5, 5:] ** 2).sum()
    assert float(value) == pytest.approx(expected, rel=1e-10)
    scaled = cross_correlation_penalty(1e-3 * a, 50 * b, c, eps=0.0)
    assert float(scaled) == pytest.approx(float(value), rel=1e-10)
    assert float(cross_correlation_penalty(a, a, eps=0.0)) == pytest.approx(
        (np.corrcoef(a.numpy().T) ** 2).sum(), rel=1e-10
    )


# ---------------------------------------------------------------- parallel heads
def test_parallel_heads_equal_independent_classifiers():
    from cellsight.models.fadvi.heads import ParallelClassifiers

    torch.manual_seed(0)
    heads = ParallelClassifiers([(3, 2), (5, 4)], n_hidden=8, n_layers=2, dropout_rate=0.0)
    xs = [torch.randn(16, 3), torch.randn(16, 5)]
    heads.train()
    together = heads(xs)
    assert [t.shape for t in together] == [(16, 2), (16, 4)]
    for g, x in enumerate(xs):  # batch statistics in training, one head at a time
        torch.testing.assert_close(heads.forward_one(g, x), together[g])
    heads.eval()
    together = heads(xs)
    for g, x in enumerate(xs):  # running statistics (updated above) in evaluation
        torch.testing.assert_close(heads.forward_one(g, x), together[g])
    together[0].sum().backward()  # the second head and the zero padding get no gradient
    assert not heads.weights[0].grad[1].any() and not heads.weights[0].grad[0, 3:].any()


def test_fast_dropout_drops_at_the_given_rate_and_keeps_the_mean():
    from cellsight.models.fadvi.heads import FastDropout, fast_dropout

    torch.manual_seed(0)
    x = torch.ones(400, 500)  # 200k units: the sd of the kept fraction is 7e-4
    y = fast_dropout(x, 0.1)
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003  # 4 standard deviations
    torch.testing.assert_close(y[y > 0], torch.full_like(y[y > 0], 32768 / (32768 - 3277)))
    assert abs(y.mean().item() - 1.0) < 0.004  # inverted dropout: E[y] = x
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1), y)  # seeded like any torch randomness
    assert fast_dropout(x, 0.1, training=False) is x and fast_dropout(x, 0.0) is x
    layer = FastDropout(0.5).eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="< 1"):
        fast_dropout(x, 1.0)


def test_fused_encoder_pass_equals_the_three_scvi_encoders():
    model = small_model()
    module = model.module.eval()
    assert module.fused_encoders
    tensors = one_batch(model)
    x_in = torch.log1p(tensors[K.X_KEY])
    fused = module._encode_fused(x_in)
    for (loc, scale), enc in zip(fused, (module.encoder_b, module.encoder_l, module.encoder_r)):
        q = enc(x_in)[0]  # scvi.nn.Encoder's own forward: (Normal, sample)
        torch.testing.assert_close(loc, q.loc)
        torch.testing.assert_close(scale, q.scale)
    inf = module.inference(**module._get_inference_input(tensors), use_latent_mean=True)
    for name in ("b", "l", "r"):  # and what attributions use (one encoder alone)
        torch.testing.assert_close(inf[f"z_{name}"], module.encode_mean(tensors, name))


def test_loss_terms_equal_torch_kl_and_the_pairwise_correlation_penalty():
    from torch.distributions import Normal, kl_divergence

    model = small_model()
    module = model.module.eval()
    tensors = one_batch(model)
    inf = module.inference(**module._get_inference_input(tensors))
    out = module.loss(tensors, inf, module.generative(**module._get_generative_input(tensors, inf)))
    for name in ("b", "l", "r"):
        q = inf[f"qz_{name}"]
        ref = kl_divergence(q, Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))).sum(-1)
        torch.testing.assert_close(out.kl_local[f"kl_divergence_z_{name}"], ref)
    ref = cross_correlation_penalty(inf["qz_b"].loc, inf["qz_l"].loc, inf["qz_r"].loc)
    torch.testing.assert_close(out.extra_metrics["cross_correlation"], ref)


# ---------------------------------------------------------------- module behaviour
def test_unlabelled_cells_do_not_enter_the_label_losses():
    model = small_model()
    module = model.module.eval()  # no dropout: the head gives the same logits twice
    tensors = one_batch(model)
    labels = tensors[K.LABELS_KEY].reshape(-1).long()
    unlabeled = labels == module.n_classes
    assert unlabeled.sum() == 20 and sorted(model.class_names) == ["t0", "t1", "t2"]
    torch.manual_seed(0)
    inf = module.inference(**module._get_inference_input(tensors), use_latent_mean=True)
    out = module.loss(tensors, inf, module.generative(**module._get_generative_input(tensors, inf)))
    logits = module.class_logits(inf, "label")
    expected = torch.nn.functional.cross_entropy(logits[~unlabeled], labels[~unlabeled])
    torch.testing.assert_close(out.extra_metrics["classification_loss_label"], expected)
    # a minibatch of unlabelled cells only: zero label loss, yet the head stays in the graph
    only = {k: v[unlabeled] for k, v in tensors.items()}
    inf = module.inference(**module._get_inference_input(only))
    out = module.loss(only, inf, module.generative(**module._get_generative_input(only, inf)))
    assert float(out.extra_metrics["classification_loss_label"].detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in module.heads.parameters())


def test_every_parameter_receives_a_gradient_in_one_training_step():
    model = small_model(use_observed_lib_size=False, dispersion="gene-batch")
    module = model.module.train()
    tensors = one_batch(model)
    _, _, out = module(tensors, loss_kwargs={"kl_weight": 0.5})
    out.loss.backward()
    dead = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []
    assert not hasattr(module, "z_encoder")  # scVI's single encoder is not built


def test_heads_with_zero_weight_or_one_class_are_not_built():
    model = small_model(lambda_b=0.0, alpha_rl=0.0)
    assert model.module.head_names == ["head_label", "adv_label_from_b", "adv_batch_from_l",
                                       "adv_batch_from_r"]
    with pytest.raises(ValueError, match="no batch classifier"):
        model.predict(prediction_mode="batch")
    adata = small_adata()
    single = small_model(adata, setup={"labels_key": "label_obs"})
    assert single.module.head_names == ["head_label", "adv_label_from_b", "adv_label_from_r"]


def test_kl_warmup_covers_half_of_the_epochs_trained_by_default():
    seen = {}

    class Spy(__import__("lightning").pytorch.Callback):
        def on_train_start(self, trainer, plan):
            seen["warmup"] = plan.n_epochs_kl_warmup

    model = small_model()
    model.train(max_epochs=6, enable_progress_bar=False, callbacks=[Spy()])
    assert seen["warmup"] == 3
    model = small_model(kl_warmup_epochs=2)
    model.train(max_epochs=3, enable_progress_bar=False, callbacks=[Spy()])
    assert seen["warmup"] == 2
    assert {"classification_loss_label_train", "adversarial_loss_train",
            "cross_correlation_train", "elbo_validation"} <= set(model.history.columns)


@pytest.mark.parametrize(
    "params",
    [
        dict(gene_likelihood="nb", dispersion="gene-label"),
        dict(gene_likelihood="poisson", encode_covariates=True),
        dict(use_observed_lib_size=False, dispersion="gene-cell"),
    ],
)
def test_options_train_and_give_finite_latents(params):
    adata = small_adata()
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="label_obs",
                        categorical_covariate_keys=["donor"], continuous_covariate_keys=["age"])
    model = FADVI(adata, **{**SMALL, **params})
    model.train(max_epochs=2, enable_progress_bar=False)
    z = model.get_latent_representation(representation="full")
    assert z.shape == (adata.n_obs, 8) and np.isfinite(z).all()
    assert np.isfinite(model.history["train_loss"]).all()


def test_model_built_from_a_registry_matches_and_loads_the_weights():
    model = small_model()
    twin = FADVI(None, registry=model.registry_, **SMALL)
    shapes = {k: v.shape for k, v in model.module.state_dict().items()}
    assert {k: v.shape for k, v in twin.module.state_dict().items()} == shapes
    twin.module.load_state_dict(model.module.state_dict())
    twin.module.eval()
    model.module.eval()
    tensors = one_batch(model)
    with torch.no_grad():
        a = twin.module.encode_mean(tensors, "l")
        b = model.module.encode_mean(tensors, "l")
    torch.testing.assert_close(a, b)


def test_same_seed_gives_identical_training_on_cpu():
    runs = []
    for _ in range(2):
        model = small_model(seed=3)
        model.train(max_epochs=2, enable_progress_bar=False)
        runs.append(model.get_latent_representation())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_query_data_with_unseen_categories_is_rejected_and_unlabelled_cells_are_predicted():
    model = small_model()
    model.train(max_epochs=1, enable_progress_bar=False)
    pred = model.predict()
    assert set(pred[:20]) <= {"t0", "t1", "t2"}  # the unlabelled cells get a real class
    query = small_adata(seed=1)
    query.obs["batch"] = pd.Categorical(["b9"] * query.n_obs)
    with pytest.raises(ValueError, match="b9"):
        model.predict(query)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(n_latent_l=0), "n_latent_l"),
        (dict(gamma=-1.0), "gamma"),
        (dict(alpha_bl=float("nan")), "alpha_bl"),
        (dict(gene_likelihood="normal"), "gene_likelihood"),
        (dict(dispersion="cell"), "dispersion"),
        (dict(adversary="alternating"), "unknown argument"),
        (dict(kl_warmup_fraction=2.0), "kl_warmup_fraction"),
    ],
)
def test_bad_constructor_arguments_are_rejected(params, match):
    with pytest.raises(ValueError, match=match):
        small_model(**params)


def test_bad_data_is_rejected_before_training():
    adata = small_adata()
    adata.X = adata.X.toarray()
    adata.X[3, 4] = 1.5
    with pytest.raises(ValueError, match="non-integer"):
        small_model(adata)
    adata = small_adata()
    adata.X = adata.X.toarray()
    adata.X[5, :] = 0
    with pytest.raises(ValueError, match="zero total counts"):
        small_model(adata)
    with pytest.raises(ValueError, match="nope"):
        small_model(setup={"batch_key": "nope"})
    adata = small_adata()
    adata.obs["label_obs"] = pd.Categorical(["t0"] * 100 + ["Unknown"] * 20)
    with pytest.raises(ValueError, match="at least 2"):
        small_model(adata)
    adata = small_adata()
    adata.obs["num"] = np.arange(adata.n_obs)
    with pytest.raises(ValueError, match="numeric"):
        FADVI.setup_anndata(adata, labels_key="num")


def test_bad_method_arguments_are_rejected():
    model = small_model()
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0)
    with pytest.raises(ValueError, match="representation"):
        model.get_latent_representation(representation="z")
    with pytest.raises(ValueError, match="prediction_mode"):
        model.predict(prediction_mode="labels")
    with pytest.raises(ValueError, match="interpretability"):
        model.predict(interpretability="shap")
    with pytest.raises(ValueError, match="gene_list"):
        model.get_normalized_expression(gene_list=["not_a_gene"])
    with pytest.raises(ValueError, match="predicted"):
        model.get_ranked_features(attributions=np.zeros((120, 30)), groupby="predicted")


# ---------------------------------------------------------------- data and metrics
def test_hide_labels_hides_a_stratified_fraction():
    adata = count_adata(n_cells=400, n_genes=20, n_batch=1, seed=0)
    labels, hidden = hide_labels(adata.obs["label"], 0.25, seed=0)
    assert abs(hidden.mean() - 0.25) < 0.03 and (labels[hidden] == "Unknown").all()
    truth = adata.obs["label"].astype(str).to_numpy()
    for cls in np.unique(truth):  # every class keeps labelled cells and loses some
        in_cls = truth == cls
        assert 0 < hidden[in_cls].sum() < in_cls.sum()


def test_predictability_is_one_on_separable_data_and_chance_on_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 150)
    z = rng.normal(size=(300, 4)) + 6 * (y == "b")[:, None]
    assert latent_predictability(z, y)["accuracy"] == 1.0
    noise = latent_predictability(rng.normal(size=(300, 4)), y)
    assert noise["chance"] == 0.5 and abs(noise["accuracy"] - 0.5) < 0.1  # sd ~0.03


def test_cross_correlation_and_silhouette_match_numpy_and_sklearn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 2))
    np.testing.assert_allclose(cross_correlation(a, b), np.corrcoef(a.T, b.T)[:3, 3:])
    y = np.repeat(["x", "y"], 25)
    assert silhouette_label(a, y) == pytest.approx((silhouette_score(a, y) + 1) / 2)


def test_integration_scores_reward_mixed_batches_and_separated_labels():
    rng = np.random.default_rng(2)
    labels = np.repeat(["a", "b", "c"], 100)
    batch = np.tile(["b0", "b1"], 150)
    centre = {"a": 0.0, "b": 8.0, "c": 16.0}
    z = rng.normal(size=(300, 3)) + np.array([centre[x] for x in labels])[:, None]
    good = integration_scores(z, batch, labels)
    bad = integration_scores(z + 8.0 * (batch == "b1")[:, None], batch, labels)
    assert good["batch_correction"] > bad["batch_correction"] + 0.2
    assert good["bio_conservation"] > 0.9 and 0 <= good["total"] <= 1


def test_overview_figure_has_embedding_predictability_and_gene_panels():
    import matplotlib.pyplot as plt

    from cellsight.plot.fadvi import disentanglement_overview

    adata = small_adata()
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    table = pd.DataFrame({"batch_accuracy": [1.0, 0.5, 0.5], "batch_chance": 0.5,
                          "label_accuracy": [0.3, 0.9, 0.3], "label_chance": 0.3},
                         index=["b", "l", "r"])
    ranked = pd.DataFrame({"group": ["t0", "t0", "t1"], "feature": ["g1", "g2", "g3"],
                           "rank": [1, 2, 1], "qvalue": [0.01, 0.2, np.nan]})
    fig = disentanglement_overview(adata, table, ranked, label_key="label", batch_key="batch")
    assert len(fig.axes) >= 4
    plt.close(fig)
    with pytest.raises(ValueError, match="lacks columns"):
        disentanglement_overview(adata, table.drop(columns="label_chance"))


def test_adversary_learning_rate_factor_gives_the_adversaries_their_own_group():
    from cellsight.models.fadvi.plan import FADVITrainingPlan

    model = small_model()
    n_adv = sum(p.numel() for p in model.module.adversaries.parameters())
    n_all = sum(p.numel() for p in model.module.parameters())
    # gradient reversal: one optimiser, the adversaries in a second parameter group
    plan = FADVITrainingPlan(model.module, lr=1e-3, adversary_lr_factor=10.0,
                             adversarial_training="reversal")
    opt = plan.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_adv
    # alternating (the default): the adversaries' own optimiser has the larger rate
    main, adversary = FADVITrainingPlan(model.module, lr=1e-3,
                                        adversary_lr_factor=10.0).configure_optimizers()
    assert [g["lr"] for g in main.param_groups] == [1e-3]
    assert [g["lr"] for g in adversary.param_groups] == [1e-2]
    assert sum(p.numel() for g in adversary.param_groups for p in g["params"]) == n_adv
    assert sum(p.numel() for g in main.param_groups for p in g["params"]) == n_all - n_adv
    with pytest.raises(ValueError, match="adversary_lr_factor"):
        FADVITrainingPlan(model.module, adversary_lr_factor=0.0)
