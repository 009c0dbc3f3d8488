"""CauTrigger1L / CauTrigger2L: training paths, outputs, scores, save/load, errors."""

import matplotlib
import numpy as np
import pytest
import torch

from cellsight.datasets.causal import simulate_causal_cascade, split_cascade
from cellsight.interpret.information_flow import draw_noise, information_flow_loop
from cellsight.models import CauTrigger1L, CauTrigger2L
from cellsight.models.cautrigger import CauTriggerModule, fit_hierarchy
from cellsight.models.cautrigger.weights import resolve_scheme, stage_multipliers

matplotlib.use("Agg")
torch.set_num_threads(1)

FAST = dict(max_epochs=4, batch_size=64, n_alpha=4, n_beta=5, enable_progress_bar=False)


def _data(n_cells=160, n_state=2, seed=0, **kw):
    a = simulate_causal_cascade(n_cells=n_cells, n_up=20, n_down=10, n_up_causal=4,
                                n_up_spurious=6, n_down_causal=3, n_down_spurious=3,
                                n_state=n_state, seed=seed, **kw)
    return split_cascade(a)


@pytest.fixture(scope="module")
def up():
    return _data()


@pytest.fixture(scope="module")
def model_2l(up):
    adata = up.copy()
    CauTrigger2L.setup_anndata(adata)
    m = CauTrigger2L(adata, n_latent=4, n_causal=2, seed=0)
    m.train(**FAST)
    return m


def test_causal_loss_equals_the_loop_reference():
    torch.manual_seed(0)
    mod = CauTriggerModule(n_input=6, n_state=3, n_latent=4, n_causal=2, n_down=5, n_hidden=8)
    mod.eval()
    mu, sd = torch.randn(3, 4), torch.rand(3, 4) + 0.3
    qc = torch.distributions.Normal(mu[:, :2], sd[:, :2])
    qs = torch.distributions.Normal(mu[:, 2:], sd[:, 2:])
    with torch.random.fork_rng():
        torch.manual_seed(7)
        loss, i_c, i_s = mod.causal_loss(qc, qs, n_x=3, n_alpha=4, n_beta=6,
                                         causal_fold=1.5, spurious_fold=0.5)
    with torch.random.fork_rng():  # the same draws, in the same order
        torch.manual_seed(7)
        nc = draw_noise(3, 4, [0, 1], 4, 6)
        ns = draw_noise(3, 4, [2, 3], 4, 6)
    f = mod.predict_proba_from_latent
    ref_c = information_flow_loop(f, mu, sd, [0, 1], nc).mean()
    ref_s = information_flow_loop(f, mu, sd, [2, 3], ns).mean()
    assert torch.allclose(i_c, ref_c, atol=1e-5) and torch.allclose(i_s, ref_s, atol=1e-5)
    assert torch.allclose(loss, -1.5 * ref_c + 0.5 * ref_s, atol=1e-5)


def test_weight_schemes_presets_overrides_and_errors():
    s = resolve_scheme(None)
    assert stage_multipliers(s, 0, 100)["causal"] == 0.0
    assert stage_multipliers(s, 99, 100)["causal"] == 1.0
    lin = resolve_scheme("linear")
    assert 0.0 < stage_multipliers(lin, 35, 100)["causal"] < 1.0
    over = resolve_scheme({"causal": (0, 0, 3)})
    assert stage_multipliers(over, 60, 100)["causal"] == 3.0
    assert stage_multipliers(over, 60, 100)["dpd"] == 1.0
    with pytest.raises(ValueError, match="not a preset"):
        resolve_scheme("nope")
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_scheme({"causl": 1})
    with pytest.raises(ValueError, match="multipliers"):
        resolve_scheme({"causal": (1, 2)})


@pytest.mark.parametrize("stage_training", [True, False])
def test_1l_trains_with_and_without_stages(up, stage_training):
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    hist = m.train(stage_training=stage_training, **FAST)
    for col in ("recons_loss_train", "causal_loss_train", "dpd_loss_train", "fide_kl_loss_train",
                "info_causal_validation"):
        assert col in hist and np.isfinite(hist[col]).all()
    assert len(hist) == FAST["max_epochs"]
    fig = m.plot_train_losses()
    assert isinstance(fig, matplotlib.figure.Figure)


def test_more_than_two_states_and_imbalance_weights():
    adata = _data(n_state=3, state_proportions=(0.6, 0.3, 0.1))
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2, n_state=3)
    m.train(im_factor=1.0, **FAST)
    counts = adata.obs["labels"].value_counts().reindex(m.label_categories).to_numpy()
    expected = counts.sum() / (3 * counts)
    assert np.allclose(m.module.class_weight_c.numpy(), expected, rtol=1e-5)
    out = m.get_model_output()
    assert out["probs"].shape == (adata.n_obs, 3)
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    assert set(out["pred_labels"]) <= set(m.label_categories)


def test_model_output_and_feature_weights(model_2l):
    m = model_2l
    n, g = m.adata.shape
    out = m.get_model_output()
    assert out["latent"].shape == (n, 4) and out["weights"].shape == (n, g)
    assert np.array_equal(out["preds"], (out["probs"][:, 1] > 0.5).astype(int))
    for method in ("Model", "Grad", "SHAP", "Ensemble"):
        df, full = m.get_up_feature_weights(method=method, n_bg_samples=20)
        assert full.shape == (n, g) and (full >= 0).all()
        assert np.isclose(df["weight"].sum(), 1.0)
        assert df["weight"].is_monotonic_decreasing
        assert "is_causal" in df  # a copy of var with the weight added
    with pytest.raises(ValueError, match="method"):
        m.get_up_feature_weights(method="LIME")


def test_grad_weights_are_gated_input_times_gradient(model_2l):
    m = model_2l
    df, full = m.get_up_feature_weights(method="Grad", normalize=False, sort_by_weight=False)
    xt = m._inputs(None)[0].clone().requires_grad_(True)
    y = torch.as_tensor(m.adata.obs["labels"].cat.codes.to_numpy(), dtype=torch.long)
    p = torch.softmax(m.module.causal_logits(xt), -1)
    p.gather(1, y[:, None]).sum().backward()
    assert np.allclose(full, np.abs((xt * xt.grad).detach().numpy()), atol=1e-6)


def test_two_layer_ig_shapes(model_2l):
    m = model_2l
    n, g = m.adata.shape
    ig = m.get_2to1_ig()
    assert ig.shape == (n, g, len(m.down_feature_names))
    z = m.get_input2z_ig()
    assert z.shape == (n, g, 4)


def test_information_flow_readout(model_2l):
    flow, cat = model_2l.compute_information_flow(n_cells=20, n_alpha=4, n_beta=5,
                                                   plot_info_flow=True, skip_single_info=False)
    assert list(flow["type"]) == ["causal", "causal", "spurious", "spurious"]
    assert (flow["info_flow"] >= -1e-6).all() and set(cat.index) == {"causal", "spurious"}
    assert isinstance(model_2l.info_flow_figure_, matplotlib.figure.Figure)


def test_save_load_round_trip(model_2l, tmp_path):
    m = model_2l
    m.save(str(tmp_path / "ct"))
    m2 = CauTrigger2L.load(str(tmp_path / "ct"), adata=m.adata)
    a, b = m.get_model_output(), m2.get_model_output()
    assert np.array_equal(a["probs"], b["probs"]) and np.array_equal(a["latent"], b["latent"])
    assert m2.down_feature_names == m.down_feature_names
    assert np.array_equal(m2.get_up_feature_weights(method="Grad")[1],
                          m.get_up_feature_weights(method="Grad")[1])


def test_pretrain_attention_fits_the_prior(up):
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2, feature_mapper="attention")
    prior = np.linspace(0.05, 0.95, adata.n_vars)
    m.pretrain_attention(prior, max_epochs=30, pretrain_lr=1e-2)
    w = m.get_model_output()["weights"].mean(0)
    assert np.corrcoef(w, prior)[0, 1] > 0.9
    g = CauTrigger1L(adata, n_latent=4, n_causal=2)
    g.pretrain_attention(max_epochs=5)  # default prior from differential expression
    with pytest.raises(ValueError, match="one value per feature"):
        g.pretrain_attention(np.random.default_rng(0).random(adata.shape))


def test_hierarchy_chains_1l_top_k_into_2l(up):
    res = fit_hierarchy(up, top_k=4, model_kwargs={"n_latent": 4},
                        train_kwargs={**FAST, "max_epochs": 2}, method="Grad")
    assert len(res.top_down) == 4
    assert res.top_down == list(res.down_weights.index[:4])
    assert res.model_2l.down_feature_names == res.top_down
    assert len(res.up_weights) == up.n_vars
    assert "X_down" in up.obsm and up.obsm["X_down"].shape[1] == 10  # input untouched


def test_errors_are_clear(up):
    adata = up.copy()
    with pytest.raises(ValueError, match="cell states"):
        CauTrigger1L.setup_anndata(adata, labels_key="condition")
    CauTrigger1L.setup_anndata(adata)
    with pytest.raises(ValueError, match="n_state=3"):
        CauTrigger1L(adata, n_state=3)
    with pytest.raises(ValueError, match="n_causal"):
        CauTrigger1L(adata, n_latent=2, n_causal=2)
    no_down = adata.copy()
    del no_down.obsm["X_down"]
    with pytest.raises(ValueError, match="obsm has no 'X_down'"):
        CauTrigger2L.setup_anndata(no_down)
    neg = adata.copy()
    neg.X[0, 0] = -1.0
    CauTrigger1L.setup_anndata(neg)
    with pytest.raises(ValueError, match="negative"):
        CauTrigger1L(neg)
    m = CauTrigger1L(adata, n_latent=4)
    with pytest.raises(ValueError, match="n_alpha"):
        m.train(n_alpha=0, **{k: v for k, v in FAST.items() if k != "n_alpha"})


def test_early_stopping_monitors_the_validation_loss(up):
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    hist = m.train(early_stopping=True, early_stopping_patience=1,
                   **{**FAST, "max_epochs": 30, "lr": 1e-6})
    assert len(hist) < 30 and "validation_loss" in hist
    with pytest.raises(ValueError, match="validation cells"):
        m.train(early_stopping=True, train_size=1.0, **FAST)


@pytest.mark.ddp
def test_one_layer_trains_with_two_ddp_processes_on_cpu(up):
    """ddp_spawn (gloo) with 2 CPU processes: the trained weights come back to this process,
    every rank's metrics are finite and the scores are finite and differ from the untrained
    gates."""
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2, seed=0)
    before = m.module.gate_logit_g.detach().clone()
    hist = m.train(**{**FAST, "max_epochs": 3}, devices=2, accelerator="cpu")
    assert m.is_trained_ and len(hist) == 3
    assert np.isfinite(hist["dpd_loss_train"]).all()
    assert not torch.equal(m.module.gate_logit_g.detach(), before)
    for method in ("Model", "Grad"):
        df, full = m.get_up_feature_weights(method=method)
        assert np.isfinite(full).all() and np.isfinite(df["weight"]).all()
        assert df["weight"].sum() == pytest.approx(1.0)


def test_restart_ensemble_averages_the_normalised_weights_of_independent_fits(up):
    from cellsight.models.cautrigger import ensemble_up_feature_weights

    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    df, models = ensemble_up_feature_weights(
        CauTrigger1L, adata, n_restarts=2, seed=3, model_kwargs=dict(n_latent=4, n_causal=2),
        train_kwargs=FAST, method="Grad")
    assert [m.seed for m in models] == [3, 4]
    each = [m.get_up_feature_weights(method="Grad")[0].loc[adata.var_names, "weight"]
            for m in models]
    np.testing.assert_allclose(df.loc[adata.var_names, "weight"], np.mean(each, 0), rtol=1e-6)
    assert not np.allclose(each[0], each[1])  # the fits differ: there is variance to average
    assert df["weight"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_restarts"):
        ensemble_up_feature_weights(CauTrigger1L, adata, n_restarts=0)


def test_train_prior_de_fits_the_gates_to_the_de_prior_of_the_training_cells(up):
    from cellsight.models.cautrigger.attention import de_prior

    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    # lr ~0: the gates stay as pretrained (the default prior, "pcr": test_cautrigger_priors.py)
    m.train(prior="de", **{**FAST, "max_epochs": 1, "lr": 1e-9})
    assert m.prior_fitted_ and "pretrain_loss_train" in m.pretrain_history_
    gates = m.get_model_output()["weights"][0]
    tr = m.train_indices_
    x, y = np.asarray(adata.X), adata.obs["labels"].cat.codes.to_numpy()
    # one gate per feature: set exactly to the prior of the training cells (float32 logits),
    # not to that of all cells, which has seen the held-out states
    np.testing.assert_allclose(gates, de_prior(x[tr], y[tr]), atol=1e-4)
    assert not np.allclose(gates, de_prior(x, y), atol=1e-3)
    off = CauTrigger1L(adata, n_latent=4, n_causal=2)
    off.train(prior=None, **{**FAST, "max_epochs": 1, "lr": 1e-9})
    assert not getattr(off, "prior_fitted_", False)
    assert np.allclose(off.get_model_output()["weights"], 0.5, atol=1e-4)  # gate_init
    with pytest.raises(ValueError, match="prior="):
        off.train(prior="wilcoxon", **FAST)
