"""Ranking of attributions: values against numpy, groups, outputs, FADVI's columns."""

import numpy as np
import pandas as pd
import pytest

from cellsight.interpret import rank_features

FADVI_COLUMNS = [
    "feature", "feature_idx", "attribution_mean", "attribution_std", "attribution_abs_mean",
    "n_cells",
]


def _attr(n=30, g=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, g)) * np.arange(1, g + 1)


def test_summaries_match_numpy_and_rank_by_mean_absolute_attribution():
    a = _attr()
    names = [f"g{j}" for j in range(6)]
    df = rank_features(a, names)
    assert set(FADVI_COLUMNS) <= set(df.columns) and "rank" in df.columns
    assert list(df["rank"]) == [1, 2, 3, 4, 5, 6]
    assert np.all(np.diff(df["attribution_abs_mean"].to_numpy()) <= 0)
    row = df.set_index("feature").loc["g3"]
    np.testing.assert_allclose(row["attribution_mean"], a[:, 3].mean(), rtol=1e-12)
    np.testing.assert_allclose(row["attribution_std"], a[:, 3].std(), rtol=1e-12)
    np.testing.assert_allclose(row["attribution_abs_mean"], np.abs(a[:, 3]).mean(), rtol=1e-12)
    assert row["feature_idx"] == 3 and row["n_cells"] == 30


def test_dataframe_columns_name_the_features():
    a = pd.DataFrame(_attr(), columns=list("abcdef"))
    df = rank_features(a, top_n=2)
    best = np.argsort(-np.abs(a.to_numpy()).mean(0))[:2]
    assert list(df["feature"]) == [a.columns[j] for j in best]


def test_groupby_ranks_within_each_group():
    a = _attr(n=40)
    a[:20, 0] += 100  # gene 0 dominates group "x" only
    groups = np.array(["x"] * 20 + ["y"] * 20)
    df = rank_features(a, groupby=groups)
    assert list(df.columns[:2]) == ["group", "feature"]
    top = df[df["rank"] == 1].set_index("group")["feature"]
    assert top["x"] == "0" and top["y"] != "0"
    y0 = df[(df.group == "y") & (df.feature == "0")].iloc[0]
    np.testing.assert_allclose(y0["attribution_mean"], a[20:, 0].mean(), rtol=1e-12)
    assert set(df["n_cells"]) == {20}


def test_several_outputs_get_an_output_column():
    a = np.stack([_attr(seed=1), _attr(seed=2)], axis=-1)
    df = rank_features(a, output_names=["z0", "z1"], top_n=3)
    assert list(df["output"].unique()) == ["z0", "z1"] and len(df) == 6
    z1 = df[df.output == "z1"].iloc[0]
    np.testing.assert_allclose(
        z1["attribution_abs_mean"], np.abs(a[..., 1]).mean(0).max(), rtol=1e-12
    )


def test_sort_by_signed_mean():
    a = np.array([[1.0, -5.0, 2.0], [1.0, -5.0, 2.0]])
    df = rank_features(a, sort_by="attribution_mean")
    assert list(df["feature_idx"]) == [2, 0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"var_names": ["a"]}, "1 var_names for 6 features"),
        ({"groupby": ["a"] * 3}, "groupby has 3 entries for 30 cells"),
        ({"sort_by": "median"}, "sort_by='median'"),
        ({"top_n": 0}, "top_n=0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rank_features(_attr(), **kwargs)


def test_missing_groups_and_nan_attributions_are_rejected():
    with pytest.raises(ValueError, match="missing values"):
        rank_features(_attr(n=2), groupby=["a", None])
    a = _attr()
    a[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_features(a)


@pytest.mark.parametrize("top_n", [2.5, 2.0, "3", True])
def test_non_integer_top_n_is_a_type_error(top_n):
    with pytest.raises(TypeError, match="must be an integer >= 1"):
        rank_features(_attr(), top_n=top_n)


def test_numpy_integer_top_n_is_accepted():
    assert len(rank_features(_attr(), top_n=np.int64(2))) == 2
