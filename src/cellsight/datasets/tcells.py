"""Bundled tumour-infiltrating T cells (Wu et al. 2020), 200 cells with states and patients."""

from __future__ import annotations

from anndata import AnnData

from cellsight.datasets._files import read_bundled

__all__ = ["wu2020"]


def wu2020() -> AnnData:
    """200 T cells from tumour, adjacent normal tissue and blood of 14 patients (Wu et al. 2020).

    Returns
    -------
    AnnData
        200 cells x 30,727 genes. ``X``: raw integer UMI counts (CSR, float32). ``obs``:
        ``cluster_orig`` (16 T-cell states of the publication), ``patient`` (14), ``sample``
        (30), ``source`` (``Tumor`` / ``NAT`` / ``Blood``), ``batch``, and the T-cell receptor
        columns of scirpy (``IR_*``, ``clonotype_orig``, ``has_ir`` ...). ``obsm``:
        ``X_umap_orig``. ``var``: ``gene_ids``, ``feature_types``.

    Notes
    -----
    Source: ``scirpy==0.22.5`` wheel, ``scirpy/tests/data/wu2020_200_v0_11.h5ad``; licence
    BSD-3-Clause (see ``cellsight/datasets/data/LICENSES.md``). Reference: Wu, T.D. et al.
    (2020) Peripheral T cell expansion predicts tumour infiltration and clinical response.
    Nature 579, 274-278.
    """
    return read_bundled("wu2020")
