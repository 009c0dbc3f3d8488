"""Evaluation data for FADVI: hidden-label splits of real counts with a planted batch effect.

The batch-effect simulator itself is :func:`cellsight.datasets.simulate_batch_effect`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["hide_labels", "pbmc_with_batches"]


def hide_labels(
    labels: pd.Series | np.ndarray,
    fraction: float = 0.2,
    unlabeled_category: str = "Unknown",
    seed: int = 0,
) -> tuple[pd.Categorical, np.ndarray]:
    """Replace a stratified random ``fraction`` of labels by ``unlabeled_category``.

    Every class keeps at least one labelled cell and, if it has two or more cells, at least
    one hidden cell is drawn with probability ``fraction``.

    Returns
    -------
    The labels with the hidden ones replaced (categorical) and the boolean mask of hidden cells.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1).")
    values = np.asarray(labels).astype(str)
    if unlabeled_category in set(values):
        raise ValueError(f"The labels already contain {unlabeled_category!r}; pick another name.")
    rng = np.random.default_rng(seed)
    hidden = np.zeros(len(values), dtype=bool)
    for cls in np.unique(values):
        idx = np.flatnonzero(values == cls)
        n_hide = min(int(round(fraction * len(idx))), len(idx) - 1)
        hidden[rng.choice(idx, n_hide, replace=False)] = True
    out = values.astype(object).copy()
    out[hidden] = unlabeled_category
    cats = sorted(set(values)) + [unlabeled_category]
    return pd.Categorical(out, categories=cats), hidden


def pbmc_with_batches(
    fraction_hidden: float = 0.2, sigma: float = 0.5, seed: int = 0
) -> tuple[AnnData, np.ndarray]:
    """The bundled PBMC 68k counts (700 cells, 765 genes) in two simulated batches with
    ``fraction_hidden`` of the ``bulk_labels`` hidden in ``obs["labels_observed"]``
    (:func:`cellsight.datasets.simulate_batch_effect` with ``sigma``, then :func:`hide_labels`).

    Returns
    -------
    The AnnData (``obs["batch"]``, ``obs["bulk_labels"]`` true labels, ``obs["labels_observed"]``
    with ``"Unknown"`` for hidden cells) and the mask of hidden cells.
    """
    from cellsight.datasets import pbmc68k_reduced, simulate_batch_effect

    adata = simulate_batch_effect(pbmc68k_reduced(), sigma=sigma, seed=seed)
    observed, hidden = hide_labels(adata.obs["bulk_labels"], fraction_hidden, seed=seed)
    adata.obs["labels_observed"] = observed
    return adata, hidden
