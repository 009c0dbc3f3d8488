"""Bundled mouse datasets: 10k cells x 1000 genes (raw counts), Visium brain (49 spots)."""

from __future__ import annotations

from anndata import AnnData

from cellsight.datasets._files import read_bundled

__all__ = ["mouse_10k", "visium_mouse_brain"]


def mouse_10k() -> AnnData:
    """10,000 mouse cells (10x Genomics 10k subset) on the first 1,000 genes in genome order.

    Meant for streaming statistics (mean/variance, PCA, HVG, quantiles): many cells, sparse
    raw counts, no annotation.

    Returns
    -------
    AnnData
        10,000 cells x 1,000 genes. ``X``: raw integer UMI counts (CSR, float32; 6.9% non-zero).
        ``var``: ``gene_ids`` (Ensembl). No ``obs`` columns (barcodes only), no labels.

    Notes
    -----
    Source: ``scanpy==1.11.5`` sdist, ``tests/_data/10x-10k-subset.zarr`` (zarr v2 arrays,
    converted once to h5ad with values unchanged); licence BSD-3-Clause (see
    ``cellsight/datasets/data/LICENSES.md``).
    """
    return read_bundled("mouse_10k")


def visium_mouse_brain() -> AnnData:
    """49 Visium spots of an adult mouse brain section, with spatial coordinates.

    Returns
    -------
    AnnData
        49 spots x 1,999 genes. ``X``: **log-normalised** expression (CSR, float32), not counts,
        so count likelihoods reject it. ``obsm["spatial"]``: spot pixel coordinates;
        ``obs["leiden"]``: 5 clusters; ``obs["in_tissue"]``; ``obsm``: ``X_pca``, ``X_umap``;
        ``uns["spatial"]``: image metadata of ``V1_Adult_Mouse_Brain``.

    Notes
    -----
    Source: ``squidpy==1.8.2`` sdist, ``tests/_data/test_data.h5ad`` (10x Genomics Visium
    V1_Adult_Mouse_Brain subset); licence BSD-3-Clause (see
    ``cellsight/datasets/data/LICENSES.md``).
    """
    return read_bundled("visium_mouse_brain")
