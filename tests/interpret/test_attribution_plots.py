"""Attribution figures: returned figures draw what the results say."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cellsight import plot
from cellsight.interpret import rank_features, sign_test


def _attr(n=60, g=12, seed=0):
    a = np.random.default_rng(seed).normal(size=(n, g))
    a[:, 0] += 3.0  # strongest, positive
    a[:, 1] -= 2.0  # second, negative
    return a


def test_ranked_features_draws_top_bars_coloured_by_sign():
    df = rank_features(_attr(), [f"g{j}" for j in range(12)])
    fig = plot.ranked_features(df, n_top=5)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 5
    by_y = {t.get_position()[1]: t.get_text() for t in ax.get_yticklabels()}
    assert by_y[4] == "g0" and by_y[3] == "g1"  # best at the top
    colors = {by_y[round(bar.get_y() + bar.get_height() / 2)]: bar.get_facecolor() for bar in bars}
    assert colors["g0"] != colors["g1"]  # positive vs negative mean attribution
    plt.close(fig)


def test_ranked_features_draws_one_panel_per_group():
    groups = np.array(["a", "b", "c"] * 20)
    df = rank_features(_attr(), groupby=groups)
    fig = plot.ranked_features(df, n_top=4)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c"]
    assert all(len(ax.patches) == 4 for ax in visible)
    one = plot.ranked_features(df, n_top=4, group="b")
    assert len([ax for ax in one.axes if ax.get_visible()]) == 1
    plt.close("all")


def test_heatmap_shows_group_means_of_the_top_features():
    a = _attr()
    groups = np.array(["x"] * 30 + ["y"] * 30)
    fig = plot.attribution_heatmap(a, groupby=groups, n_top=3)
    mat = fig.axes[0].images[0].get_array()
    assert mat.shape == (2, 3)
    np.testing.assert_allclose(mat[1, 0], a[30:, 0].mean())
    cells = plot.attribution_heatmap(pd.DataFrame(a), groupby=groups, by_group=False, n_top=3,
                                     max_cells=40)
    assert cells.axes[0].images[0].get_array().shape == (40, 3)
    plt.close("all")


def test_volcano_colours_and_labels_significant_features():
    df = sign_test(_attr(), [f"g{j}" for j in range(12)])
    fig = plot.volcano(df, n_labels=5)
    ax = fig.axes[0]
    n_sig = int((df["qvalue"] < 0.05).sum())
    assert n_sig >= 2
    labels = {t.get_text() for t in ax.texts}
    assert {"g0", "g1"} <= labels and len(labels) <= 5
    colors = ax.collections[0].get_facecolors()
    grey = np.all(np.isclose(colors[:, :3], colors[-1, :3]), axis=1)
    assert len(colors) - grey.sum() >= n_sig - 1
    plt.close(fig)


def test_plots_reject_results_without_the_needed_columns():
    with pytest.raises(ValueError, match="no 'qvalue' column"):
        plot.volcano(pd.DataFrame({"weight_signed": [1.0]}))
    with pytest.raises(ValueError, match="no 'feature' column"):
        plot.ranked_features(pd.DataFrame({"attribution_abs_mean": [1.0]}))
