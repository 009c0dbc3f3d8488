"""Significance tests: exact references (scipy), Monte Carlo p-value validity, behaviour."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, false_discovery_control

from cellsight.interpret import fdr_bh, permutation_test, sign_test
from cellsight.interpret.significance import SequentialPValue


def test_sign_test_equals_scipy_binomtest_per_feature():
    rng = np.random.default_rng(0)
    a = rng.normal(loc=[0, 0.3, -0.5, 0, 2], size=(25, 5))
    a[:12, 3] = 0.0  # zeros are dropped
    a[:, 4] = 0.0  # no signs at all
    df = sign_test(a, list("abcde"))
    for j, name in enumerate("abcde"):
        pos, neg = int((a[:, j] > 0).sum()), int((a[:, j] < 0).sum())
        ref = 1.0 if pos + neg == 0 else binomtest(pos, pos + neg, 0.5).pvalue
        np.testing.assert_allclose(df.loc[name, "pvalue"], ref, rtol=1e-10)
        assert (df.loc[name, "n_positive"], df.loc[name, "n_negative"]) == (pos, neg)
    np.testing.assert_allclose(df["qvalue"], false_discovery_control(df["pvalue"], method="bh"))
    np.testing.assert_allclose(df["weight"], np.abs(a).mean(0))
    np.testing.assert_allclose(df["weight_signed"], a.mean(0))


def test_fdr_bh_matches_scipy_and_keeps_nan():
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.5])
    q = fdr_bh(p)
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2, 3, 4]], false_discovery_control(p[[0, 2, 3, 4]]))


def test_sequential_pvalue_counts_and_stops_as_besag_clifford():
    seq = SequentialPValue(0.5, "greater", n_perm=100, min_exceedances=3, tol=0.0)
    seq.update(np.array([0.1, 0.6, 0.2, 0.7, 0.3, 0.9, 0.95]))
    # the 3rd exceedance is the 6th value: p = h / L = 3 / 6, later values are ignored
    assert seq.done and seq.seen == 6 and seq.pvalue() == pytest.approx(0.5)
    full = SequentialPValue(0.5, "greater", n_perm=5, min_exceedances=None, tol=0.0)
    full.update(np.array([0.1, 0.6, 0.2, 0.7, 0.3]))
    assert full.done and full.pvalue() == pytest.approx((1 + 2) / (1 + 5))
    two = SequentialPValue(0.5, "two-sided", n_perm=5, min_exceedances=None, tol=0.0)
    two.update(np.array([0.1, 0.6, 0.2, 0.7, 0.3]))
    assert two.pvalue() == pytest.approx(min(1.0, 2 * min(3 / 6, 4 / 6)))


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_sequential_pvalues_are_valid_under_the_null(alternative):
    # observed and null statistics exchangeable: P(p <= a) <= a up to Monte Carlo error
    rng = np.random.default_rng(1)
    reps, k = 3000, 199
    p = np.empty(reps)
    for r in range(reps):
        draws = rng.normal(size=k + 1)
        seq = SequentialPValue(draws[0], alternative, n_perm=k, min_exceedances=10, tol=0.0)
        seq.update(draws[1:])
        p[r] = seq.pvalue()
    for a in (0.01, 0.05, 0.1, 0.5):
        # binomial sd at a = 0.05 is 0.004; allow 3 sd
        assert (p <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / reps)


def _linear_forward(weights):
    w = torch.as_tensor(weights, dtype=torch.float32)  # numpy inputs become float32

    def f(x):
        return x @ w

    return f


def test_unused_features_get_p_equal_one_and_used_linked_features_small_p():
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 4))
    y = np.where(x[:, 0] + 0.1 * rng.normal(size=n) > 0, 1.0, -1.0)
    # explain y * f(x): the signed contribution of each feature to the observed label
    w = torch.tensor([1.0, 0.0, 0.5, 0.0])

    def f(x, y_):
        return y_ * (x @ w)

    y_t = torch.as_tensor(y, dtype=torch.float32)
    df = permutation_test(
        f, x, additional_forward_args=y_t, method="ixg", n_perm=200, alternative="greater", seed=0
    )
    assert df.loc["1", "pvalue"] == 1.0 and df.loc["3", "pvalue"] == 1.0
    assert df.loc["0", "pvalue"] == pytest.approx(1 / 201)
    # feature 2 is used by the model but unrelated to y: no evidence
    assert df.loc["2", "pvalue"] > 0.05
    assert list(df.columns) == ["weight", "weight_signed", "pvalue", "qvalue", "n_perm"]
    assert df.loc["2", "n_perm"] < 200  # stopped early (sequential)


def test_permutation_test_is_deterministic_and_returns_the_null():
    x = np.random.default_rng(2).normal(size=(50, 3))
    f = _linear_forward([1.0, -1.0, 0.5])
    a, null_a = permutation_test(f, x, method="ig", baselines="mean", n_steps=4, n_perm=30,
                                 min_exceedances=None, seed=5, return_null=True)
    b, null_b = permutation_test(f, x, method="ig", baselines="mean", n_steps=4, n_perm=30,
                                 min_exceedances=None, seed=5, return_null=True)
    assert a.equals(b) and np.array_equal(null_a, null_b) and null_a.shape == (3, 30)


def test_global_mode_pools_standardised_nulls():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 5))
    f = _linear_forward([1.0, 1.0, 1.0, 1.0, 1.0])
    df, null = permutation_test(f, x, method="ixg", perm_mode="global", n_perm=40, seed=0,
                                features=[0, 2], var_names=list("abcde"), return_null=True)
    assert list(df.index) == ["a", "c"] and null.shape == (2, 40)
    assert (df["pvalue"] > 0).all() and (df["pvalue"] <= 1).all()
    assert (df["n_perm"] == 40).all()


def test_normalized_weights_sum_to_one():
    x = np.random.default_rng(4).normal(size=(30, 3))
    df = permutation_test(_linear_forward([1.0, 2.0, 3.0]), x, method="grad", n_perm=5,
                          normalize=True)
    np.testing.assert_allclose(df["weight"].sum(), 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"perm_mode": "rows"}, "perm_mode='rows'"),
        ({"alternative": "bigger"}, "alternative='bigger'"),
        ({"n_perm": 0}, "n_perm=0"),
        ({"min_exceedances": 0}, "min_exceedances=0"),
        ({"target": [0, 1]}, "one output per cell"),
        ({"features": ["zz"]}, "'zz' is not among the var_names"),
        ({"attributions": np.zeros((3, 3))}, "attributions have shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    x = np.random.default_rng(5).normal(size=(10, 3))
    with pytest.raises(ValueError, match=match):
        permutation_test(_linear_forward([1.0, 2.0, 3.0]), x, method="grad", **kwargs)
