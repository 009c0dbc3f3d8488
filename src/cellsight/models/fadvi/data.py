"""Evaluation data for FADVI: a batch effect planted into real counts, hidden-label splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["add_batch_effect", "hide_labels", "pbmc_with_batches"]


def add_batch_effect(
    adata: AnnData,
    n_batches: int = 2,
    sigma: float = 0.5,
    depth_sigma: float = 0.3,
    batch_key: str = "batch",
    seed: int = 0,
) -> AnnData:
    """A copy of ``adata`` with its cells split into batches that differ per gene and in depth.

    Each cell is assigned a batch uniformly at random. Batch ``b`` has a per-gene multiplicative
    effect ``e_bg ~ LogNormal(0, sigma)`` and a sequencing depth factor
    ``d_b ~ LogNormal(0, depth_sigma)``; the new counts are drawn as
    ``Poisson(x_ng * e_bg * d_b)`` from the original counts ``x_ng``, so the batches differ
    the way real platforms and protocols do (gene-specific capture efficiency, depth), and the
    counts stay counts. A cell whose counts all vanish gets one count in its largest gene.

    Parameters
    ----------
    adata
        Cells x genes with integer counts in ``X`` (not modified).
    n_batches
        Number of batches.
    sigma
        Log-scale standard deviation of the per-gene effects (0.5: a typical gene differs by a
        factor ``exp(0.5 * sqrt(2)) ~ 2`` between two batches).
    depth_sigma
        Log-scale standard deviation of the per-batch depth factors.
    batch_key
        ``obs`` column written with the batch names (``"batch0"``, ``"batch1"`` ...).
    seed
        Seeds the assignment, the effects and the resampling.

    Returns
    -------
    New AnnData (CSR float32 counts); the effects are in ``varm["batch_effect"]`` (genes x
    batches) and the depth factors in ``uns["batch_depth"]``.
    """
    if n_batches < 1 or sigma < 0 or depth_sigma < 0:
        raise ValueError("n_batches must be >= 1 and sigma, depth_sigma >= 0.")
    rng = np.random.default_rng(seed)
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    if (x < 0).any() or not np.allclose(x, np.round(x)):
        raise ValueError("adata.X must hold non-negative integer counts to resample them.")
    batch_n = rng.integers(0, n_batches, adata.n_obs)
    effect_bg = rng.lognormal(0.0, sigma, (n_batches, adata.n_vars))
    depth_b = rng.lognormal(0.0, depth_sigma, n_batches)
    rate_ng = x * effect_bg[batch_n] * depth_b[batch_n, None]
    counts_ng = rng.poisson(rate_ng).astype(np.float32)
    empty = np.flatnonzero(counts_ng.sum(1) == 0)
    counts_ng[empty, x[empty].argmax(1)] = 1.0
    out = AnnData(
        X=sp.csr_matrix(counts_ng), obs=adata.obs.copy(), var=adata.var.copy(),
    )
    names = [f"batch{b}" for b in range(n_batches)]
    out.obs[batch_key] = pd.Categorical(np.asarray(names)[batch_n], categories=names)
    out.varm["batch_effect"] = effect_bg.T.copy()
    out.uns["batch_depth"] = depth_b
    return out


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
    ``fraction_hidden`` of the ``bulk_labels`` hidden in ``obs["labels_observed"]``.

    Returns
    -------
    The AnnData (``obs["batch"]``, ``obs["bulk_labels"]`` true labels, ``obs["labels_observed"]``
    with ``"Unknown"`` for hidden cells) and the mask of hidden cells.
    """
    from cellsight.datasets import pbmc68k_reduced

    adata = add_batch_effect(pbmc68k_reduced(), sigma=sigma, seed=seed)
    observed, hidden = hide_labels(adata.obs["bulk_labels"], fraction_hidden, seed=seed)
    adata.obs["labels_observed"] = observed
    return adata, hidden
