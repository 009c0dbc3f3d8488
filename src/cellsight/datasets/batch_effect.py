"""A batch effect planted into real counts: per-gene capture efficiency and per-batch depth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["simulate_batch_effect"]


def simulate_batch_effect(
    adata: AnnData,
    n_batches: int = 2,
    sigma: float = 0.5,
    depth_sigma: float = 0.3,
    batch_key: str = "batch",
    layer: str | None = None,
    seed: int = 0,
) -> AnnData:
    """A copy of ``adata`` whose cells are split into batches that differ per gene and in depth.

    Each cell is assigned a batch uniformly at random. Batch ``b`` has a per-gene multiplicative
    effect ``e_bg ~ LogNormal(0, sigma)`` and a sequencing-depth factor
    ``d_b ~ LogNormal(0, depth_sigma)``; the new counts are drawn as
    ``Poisson(x_ng * e_bg * d_b)`` from the original counts ``x_ng``, so the batches differ
    the way platforms and protocols do (gene-specific capture efficiency, depth) while the
    biology (which cell expresses what) is the original one and the counts stay counts. A cell
    whose counts all vanish gets one count in its largest gene. The true effects are returned,
    so a method's batch correction can be checked against them.

    Works on the non-zero counts only (sparse input stays sparse; a zero count stays zero).

    Parameters
    ----------
    adata
        Cells x genes with non-negative integer counts (not modified).
    n_batches
        Number of batches (``>= 1``).
    sigma
        Log-scale standard deviation of the per-gene effects (0.5: a typical gene differs by a
        factor ``exp(0.5 * sqrt(2)) ~ 2`` between two batches).
    depth_sigma
        Log-scale standard deviation of the per-batch depth factors.
    batch_key
        ``obs`` column written with the batch names (``"batch0"``, ``"batch1"``, ...).
    layer
        Layer holding the counts (``None``: ``adata.X``).
    seed
        Seeds the assignment, the effects and the resampling.

    Returns
    -------
    New AnnData with the resampled counts in ``X`` (CSR, float32), ``obs`` and ``var`` copied,
    ``obs[batch_key]`` categorical, the effects ``e_bg`` in ``varm["batch_effect"]`` (genes x
    batches) and the depth factors ``d_b`` in ``uns["batch_depth"]``.

    Examples
    --------
    >>> from cellsight.datasets import pbmc68k_reduced, simulate_batch_effect
    >>> adata = simulate_batch_effect(pbmc68k_reduced(), sigma=0.5, seed=0)
    >>> adata.obs["batch"].value_counts().sort_index().index.tolist()
    ['batch0', 'batch1']
    """
    if int(n_batches) < 1:
        raise ValueError(f"n_batches={n_batches} must be >= 1.")
    for name, value in (("sigma", sigma), ("depth_sigma", depth_sigma)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} must be a finite number >= 0.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"layer={layer!r} is not in adata.layers ({list(adata.layers)}); pass layer=None "
            "to use adata.X."
        )
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    x = sp.csr_matrix(adata.X if layer is None else adata.layers[layer], dtype=np.float64)
    x.sum_duplicates()
    x.sort_indices()
    values = x.data
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        raise ValueError(
            f"{where} has {int(bad.sum())} value(s) that are not non-negative integer counts "
            f"(e.g. {values[bad][0]!r}); simulate_batch_effect resamples raw counts. Pass the "
            "raw counts (e.g. layer='counts')."
        )
    rng = np.random.default_rng(seed)
    n_batches = int(n_batches)
    batch_n = rng.integers(0, n_batches, adata.n_obs)
    effect_bg = rng.lognormal(0.0, sigma, (n_batches, adata.n_vars))
    depth_b = rng.lognormal(0.0, depth_sigma, n_batches)
    rows = np.repeat(np.arange(adata.n_obs), np.diff(x.indptr))
    rate = values * effect_bg[batch_n[rows], x.indices] * depth_b[batch_n[rows]]
    # numpy's Poisson draws nothing for a zero rate, so drawing at the non-zeros in row-major
    # order gives the counts a dense draw over the whole matrix would give
    counts = sp.csr_matrix(
        (rng.poisson(rate).astype(np.float32), x.indices.copy(), x.indptr.copy()),
        shape=x.shape,
    )
    empty = np.flatnonzero(np.asarray(counts.sum(1)).ravel() == 0)
    if len(empty):
        counts = counts.tolil()
        largest = np.asarray(x[empty].argmax(1)).ravel()
        counts[empty, largest] = 1.0
        counts = counts.tocsr()
    counts.eliminate_zeros()
    out = AnnData(X=counts, obs=adata.obs.copy(), var=adata.var.copy())
    names = [f"batch{b}" for b in range(n_batches)]
    out.obs[batch_key] = pd.Categorical(np.asarray(names)[batch_n], categories=names)
    out.varm["batch_effect"] = effect_bg.T.copy()
    out.uns["batch_depth"] = depth_b
    return out
