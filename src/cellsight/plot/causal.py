"""Figures of causal-trigger models: information flow, training losses, feature weights."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellsight.plot.training import loss_curves

__all__ = ["information_flow_bars", "causal_train_losses", "feature_weight_bars"]

_COLORS = {"causal": "#c0392b", "spurious": "#7f8c8d"}


def information_flow_bars(
    info_flow: pd.DataFrame, info_flow_cat: pd.Series, show_dims: bool = True,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Bars of the information flow to the state: per latent dimension (optional) and the
    causal vs spurious totals (``compute_information_flow``'s outputs)."""
    if not {"info_flow", "type"} <= set(info_flow.columns):
        raise ValueError("info_flow needs the columns 'info_flow' and 'type'.")
    ncols = 2 if show_dims else 1
    fig, axes = plt.subplots(1, ncols, figsize=figsize or (4.5 * ncols, 3.5), squeeze=False)
    axes = axes[0]
    if show_dims:
        ax = axes[0]
        colors = [_COLORS.get(t, "C0") for t in info_flow["type"]]
        ax.bar(info_flow.index.astype(str), info_flow["info_flow"], color=colors)
        ax.set_ylabel("I(z_d; state) [nats]")
        ax.set_title("information flow per dimension")
        ax.tick_params(axis="x", rotation=90)
    ax = axes[-1]
    ax.bar(info_flow_cat.index.astype(str), info_flow_cat.to_numpy(),
           color=[_COLORS.get(t, "C0") for t in info_flow_cat.index])
    ax.set_ylabel("I(block; state) [nats]")
    ax.set_title("causal vs spurious latent")
    fig.tight_layout()
    return fig


def causal_train_losses(history: pd.DataFrame, metrics: Sequence[str] | None = None,
                        fig_size: tuple[float, float] = (8, 8)) -> Figure:
    """One panel per loss term of a CauTrigger history (train and validation)."""
    if not isinstance(history, pd.DataFrame) or history.empty:
        raise ValueError("The training history is empty; train the model first.")
    if metrics is None:
        bases = {c.rsplit("_", 1)[0] for c in history.columns if c.endswith("_train")}
        keep = ("_loss", "info_causal", "info_spurious", "accuracy")
        metrics = sorted(b for b in bases if b.endswith(keep) and b != "train") or sorted(bases)
    metrics = list(metrics)
    n = len(metrics)
    ncols = min(3, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=fig_size, squeeze=False)
    flat = axes.ravel()
    loss_curves(history, metrics=metrics, axes=list(flat[:n]))
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def feature_weight_bars(weights_df: pd.DataFrame, top_n: int = 20, color_by: str | None = None,
                        figsize: tuple[float, float] = (5, 5)) -> Figure:
    """Horizontal bars of the ``top_n`` largest feature weights (``get_up_feature_weights``);
    ``color_by`` names a boolean ``var`` column (e.g. ``"is_causal"``) to colour by."""
    if "weight" not in weights_df:
        raise ValueError("weights_df needs a 'weight' column (from get_up_feature_weights).")
    top = weights_df.sort_values("weight", ascending=False).head(top_n)[::-1]
    colors = "C0"
    if color_by is not None:
        if color_by not in top:
            raise ValueError(f"color_by={color_by!r} is not a column of weights_df.")
        colors = [_COLORS["causal"] if v else _COLORS["spurious"] for v in top[color_by]]
    fig, ax = plt.subplots(figsize=figsize)
    ax.barh(top.index.astype(str), top["weight"], color=colors)
    ax.set_xlabel("weight")
    ax.set_title(f"top {len(top)} features")
    fig.tight_layout()
    return fig
