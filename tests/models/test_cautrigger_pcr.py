"""Principal-component logistic regression, the 1L gate prior (``cautrigger/priors.py``): its
pieces against references, its ranking against DE, its fallback without structure."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cellsight.datasets.causal import simulate_causal_cascade, split_cascade
from cellsight.models.cautrigger.attention import de_prior
from cellsight.models.cautrigger.priors import (
    leading_svd,
    log_standardise,
    marchenko_pastur_rank,
    pcr_prior,
    pcr_scores,
    pcr_weights,
)


def _cascade(seed: int, **kw):
    up = split_cascade(simulate_causal_cascade(seed=seed, **kw))
    return np.asarray(up.X), up.obs["labels"].cat.codes.to_numpy(), up.var["is_causal"].to_numpy()


def test_marchenko_pastur_rank_counts_planted_components_only():
    rng = np.random.default_rng(0)
    n, p = 2000, 100
    noise = rng.standard_normal((n, p))
    s = np.linalg.svd((noise - noise.mean(0)) / noise.std(0), compute_uv=False)
    assert marchenko_pastur_rank(s, n, p) == 0
    x = noise + rng.standard_normal((n, 3)) @ (2.0 * rng.standard_normal((3, p)))
    s = np.linalg.svd((x - x.mean(0)) / x.std(0), compute_uv=False)
    assert marchenko_pastur_rank(s, n, p) == 3


def test_pcr_weights_at_full_rank_are_the_plain_logistic_coefficients():
    """With every component and almost no penalty, regressing on whitened scores and mapping
    back is the logistic regression on the standardised features itself."""
    rng = np.random.default_rng(1)
    x = log_standardise(rng.poisson(5.0, size=(600, 8)))
    y = (rng.random(600) < 1 / (1 + np.exp(-(x[:, 0] - 0.5 * x[:, 3])))).astype(int)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    w = pcr_weights(u, s, vt, y, k=8, C=1e8)
    ref = LogisticRegression(C=1e8, max_iter=10000).fit(x, y).coef_
    np.testing.assert_allclose(w, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_pcr_scores_rank_the_planted_causal_features_above_de(seed):
    """Seed 1's causal programs have marginal effects that largely cancel: DE ranks spurious
    features (correlated with the state through the confounder) above them; the joint
    regression on the programs does not."""
    x, y, truth = _cascade(seed, causal_strength=1.5)
    s, _ = pcr_scores(x, y)
    auc_pcr = roc_auc_score(truth, s)
    auc_de = roc_auc_score(truth, de_prior(x, y))
    assert auc_pcr >= 0.97
    assert auc_pcr > auc_de + 0.02


def test_pcr_prior_range_and_more_than_two_states():
    x, y, truth = _cascade(2, n_state=3)
    prior = pcr_prior(x, y)
    assert prior.shape == (x.shape[1],)
    assert prior.min() >= 0.05 - 1e-12 and prior.max() == pytest.approx(0.95)
    assert roc_auc_score(truth, prior) >= 0.95


def test_pcr_prior_falls_back_without_structure():
    """Independent features: no component stands out, the prior is the DE prior."""
    rng = np.random.default_rng(3)
    x = rng.poisson(8.0, size=(800, 60)).astype(np.float32)
    y = (np.log1p(x[:, 0]) > np.log1p(8.0)).astype(int)
    assert pcr_scores(x, y)[1] == []
    np.testing.assert_array_equal(pcr_prior(x, y), de_prior(x, y))


def test_pcr_scores_reject_mismatched_cells():
    x, y, _ = _cascade(0, n_cells=200)
    with pytest.raises(ValueError, match="same cells"):
        pcr_scores(x, y[:-1])


def test_randomized_svd_path_matches_the_exact_one(monkeypatch):
    """Large inputs take the leading components by randomized SVD (``leading_svd``): the same
    truncation levels, scores within 0.05 and the same ranking quality as the exact SVD."""
    from cellsight.models.cautrigger import priors

    x, y, truth = _cascade(0, causal_strength=1.5)
    exact, ks = pcr_scores(x, y)
    u, s, vt = leading_svd(log_standardise(x), exact_max=50)
    assert len(s) == 64 and u.shape == (x.shape[0], 64) and vt.shape == (64, x.shape[1])
    s_ref = np.linalg.svd(log_standardise(x), compute_uv=False)
    np.testing.assert_allclose(s[:10], s_ref[:10], rtol=1e-4)
    monkeypatch.setattr(priors, "EXACT_SVD_MAX", 50)
    approx, ks_approx = pcr_scores(x, y)
    assert ks_approx == ks
    assert np.abs(approx - exact).max() < 0.05
    assert abs(roc_auc_score(truth, approx) - roc_auc_score(truth, exact)) < 0.01
