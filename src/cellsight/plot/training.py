"""Figures of a training run: loss curves from ``model.history`` and a latent embedding.

Every function returns a :class:`matplotlib.figure.Figure` and modifies none of its inputs
(colours stored by scanpy in ``adata.uns["<key>_colors"]`` are read, never written).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["loss_curves", "embedding", "embedding_and_loss"]

_DEFAULT_METRICS = ("elbo", "reconstruction_loss", "kl_local")
_SPLITS = (("train", "-", "train"), ("validation", "--", "validation"))


def _metric_names(history: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    """Base names (``elbo``) that have a ``_train`` or ``_validation`` column in ``history``."""
    if not isinstance(history, pd.DataFrame) or history.empty:
        raise ValueError(
            "The training history is empty; train the model first (model.train(...)) and pass "
            "model.history."
        )
    cols = set(history.columns)

    def present(m: str) -> bool:
        return any(f"{m}_{split}" in cols for split, _, _ in _SPLITS)

    if metrics is None:
        names = [m for m in _DEFAULT_METRICS if present(m)]
        if not names:  # any other model: every metric logged per split
            names = sorted({c.rsplit("_", 1)[0] for c in cols if c.endswith("_train")})
    else:
        names = list(metrics)
        missing = [m for m in names if not present(m)]
        if missing:
            raise ValueError(
                f"metrics {missing} have no '<metric>_train' or '<metric>_validation' column in "
                f"the history (columns: {sorted(cols)}); pass names from these columns."
            )
    if not names:
        raise ValueError(
            f"The history has no '<metric>_train' columns to plot (columns: {sorted(cols)})."
        )
    return names


def _plot_metric(ax: Axes, history: pd.DataFrame, metric: str) -> None:
    epochs = np.asarray(history.index, dtype=float)
    for split, style, label in _SPLITS:
        col = f"{metric}_{split}"
        if col in history.columns:
            values = history[col].to_numpy(dtype=float)
            ok = np.isfinite(values)
            ax.plot(
                epochs[ok], values[ok], style, marker="." if ok.sum() < 30 else None, label=label
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(metric.replace("_", " "))
    ax.legend(frameon=False)


def loss_curves(
    history: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """Train and validation curves of per-epoch metrics, one panel per metric.

    Parameters
    ----------
    history
        Per-epoch metrics as in ``model.history`` (index: epoch; columns ``<metric>_train``
        and ``<metric>_validation``).
    metrics
        Base names to plot (default: those of ``elbo``, ``reconstruction_loss`` and
        ``kl_local`` present, else every ``*_train`` metric).
    axes
        One axes per metric to draw into (default: a new figure with a row of panels).

    Returns
    -------
    The figure holding the panels.
    """
    names = _metric_names(history, metrics)
    if axes is None:
        fig, ax_arr = plt.subplots(
            1, len(names), figsize=(4 * len(names), 3.4), squeeze=False, layout="constrained"
        )
        axes = list(ax_arr[0])
    else:
        axes = list(axes)
        if len(axes) != len(names):
            raise ValueError(
                f"{len(axes)} axes were given for {len(names)} metrics {names}; pass one axes "
                "per metric."
            )
        fig = axes[0].figure
    for ax, metric in zip(axes, names):
        _plot_metric(ax, history, metric)
    return fig


def _category_colors(adata: AnnData, key: str, categories: Sequence) -> list:
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == len(categories):
        return list(stored)
    cmap = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(len(categories))]


def embedding(
    adata: AnnData,
    basis: str = "X_umap",
    color: str | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    point_size: float | None = None,
    legend: bool = True,
) -> Figure:
    """Scatter plot of a 2-D embedding of the cells, coloured by an ``obs`` column.

    Parameters
    ----------
    adata
        Cells with the embedding in ``adata.obsm[basis]`` (the first two columns are drawn).
    basis
        Key of ``adata.obsm`` (``"X_umap"``, ``"X_scVI"``, ...).
    color
        ``adata.obs`` column: categorical columns get one colour per category (scanpy's
        ``adata.uns["<color>_colors"]`` when present) and a legend, numeric columns a colour
        bar. ``None``: one colour.
    ax
        Axes to draw into (default: a new figure).
    title
        Panel title (default: ``color`` or ``basis``).
    point_size
        Marker size (default: scaled to the number of cells).
    legend
        Draw the legend / colour bar.

    Returns
    -------
    The figure holding the axes.
    """
    if basis not in adata.obsm:
        raise ValueError(
            f"basis={basis!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}); compute it "
            "first (e.g. scanpy.tl.umap) or pass an existing key."
        )
    coords = np.asarray(adata.obsm[basis], dtype=float)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"adata.obsm[{basis!r}] has shape {coords.shape}; need >= 2 columns.")
    if color is not None and color not in adata.obs.columns:
        raise ValueError(
            f"color={color!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    fig = ax.figure
    size = point_size if point_size is not None else max(2.0, min(30.0, 12000 / len(coords)))
    if color is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, linewidths=0)
    else:
        values = adata.obs[color]
        if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(
            values
        ):
            cat = pd.Categorical(values)
            colors = _category_colors(adata, color, cat.categories)
            for i, name in enumerate(cat.categories):
                sel = cat.codes == i
                ax.scatter(
                    coords[sel, 0],
                    coords[sel, 1],
                    s=size,
                    color=colors[i],
                    linewidths=0,
                    label=str(name),
                )
            if legend:
                ax.legend(
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    frameon=False,
                    markerscale=max(1.0, 30 / size) ** 0.5,
                    fontsize="small",
                )
        else:
            sc = ax.scatter(
                coords[:, 0],
                coords[:, 1],
                c=values.to_numpy(dtype=float),
                s=size,
                linewidths=0,
                cmap="viridis",
            )
            if legend:
                fig.colorbar(sc, ax=ax, shrink=0.8)
    label = basis.removeprefix("X_")
    ax.set_xlabel(f"{label} 1")
    ax.set_ylabel(f"{label} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else (color or basis))
    return fig


def embedding_and_loss(
    adata: AnnData,
    history: pd.DataFrame,
    basis: str = "X_umap",
    color: str | None = None,
    metrics: Sequence[str] | None = ("elbo",),
    title: str | None = None,
) -> Figure:
    """One figure with the embedding of the cells beside the training curves.

    Parameters
    ----------
    adata, basis, color
        As in :func:`embedding`.
    history, metrics
        As in :func:`loss_curves` (default: the ELBO only).
    title
        Figure title.

    Returns
    -------
    The figure: the embedding on the left, one panel per metric stacked on the right.
    """
    names = _metric_names(history, metrics)
    height = max(4.5, 2.2 * len(names))
    fig = plt.figure(figsize=(11.5, height), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.7, 1.0])
    embedding(adata, basis=basis, color=color, ax=left.subplots())
    loss_axes = right.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(loss_axes, names):
        _plot_metric(ax, history, metric)
    for ax in loss_axes[:-1]:
        ax.set_xlabel("")
    if title:
        fig.suptitle(title)
    return fig
