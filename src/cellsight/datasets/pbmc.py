"""Bundled human PBMC datasets: pbmc68k_reduced (labelled), pbmc3k, CITE-seq 5k/10k."""

from __future__ import annotations

from typing import Literal

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellsight.datasets._files import read_bundled

__all__ = ["pbmc68k_reduced", "pbmc3k", "pbmc_cite"]

# largest allowed distance of a recovered count from the nearest integer (observed: 0.08)
_COUNT_TOL = 0.25


def pbmc68k_reduced() -> AnnData:
    """700 labelled PBMCs (10x Genomics PBMC 68k subset) with integer UMI counts.

    The file shipped by scanpy holds scaled data in ``X`` and ``log1p`` of counts per 10,000 in
    ``raw.X``. The counts are recovered exactly as
    ``round(expm1(raw.X) * n_counts / 1e4)`` (``n_counts``: the cell's total count before gene
    filtering); every recovered value is checked to lie within 0.25 of an integer (the largest
    deviation in the file is 0.08, from float32 storage).

    Returns
    -------
    AnnData
        700 cells x 765 genes. ``X``: integer UMI counts (CSR, float32). ``obs``:
        ``bulk_labels`` (10 cell types), ``louvain`` (11 clusters), ``phase``, ``n_genes``,
        ``percent_mito``, ``n_counts`` (total counts over *all* genes of the original
        experiment, so larger than the row sums of ``X``), ``S_score``, ``G2M_score``.
        ``var``: scanpy's HVG columns. ``obsm``: ``X_pca``, ``X_umap`` (as shipped, computed by
        scanpy from the scaled data). ``uns``: ``bulk_labels_colors``, ``louvain_colors``.

    Notes
    -----
    Source: ``scanpy==1.11.5``, ``scanpy/datasets/10x_pbmc68k_reduced.h5ad``; licence
    BSD-3-Clause (see ``cellsight/datasets/data/LICENSES.md``).
    """
    src = read_bundled("pbmc68k_reduced")
    if src.raw is None or not src.raw.var_names.equals(src.var_names):
        raise ValueError(
            "The bundled pbmc68k_reduced file has no raw matrix matching its genes; the file is "
            "damaged, reinstall cellsight."
        )
    log_cp10k = src.raw.X
    log_cp10k = log_cp10k.toarray() if sp.issparse(log_cp10k) else np.asarray(log_cp10k)
    n_counts_n1 = src.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts_ng = np.expm1(log_cp10k.astype(np.float64)) * n_counts_n1 / 1e4
    rounded_ng = np.round(counts_ng)
    worst = float(np.max(np.abs(counts_ng - rounded_ng))) if counts_ng.size else 0.0
    if worst > _COUNT_TOL or (rounded_ng < 0).any():
        raise ValueError(
            f"Recovering integer counts from pbmc68k_reduced failed (largest distance from an "
            f"integer {worst:.3f} > {_COUNT_TOL}); the bundled file is damaged, reinstall "
            "cellsight."
        )
    adata = AnnData(
        X=sp.csr_matrix(rounded_ng.astype(np.float32)),
        obs=src.obs.copy(),
        var=src.var.copy(),
        obsm={k: np.asarray(v).copy() for k, v in src.obsm.items()},
    )
    for key in ("bulk_labels_colors", "louvain_colors"):
        if key in src.uns:
            adata.uns[key] = np.asarray(src.uns[key]).copy()
    return adata


def pbmc3k() -> AnnData:
    """2,700 PBMCs from 10x Genomics (PBMC 3k, hg19), all genes, raw counts, no labels.

    Returns
    -------
    AnnData
        2,700 cells x 32,738 genes. ``X``: raw integer UMI counts (CSR, float32). ``obs``:
        ``barcode``. ``var``: ``gene_ids`` (Ensembl), ``gene_symbols``. No cell-type labels.

    Notes
    -----
    Source: ``desc==2.1.1`` wheel, ``desc/datasets/pbmc.h5ad``; licence MIT (see
    ``cellsight/datasets/data/LICENSES.md``). The file is the largest bundled one (20 MB).
    """
    return read_bundled("pbmc3k")


def _cite(name: str) -> AnnData:
    adata = read_bundled(name)
    names = [str(p) for p in np.asarray(adata.uns["protein_names"])]
    adata.obsm["protein_expression"] = pd.DataFrame(
        np.asarray(adata.obsm["protein_expression"]), index=adata.obs_names, columns=names
    )
    return adata


def pbmc_cite(which: Literal["5k", "10k", "both"] = "both") -> AnnData:
    """200-cell subsets of the 10x Genomics PBMC 5k and 10k CITE-seq experiments (RNA + ADT).

    Parameters
    ----------
    which
        ``"5k"``, ``"10k"``, or ``"both"``: the two concatenated on the genes (and proteins)
        they share, with the experiment in ``obs["batch"]``, a real 2-batch CITE-seq set.

    Returns
    -------
    AnnData
        ``"5k"``: 200 cells x 16,581 genes; ``"10k"``: 200 x 16,727; ``"both"``: 400 x 15,792
        (``obs["batch"]`` in ``{"pbmc_5k", "pbmc_10k"}``, cell names suffixed ``-pbmc_5k`` /
        ``-pbmc_10k`` as two barcodes occur in both). ``X``: raw integer UMI counts (dense
        float32). ``obsm["protein_expression"]``: ADT counts as a DataFrame with protein names
        as columns (29 proteins in 5k, 14 in 10k, the 14 shared in ``"both"``), also listed in
        ``uns["protein_names"]``. ``obs``: ``n_genes``, ``percent_mito``, ``n_counts``. No
        cell-type labels.

    Notes
    -----
    Source: ``scvi-tools==1.4.2`` sdist, ``tests/test_data/pbmc_5k_protein_v3.h5ad`` and
    ``tests/test_data/pbmc_10k_protein_v3.h5ad``; licence BSD-3-Clause (see
    ``cellsight/datasets/data/LICENSES.md``).
    """
    if which not in ("5k", "10k", "both"):
        raise ValueError(f"which={which!r} is not one of '5k', '10k', 'both'.")
    if which != "both":
        return _cite(f"pbmc_cite_{which}")
    parts = {"pbmc_5k": _cite("pbmc_cite_5k"), "pbmc_10k": _cite("pbmc_cite_10k")}
    proteins = [
        p
        for p in parts["pbmc_5k"].obsm["protein_expression"].columns
        if p in set(parts["pbmc_10k"].obsm["protein_expression"].columns)
    ]
    for part in parts.values():
        part.obsm["protein_expression"] = part.obsm["protein_expression"][proteins]
        part.uns["protein_names"] = np.asarray(proteins, dtype=object)
    adata = anndata.concat(
        parts, join="inner", label="batch", index_unique="-", merge="same", uns_merge="same"
    )
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"], categories=list(parts))
    return adata
