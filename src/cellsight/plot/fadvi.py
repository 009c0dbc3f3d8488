"""FADVI's overview figure: the integrated latent by label and batch, what each latent knows,
and the top genes of the label head per cell type."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure

from cellsight.plot.training import embedding

__all__ = ["disentanglement_overview"]


def _predictability_panel(ax, table: pd.DataFrame) -> None:
    names = list(table.index)
    pos = np.arange(len(names))
    width = 0.38
    ax.bar(pos - width / 2, table["batch_accuracy"], width, color="#7570b3", label="batch")
    ax.bar(pos + width / 2, table["label_accuracy"], width, color="#1b9e77", label="label")
    for col, colour in (("batch_chance", "#7570b3"), ("label_chance", "#1b9e77")):
        ax.hlines(table[col], pos - 0.45, pos + 0.45, colors=colour, linestyles="dotted")
    ax.set_xticks(pos, [f"z_{n}" for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy (logistic regression)")
    ax.set_title("what each latent predicts (dotted: chance)")
    ax.legend(frameon=False, loc="lower right")


def _genes_panel(ax, ranked: pd.DataFrame, n_top: int) -> None:
    groups = list(pd.unique(ranked["group"]))
    cell_text = []
    for g in groups:
        sub = ranked[ranked["group"] == g].sort_values("rank").head(n_top)
        genes = []
        for _, row in sub.iterrows():
            q = row.get("qvalue", np.nan)
            genes.append(row["feature"] + ("" if pd.isna(q) else f" (q={q:.2g})"))
        cell_text.append([str(g), ", ".join(genes)])
    ax.axis("off")
    table = ax.table(cellText=cell_text, colLabels=["cell type", f"top {n_top} genes"],
                     loc="center", cellLoc="left", colLoc="left", colWidths=[0.25, 0.75])
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 1.3)
    ax.set_title("genes driving the label head (attributions)")


def disentanglement_overview(
    adata: AnnData,
    predictability: pd.DataFrame,
    ranked: pd.DataFrame | None = None,
    basis: str = "X_umap",
    label_key: str = "labels",
    batch_key: str = "batch",
    n_top: int = 5,
    title: str | None = None,
) -> Figure:
    """Overview of a FADVI run.

    Panels: the embedding ``obsm[basis]`` (e.g. a UMAP of ``z_l``) coloured by ``label_key``
    and by ``batch_key``; batch and label predictability of each latent
    (:func:`cellsight.models.fadvi.metrics.disentanglement_table`); and, with ``ranked``, the
    top genes per cell type (a tidy ranking with ``group``, ``feature``, ``rank`` and optionally
    ``qvalue`` columns).

    Returns
    -------
    The matplotlib Figure.
    """
    missing = {"batch_accuracy", "label_accuracy", "batch_chance", "label_chance"}
    missing -= set(predictability.columns)
    if missing:
        raise ValueError(
            f"predictability lacks columns {sorted(missing)}; pass the DataFrame of "
            "cellsight.models.fadvi.metrics.disentanglement_table."
        )
    if ranked is not None and not {"group", "feature", "rank"} <= set(ranked.columns):
        raise ValueError("ranked needs 'group', 'feature' and 'rank' columns (rank_features).")
    n_rows = 2 if ranked is not None else 1
    fig = plt.figure(figsize=(16, 5 * n_rows))
    grid = fig.add_gridspec(n_rows, 3)
    embedding(adata, basis=basis, color=label_key, ax=fig.add_subplot(grid[0, 0]),
              title=f"{basis} by {label_key}")
    embedding(adata, basis=basis, color=batch_key, ax=fig.add_subplot(grid[0, 1]),
              title=f"{basis} by {batch_key}")
    _predictability_panel(fig.add_subplot(grid[0, 2]), predictability)
    if ranked is not None:
        _genes_panel(fig.add_subplot(grid[1, :]), ranked, n_top)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
