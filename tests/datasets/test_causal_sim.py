"""simulate_causal_cascade: shapes, truth columns, determinism, and the planted structure."""

import numpy as np
import pytest

from cellsight.datasets import simulate_causal_cascade
from cellsight.datasets.causal import split_cascade


def _corr_with_state(adata):
    x = np.log1p(np.asarray(adata.X, dtype=np.float64))
    y = adata.obs["labels"].cat.codes.to_numpy().astype(float)
    xc = (x - x.mean(0)) / (x.std(0) + 1e-12)
    return np.abs(xc.T @ (y - y.mean()) / (len(y) * y.std()))


def test_truth_is_recorded_in_var_only():
    a = simulate_causal_cascade(n_cells=200, seed=0)
    assert a.shape == (200, 150)
    assert set(a.var["layer"]) == {"upstream", "downstream"}
    assert (a.var["is_causal"] == (a.var["role"] == "causal")).all()
    assert int(a.var["is_causal"][a.var["layer"] == "upstream"].sum()) == 10
    assert int(a.var["is_causal"][a.var["layer"] == "downstream"].sum()) == 10
    assert list(a.obs.columns) == ["labels"]
    assert set(a.uns["simulation"]) == {"generator", "causal_strength", "confounding",
                                        "dropout", "seed"}
    assert not a.obsm and not a.layers
    # positions carry no information: causal features are not a block at the start
    up_causal = np.flatnonzero(a.var["is_causal"].to_numpy()[:100])
    assert not np.array_equal(up_causal, np.arange(10))


def test_counts_are_integers_and_seeded():
    a = simulate_causal_cascade(n_cells=100, seed=3)
    b = simulate_causal_cascade(n_cells=100, seed=3)
    c = simulate_causal_cascade(n_cells=100, seed=4)
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
    assert (a.X >= 0).all() and np.array_equal(a.X, np.round(a.X))


def test_dropout_adds_zeros_at_the_given_rate():
    a = simulate_causal_cascade(n_cells=500, dropout=0.0, seed=0)
    b = simulate_causal_cascade(n_cells=500, dropout=0.4, seed=0)
    za, zb = (a.X == 0).mean(), (b.X == 0).mean()
    # zeros after dropout: za + (1 - za) * 0.4, up to Monte Carlo error (75k entries)
    assert abs(zb - (za + (1 - za) * 0.4)) < 0.01


def test_spurious_features_correlate_with_the_state_but_noise_does_not():
    a = simulate_causal_cascade(n_cells=3000, causal_strength=3.0, confounding=0.8, seed=1)
    up = a[:, a.var["layer"] == "upstream"]
    r = _corr_with_state(up)
    role = up.var["role"].to_numpy()
    # noise: independent of the state, |r| ~ 1/sqrt(3000) = 0.018
    assert r[role == "noise"].mean() < 0.04
    assert r[role == "spurious"].mean() > 0.1
    assert r[role == "causal"].mean() > r[role == "spurious"].mean()


def test_spurious_features_carry_no_state_information_without_confounding():
    a = simulate_causal_cascade(n_cells=3000, confounding=0.0, seed=2)
    up = a[:, a.var["layer"] == "upstream"]
    r = _corr_with_state(up)
    assert r[up.var["role"].to_numpy() == "spurious"].mean() < 0.04


def test_zero_causal_strength_gives_a_state_unrelated_to_features():
    a = simulate_causal_cascade(n_cells=3000, causal_strength=0.0, seed=0)
    assert _corr_with_state(a).max() < 0.08  # max over 150 features of |N(0, 1/3000)|


def test_more_states_and_imbalance():
    a = simulate_causal_cascade(n_cells=2000, n_state=3, seed=0)
    assert list(a.obs["labels"].cat.categories) == ["state_0", "state_1", "state_2"]
    b = simulate_causal_cascade(n_cells=2000, state_proportions=(0.85, 0.15), seed=0)
    assert (b.obs["labels"] == "state_1").mean() < 0.4  # 0.31 measured (seed 0)


def test_split_cascade_puts_downstream_in_obsm():
    a = simulate_causal_cascade(n_cells=50, seed=0)
    up = split_cascade(a)
    assert up.n_vars == 100 and up.obsm["X_down"].shape == (50, 50)
    assert list(up.uns["X_down_feature"]) == list(a.var_names[a.var["layer"] == "downstream"])
    pick = ["down_003", "down_001"]
    sub = split_cascade(a, down_features=pick)
    assert np.array_equal(sub.obsm["X_down"], np.asarray(a[:, pick].X))
    with pytest.raises(ValueError, match="not downstream"):
        split_cascade(a, down_features=["up_000"])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dropout": 1.0}, "dropout"), ({"n_up_causal": 0}, "n_up_causal"),
     ({"confounding": 1.0}, "confounding"), ({"n_state": 1}, "n_state"),
     ({"state_proportions": (1.0,)}, "state_proportions")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_causal_cascade(n_cells=10, **kwargs)
