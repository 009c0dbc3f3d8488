"""Simulated counts with planted truth: cell types with marker genes, batch effects, dropout.

The generative model (all draws from one ``numpy.random.Generator`` seeded with ``seed``):

* gene base expression ``base_g ~ LogNormal(0, gene_mean_sd)`` (or ``gene_means`` given);
* each cell type ``c`` owns ``n_markers_per_type`` marker genes (disjoint sets) whose base
  expression is multiplied by ``fold_cg ~ marker_fold_change * LogNormal(0, 0.1)``; the
  expression profile of a type is ``rho_cg = mean_cg / sum_g mean_cg``;
* each batch ``b`` multiplies gene ``g`` by ``batch_factor_bg ~ LogNormal(0, batch_effect_sd)``;
* each cell has a library size ``l_n = library_size * LogNormal(0, library_size_sd)``;
* counts ``x_ng ~ NB(mean = l_n * rho_{c(n) g} * batch_factor_{b(n) g}, inverse dispersion
  theta)`` drawn as Gamma-Poisson; ``dispersion=None`` gives Poisson;
* with ``dropout > 0`` every entry is set to zero independently with that probability
  (zero-inflation, as a ZINB likelihood assumes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["simulate_counts"]

# cells simulated at once: bounds memory; a constant, so a seed gives the same data everywhere
_CHUNK = 8192


def _check(name: str, ok: bool, hint: str) -> None:
    if not ok:
        raise ValueError(f"simulate_counts: {name} {hint}")


def simulate_counts(
    n_cells: int = 1000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    n_batches: int = 2,
    *,
    n_markers_per_type: int = 20,
    marker_fold_change: float = 5.0,
    batch_effect_sd: float = 0.3,
    library_size: float = 3000.0,
    library_size_sd: float = 0.3,
    dispersion: float | None = 5.0,
    dropout: float = 0.0,
    gene_mean_sd: float = 1.0,
    gene_means: Sequence[float] | np.ndarray | None = None,
    cell_type_proportions: Sequence[float] | None = None,
    seed: int = 0,
) -> AnnData:
    """Simulate negative-binomial counts with cell types, marker genes and batch effects.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix.
    n_cell_types
        Number of cell types (``obs["cell_type"]``: ``"type_0"``, ``"type_1"``, ...).
    n_batches
        Number of batches (``obs["batch"]``: ``"batch_0"``, ...), assigned uniformly at random,
        independently of the cell type.
    n_markers_per_type
        Marker genes per cell type (disjoint sets); needs
        ``n_cell_types * n_markers_per_type <= n_genes``.
    marker_fold_change
        Typical fold change of a marker gene in its own type over the other types (each marker
        gets ``marker_fold_change * LogNormal(0, 0.1)``).
    batch_effect_sd
        Standard deviation of the log of the multiplicative per-gene batch factors
        (0: no batch effect).
    library_size
        Median total count of a cell before batch factors.
    library_size_sd
        Standard deviation of the log library size across cells.
    dispersion
        NB inverse dispersion ``theta`` (variance ``mu + mu**2 / theta``), ``None`` for Poisson.
    dropout
        Probability in ``[0, 1)`` that an entry is zeroed independently of its mean.
    gene_mean_sd
        Standard deviation of the log base expression of the genes.
    gene_means
        Base expression of the genes (positive, length ``n_genes``), e.g. the gene means of a
        real dataset; replaces the log-normal draw.
    cell_type_proportions
        Expected fraction of cells of each type (default: equal).
    seed
        Seed of every random draw: the same arguments give identical data.

    Returns
    -------
    AnnData
        ``n_cells x n_genes``; ``X``: integer counts (CSR, float32). ``obs``: ``cell_type``,
        ``batch`` (categorical), ``library_size`` (the drawn ``l_n``). ``var``: ``is_marker``,
        ``marker_type`` (the type a marker belongs to, NaN otherwise). ``varm``:
        ``batch_factor`` (genes x batches, the planted multiplicative factors) and
        ``type_profile`` (genes x types, ``rho`` above, columns summing to 1). ``layers``:
        ``counts_before_dropout`` when ``dropout > 0``. ``uns["simulation"]``: the arguments.

    Examples
    --------
    >>> adata = simulate_counts(n_cells=300, n_genes=200, n_cell_types=3, n_batches=2, seed=0)
    >>> adata.obs["cell_type"].nunique(), adata.obs["batch"].nunique()
    (3, 2)
    """
    _check("n_cells", int(n_cells) >= 1, f"must be >= 1, got {n_cells}.")
    _check("n_genes", int(n_genes) >= 1, f"must be >= 1, got {n_genes}.")
    _check("n_cell_types", int(n_cell_types) >= 1, f"must be >= 1, got {n_cell_types}.")
    _check("n_batches", int(n_batches) >= 1, f"must be >= 1, got {n_batches}.")
    n_cells, n_genes, n_types, n_batches = map(int, (n_cells, n_genes, n_cell_types, n_batches))
    n_markers = int(n_markers_per_type)
    _check(
        "n_markers_per_type",
        n_markers >= 0 and n_types * n_markers <= n_genes,
        f"* n_cell_types = {n_markers} * {n_types} marker genes do not fit in n_genes="
        f"{n_genes}; lower n_markers_per_type or raise n_genes.",
    )
    _check("marker_fold_change", marker_fold_change > 0, f"must be > 0, got {marker_fold_change}.")
    for name, value in (
        ("batch_effect_sd", batch_effect_sd),
        ("library_size_sd", library_size_sd),
        ("gene_mean_sd", gene_mean_sd),
    ):
        _check(name, value >= 0 and np.isfinite(value), f"must be finite and >= 0, got {value}.")
    _check("library_size", library_size > 0, f"must be > 0, got {library_size}.")
    _check(
        "dispersion",
        dispersion is None or dispersion > 0,
        f"must be > 0 or None (Poisson), got {dispersion}.",
    )
    _check("dropout", 0 <= dropout < 1, f"must be in [0, 1), got {dropout}.")
    if cell_type_proportions is None:
        props_c = np.full(n_types, 1.0 / n_types)
    else:
        props_c = np.asarray(cell_type_proportions, dtype=np.float64)
        _check(
            "cell_type_proportions",
            props_c.shape == (n_types,) and (props_c >= 0).all() and props_c.sum() > 0,
            f"must be {n_types} non-negative numbers with a positive sum, got {props_c.tolist()}.",
        )
        props_c = props_c / props_c.sum()

    rng = np.random.default_rng(seed)
    if gene_means is None:
        base_g = np.exp(rng.normal(0.0, gene_mean_sd, n_genes))
    else:
        base_g = np.asarray(gene_means, dtype=np.float64)
        _check(
            "gene_means",
            base_g.shape == (n_genes,) and np.isfinite(base_g).all() and (base_g > 0).all(),
            f"must be {n_genes} positive finite numbers (got shape {base_g.shape}).",
        )
    marker_genes = rng.permutation(n_genes)[: n_types * n_markers].reshape(n_types, n_markers)
    mean_cg = np.tile(base_g, (n_types, 1))
    for c in range(n_types):
        fold = marker_fold_change * np.exp(rng.normal(0.0, 0.1, n_markers))
        mean_cg[c, marker_genes[c]] *= fold
    rho_cg = mean_cg / mean_cg.sum(axis=1, keepdims=True)
    batch_factor_bg = np.exp(rng.normal(0.0, batch_effect_sd, (n_batches, n_genes)))

    type_n = rng.choice(n_types, size=n_cells, p=props_c)
    batch_n = rng.integers(0, n_batches, size=n_cells)
    library_n = library_size * np.exp(rng.normal(0.0, library_size_sd, n_cells))

    blocks, blocks_before = [], []
    for start in range(0, n_cells, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_cells))
        mu_ng = library_n[sl, None] * rho_cg[type_n[sl]] * batch_factor_bg[batch_n[sl]]
        if dispersion is None:
            rate_ng = mu_ng
        else:
            rate_ng = rng.gamma(shape=dispersion, scale=mu_ng / dispersion)
        x_ng = rng.poisson(rate_ng).astype(np.float32)
        if dropout > 0:
            blocks_before.append(sp.csr_matrix(x_ng))
            x_ng[rng.random(x_ng.shape) < dropout] = 0.0
        blocks.append(sp.csr_matrix(x_ng))

    type_names = [f"type_{c}" for c in range(n_types)]
    batch_names = [f"batch_{b}" for b in range(n_batches)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(type_n, categories=type_names),
            "batch": pd.Categorical.from_codes(batch_n, categories=batch_names),
            "library_size": library_n,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    marker_code_g = np.full(n_genes, -1)
    for c in range(n_types):
        marker_code_g[marker_genes[c]] = c
    width = len(str(n_genes - 1))
    var = pd.DataFrame(
        {
            "is_marker": marker_code_g >= 0,
            "marker_type": pd.Categorical.from_codes(marker_code_g, categories=type_names),
        },
        index=[f"gene_{g:0{width}d}" for g in range(n_genes)],
    )
    adata = AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=var)
    adata.varm["batch_factor"] = batch_factor_bg.T.copy()
    adata.varm["type_profile"] = rho_cg.T.copy()
    if dropout > 0:
        adata.layers["counts_before_dropout"] = sp.vstack(blocks_before, format="csr")
    adata.uns["simulation"] = {
        "n_markers_per_type": n_markers,
        "marker_fold_change": float(marker_fold_change),
        "batch_effect_sd": float(batch_effect_sd),
        "library_size": float(library_size),
        "library_size_sd": float(library_size_sd),
        "dispersion": "poisson" if dispersion is None else float(dispersion),
        "dropout": float(dropout),
        "gene_mean_sd": float(gene_mean_sd),
        "seed": int(seed),
    }
    return adata
