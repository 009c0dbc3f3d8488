"""CauTrigger's multivariate gate priors (``priors.py``) and how ``train`` sets them.

Planted truth: :func:`simulate_causal_cascade` (1,000 cells, default sizes: 10 causal, 20
confounded and 70 noise upstream features; strength 3, no dropout). On the training cells of
the report grid the cascade scores rank the causal features with AUROC 0.97 and the
principal-component logistic scores with 0.94 (DE t-test 0.90), so the thresholds below
(0.9, and every causal feature's mean score above the confounded features') leave room for
seed-to-seed variation while failing for a score that follows the state's correlates (the DE
t-test scores the confounded features about as high as the causal ones).
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cellsight.datasets.causal import simulate_causal_cascade, split_cascade
from cellsight.models import CauTrigger1L, CauTrigger2L
from cellsight.models.cautrigger.attention import de_prior
from cellsight.models.cautrigger.priors import (
    cascade_prior,
    cascade_scores,
    map_scores,
    pcr_prior,
    pcr_scores,
)

torch.set_num_threads(1)

FAST = dict(max_epochs=1, lr=1e-9, batch_size=64, n_alpha=2, n_beta=2,
            enable_progress_bar=False)  # lr ~0: the gates stay at the prior


@pytest.fixture(scope="module")
def cascade():
    up = split_cascade(simulate_causal_cascade(causal_strength=3.0, dropout=0.0, seed=0))
    return (up, np.asarray(up.X), np.asarray(up.obsm["X_down"]),
            up.obs["labels"].cat.codes.to_numpy())


def _role_means(s_g, up):
    role = up.var["role"].astype(str).to_numpy()
    return {r: float(s_g[role == r].mean()) for r in np.unique(role)}


def test_cascade_scores_rank_the_planted_causal_features_above_the_rest(cascade):
    up, x, d, y = cascade
    s_g, c_d, b_gd = cascade_scores(x, d, y)
    truth = up.var["is_causal"].to_numpy()
    assert roc_auc_score(truth, s_g) > 0.9
    assert s_g[truth].mean() > 3 * s_g[~truth].mean()
    assert c_d.shape == (d.shape[1],) and b_gd.shape == (x.shape[1], d.shape[1])
    assert (b_gd[:, c_d == 0] == 0).all()  # only downstream features the state reads
    np.testing.assert_array_equal(s_g, cascade_scores(x, d, y)[0])  # deterministic


def test_pcr_scores_rank_the_planted_causal_features_above_the_confounded_ones(cascade):
    up, x, _, y = cascade
    s_g, ks = pcr_scores(x, y)
    truth = up.var["is_causal"].to_numpy()
    assert roc_auc_score(truth, s_g) > 0.9
    means = _role_means(s_g, up)
    assert means["causal"] > max(v for r, v in means.items() if r != "causal")
    assert ks and ks[0] >= 4 and ks == list(range(ks[0], 3 * ks[0] + 1))
    np.testing.assert_array_equal(s_g, pcr_scores(x, y)[0])
    with pytest.raises(ValueError, match="at least 2 states"):
        pcr_scores(x, np.zeros_like(y))


def test_score_mappings_stay_in_the_prior_range_and_keep_the_order():
    s_g = np.array([0.0, 1.0, 3.0, 2.0])
    de_g = np.full(4, 0.5)
    np.testing.assert_allclose(map_scores(s_g, de_g, "scaled"), 0.05 + 0.9 * s_g / 3)
    np.testing.assert_allclose(map_scores(s_g, de_g, "rank"), 0.05 + 0.9 * np.array(
        [1, 2, 4, 3]) / 4)
    np.testing.assert_allclose(map_scores(s_g, de_g, "mean_de"),
                               0.5 * (0.05 + 0.9 * s_g / 3 + 0.5))
    np.testing.assert_allclose(map_scores(s_g, de_g, "max_de"),
                               np.maximum(0.05 + 0.9 * s_g / 3, 0.5))
    np.testing.assert_array_equal(map_scores(np.zeros(4), de_g), de_g)  # nothing reaches y
    with pytest.raises(ValueError, match="mapping="):
        map_scores(s_g, de_g, "softmax")


def test_2l_trains_with_the_cascade_prior_of_the_training_cells_by_default(cascade):
    up, x, d, y = cascade
    adata = up.copy()
    CauTrigger2L.setup_anndata(adata)
    m = CauTrigger2L(adata, n_latent=4, n_causal=2, seed=3)
    m.train(**FAST)
    gates = m.get_model_output()["weights"][0]
    tr = m.train_indices_
    # one gate per feature: set exactly to the prior (float32 logits), computed on the training
    # cells only (the held-out cells of get_up_significance stay unseen)
    np.testing.assert_allclose(gates, cascade_prior(x[tr], d[tr], y[tr], seed=3), atol=1e-4)
    assert not np.allclose(gates, cascade_prior(x, d, y, seed=3), atol=1e-3)
    de = CauTrigger2L(adata, n_latent=4, n_causal=2)
    de.train(prior="de", **FAST)  # the earlier default stays available
    np.testing.assert_allclose(de.get_model_output()["weights"][0],
                               de_prior(x[de.train_indices_], y[de.train_indices_]), atol=1e-4)


def test_1l_trains_with_the_pcr_prior_of_the_training_cells_by_default(cascade):
    up, x, _, y = cascade
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    m.train(**FAST)
    tr = m.train_indices_
    np.testing.assert_allclose(m.get_model_output()["weights"][0], pcr_prior(x[tr], y[tr]),
                               atol=1e-4)
    assert not np.allclose(m.get_model_output()["weights"][0], pcr_prior(x, y), atol=1e-3)
    CauTrigger2L.setup_anndata(adata)
    two = CauTrigger2L(adata, n_latent=4, n_causal=2)
    two.train(prior="pcr", **FAST)  # the upstream-only prior also works for 2L
    tr = two.train_indices_
    np.testing.assert_allclose(two.get_model_output()["weights"][0], pcr_prior(x[tr], y[tr]),
                               atol=1e-4)


def test_cascade_prior_needs_the_downstream_layer(cascade):
    up, x, d, y = cascade
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    with pytest.raises(ValueError, match="downstream layer"):
        m.train(prior="cascade", **FAST)
    with pytest.raises(ValueError, match="same cells"):
        cascade_scores(x, d[:-1], y)
    with pytest.raises(ValueError, match="at least 2 cells"):
        cascade_scores(x[:5], d[:5], np.array([0, 0, 0, 0, 1]))


def test_a_user_prior_array_sets_the_gates(cascade):
    up, x, _, _ = cascade
    adata = up.copy()
    CauTrigger1L.setup_anndata(adata)
    m = CauTrigger1L(adata, n_latent=4, n_causal=2)
    user = np.linspace(0.1, 0.9, x.shape[1])
    m.train(prior=user, **FAST)
    np.testing.assert_allclose(m.get_model_output()["weights"][0], user, atol=1e-4)


def test_cascade_reports_unconverged_fits_once(cascade, monkeypatch):
    """Fits that stop early give one summary warning, not one per lasso."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    from cellsight.models.cautrigger import priors

    _, x, d, y = cascade
    monkeypatch.setattr(priors, "_lasso_cv", lambda: LassoCV(cv=KFold(3), max_iter=1, tol=1e-12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cascade_scores(x, d, y)
    slow = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(slow) == 1 and "stopped before converging" in str(slow[0].message)
