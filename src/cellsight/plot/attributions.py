"""Figures of attributions: ranked features, attribution heatmaps, volcano plots.

They take the results of :mod:`cellsight.interpret` (tidy DataFrames or cells x features
attributions) and return the matplotlib :class:`~matplotlib.figure.Figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellsight.interpret.rank import as_attribution_array

__all__ = ["ranked_features", "attribution_heatmap", "volcano"]

_POS, _NEG, _GREY = "#b2182b", "#2166ac", "#bdbdbd"


def _panel_grid(n: int, ncols: int, size: tuple[float, float], figsize):
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False,
        figsize=figsize or (size[0] * ncols, size[1] * nrows),
    )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def ranked_features(
    ranked: pd.DataFrame,
    n_top: int = 20,
    value: str = "attribution_abs_mean",
    group: str | None = None,
    ncols: int = 3,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Horizontal bar plot of the top features of :func:`cellsight.interpret.rank_features`.

    Bars are coloured by the sign of the mean attribution (red positive, blue negative).

    Parameters
    ----------
    ranked
        The tidy ranking (``feature``, ``value`` column, optionally ``group``/``output``).
    n_top
        Features per panel.
    value
        Column drawn (``"attribution_abs_mean"``, ``"attribution_mean"``, ``"weight"`` ...).
    group
        Draw only this group; by default one panel per group (or per output).
    ncols
        Panels per row.
    figsize
        Figure size (default: 4 x (1 + 0.25 n_top) inches per panel).

    Returns
    -------
    The figure.
    """
    for col in ("feature", value):
        if col not in ranked.columns:
            raise ValueError(
                f"ranked has no {col!r} column; pass the output of rank_features (columns: "
                f"{list(ranked.columns)})."
            )
    if n_top < 1:
        raise ValueError(f"n_top={n_top} must be at least 1.")
    panel_col = "group" if "group" in ranked.columns else (
        "output" if "output" in ranked.columns else None
    )
    if group is not None:
        if panel_col is None or group not in set(ranked[panel_col]):
            raise ValueError(f"group={group!r} is not in the ranking's groups.")
        ranked = ranked[ranked[panel_col] == group]
    panels = [(None, ranked)] if panel_col is None else list(ranked.groupby(panel_col, sort=False))
    fig, axes = _panel_grid(len(panels), ncols, (4.0, 1.0 + 0.25 * n_top), figsize)
    for ax, (name, df) in zip(axes, panels):
        top = df.sort_values(value, ascending=False, key=np.abs).head(n_top)
        sign = np.sign(top["attribution_mean" if "attribution_mean" in top else value])
        colors = np.where(sign >= 0, _POS, _NEG)
        y = np.arange(len(top))[::-1]
        ax.barh(y, top[value].to_numpy(), color=colors)
        ax.set_yticks(y, top["feature"].astype(str))
        ax.set_xlabel(value.replace("_", " "))
        if name is not None:
            ax.set_title(str(name))
        ax.axvline(0, color="black", lw=0.5)
    fig.tight_layout()
    return fig


def attribution_heatmap(
    attributions: np.ndarray | pd.DataFrame,
    var_names: Sequence[str] | None = None,
    groupby: Sequence | pd.Series | None = None,
    n_top: int = 30,
    features: Sequence[str] | None = None,
    by_group: bool = True,
    max_cells: int = 2000,
    cmap: str = "RdBu_r",
    seed: int = 0,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Heatmap of attributions: cells (or group means) x the top features.

    Parameters
    ----------
    attributions
        Cells x features (array or DataFrame).
    var_names
        Feature names (default: DataFrame columns or positions).
    groupby
        One group per cell: rows become group means (``by_group``) or cells sorted by group.
    n_top
        Features with the largest mean |attribution| shown (ignored with ``features``).
    features
        Features to show, in this order.
    by_group
        With ``groupby``, show group means instead of cells.
    max_cells
        Cells drawn at most (a seeded random subset, kept in group order).
    cmap
        Diverging colour map, centred at zero.
    seed
        Seeds the cell subset.
    figsize
        Figure size.

    Returns
    -------
    The figure.
    """
    a, names = as_attribution_array(attributions, var_names)
    if a.ndim != 2:
        raise ValueError("attribution_heatmap takes cells x features attributions.")
    if features is not None:
        missing = [f for f in features if str(f) not in set(names)]
        if missing:
            raise ValueError(f"features {missing[:5]} are not among the attribution columns.")
        cols = np.array([names.get_loc(str(f)) for f in features])
    else:
        cols = np.argsort(-np.abs(a).mean(0), kind="stable")[: max(1, n_top)]
    rows_label = "cells"
    if groupby is not None:
        cat = pd.Categorical(np.asarray(groupby))
        if len(cat) != a.shape[0]:
            raise ValueError(f"groupby has {len(cat)} entries for {a.shape[0]} cells.")
        if by_group:
            levels = [c for c in cat.categories if (cat == c).any()]
            mat = np.stack([a[np.asarray(cat == c)][:, cols].mean(0) for c in levels])
            ylabels, rows_label = [str(c) for c in levels], "group"
        else:
            order = np.argsort(cat.codes, kind="stable")
            order = _subsample(order, max_cells, seed)
            mat, ylabels = a[order][:, cols], None
    else:
        order = _subsample(np.arange(a.shape[0]), max_cells, seed)
        mat, ylabels = a[order][:, cols], None
    vmax = float(np.abs(mat).max()) or 1.0
    fig, ax = plt.subplots(
        figsize=figsize or (max(4.0, 0.25 * len(cols) + 2), 4.0 if ylabels is None
                            else max(2.0, 0.3 * len(ylabels) + 1.5))
    )
    im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(np.arange(len(cols)), names[cols], rotation=90)
    if ylabels is not None:
        ax.set_yticks(np.arange(len(ylabels)), ylabels)
    else:
        ax.set_yticks([])
    ax.set_ylabel(rows_label)
    fig.colorbar(im, ax=ax, label="attribution")
    fig.tight_layout()
    return fig


def _subsample(order: np.ndarray, max_cells: int, seed: int) -> np.ndarray:
    if len(order) <= max_cells:
        return order
    keep = np.sort(np.random.default_rng(seed).choice(len(order), max_cells, replace=False))
    return order[keep]


def volcano(
    significance: pd.DataFrame,
    x: str = "weight_signed",
    q: str = "qvalue",
    alpha: float = 0.05,
    n_labels: int = 10,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """Volcano plot: signed weight against -log10 q-value; significant features coloured.

    Parameters
    ----------
    significance
        Output of :func:`cellsight.interpret.permutation_test` or
        :func:`~cellsight.interpret.sign_test` (indexed by feature).
    x, q
        Columns of the signed effect and the q-value (``"pvalue"`` works too).
    alpha
        Significance threshold (dashed line).
    n_labels
        Label the most significant features.
    figsize
        Figure size.

    Returns
    -------
    The figure.
    """
    for col in (x, q):
        if col not in significance.columns:
            raise ValueError(
                f"significance has no {col!r} column (columns: {list(significance.columns)})."
            )
    qv = significance[q].to_numpy(dtype=float)
    floor = np.nanmin(qv[qv > 0]) if (qv > 0).any() else 1e-300
    y = -np.log10(np.clip(qv, floor, 1.0))
    xv = significance[x].to_numpy(dtype=float)
    sig = qv < alpha
    colors = np.where(sig, np.where(xv >= 0, _POS, _NEG), _GREY)
    fig, ax = plt.subplots(figsize=figsize)
    ax.scatter(xv, y, c=colors, s=12, linewidths=0)
    ax.axhline(-np.log10(alpha), color="black", ls="--", lw=0.8)
    ax.axvline(0, color="black", lw=0.5)
    for i in np.argsort(qv, kind="stable")[: max(0, n_labels)]:
        if sig[i]:
            ax.annotate(str(significance.index[i]), (xv[i], y[i]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(f"-log10 {q}")
    fig.tight_layout()
    return fig
