"""Tools that stream: PCA and quantiles over AnnData, files or shards (scanpy-like).

``data`` is an in-memory AnnData, a ``.h5ad`` path, a list of shard paths, or a stub from
:func:`cellsight.data.read_shards`. For an in-memory AnnData, results are also written where
scanpy writes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellsight.stats.base import fit_statistic
from cellsight.stats.data import stream_data
from cellsight.stats.ipca import IncrementalPCA, check_n_components
from cellsight.stats.mean_var import OnePassMeanVarStd
from cellsight.stats.tdigest import TDigest, check_quantiles
from cellsight.stats.transforms import (
    ZScore,
    apply_transforms,
    bind_transforms,
    check_max_value,
    standard_transforms,
)

__all__ = ["pca", "quantiles", "project"]

Data = AnnData | str | os.PathLike | Sequence[str | os.PathLike]


def _pca_genes(data: Data, genes: Sequence[str] | None, use_highly_variable: bool | None):
    """Genes for PCA: explicit, else ``var["highly_variable"]`` of an AnnData (scanpy's default)."""
    if genes is not None:
        return list(genes)
    has_hvg = isinstance(data, AnnData) and "highly_variable" in data.var.columns
    if use_highly_variable is None:
        use_highly_variable = has_hvg
    if not use_highly_variable:
        return None
    if not has_hvg:
        raise ValueError(
            "use_highly_variable=True but data has no var['highly_variable']; run "
            "cellsight.pp.highly_variable_genes first, or pass genes=."
        )
    return list(data.var_names[data.var["highly_variable"].to_numpy(dtype=bool)])


@torch.no_grad()
def project(
    model: IncrementalPCA,
    adata: AnnData,
    transforms: Sequence[torch.nn.Module] = (),
    *,
    layer: str | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Embed every cell of an in-memory AnnData: ``(n_cells, n_components)`` float32.

    ``transforms`` must be bound to ``adata``'s genes (as after a fit with them).
    """
    from cellsight.data.loaders import TensorBatchLoader
    from cellsight.stats.data import anndata_arrays

    arrays, _ = anndata_arrays(adata, layer, None, require_counts=False)
    loader = TensorBatchLoader(arrays, batch_size=batch_size, shuffle=False, distributed=False)
    parts = []
    for batch in loader:
        x_ng = apply_transforms(transforms, batch["X"].to(torch.float64))
        parts.append(model.predict(x_ng)["x_ng"].float().numpy())
    return np.concatenate(parts)


def pca(
    data: Data,
    n_components: int = 50,
    *,
    layer: str | None = None,
    normalize_total: float | None = None,
    log1p: bool = False,
    zscore: bool = False,
    max_value: float | None = None,
    genes: Sequence[str] | None = None,
    use_highly_variable: bool | None = None,
    algorithm: Literal["auto", "incremental", "gram"] = "auto",
    svd_lowrank_niter: int = 2,
    n_oversamples: int = 10,
    seed: int = 0,
    batch_size: int = 1024,
    devices: int = 1,
    num_workers: int = 0,
    inplace: bool = True,
) -> IncrementalPCA:
    """Principal components in one streaming pass (two with ``zscore``).

    Parameters
    ----------
    data
        AnnData, ``.h5ad`` path, or shard paths.
    n_components
        Number of components: an integer with ``1 <= n_components <= min(n_cells, n_genes)``
        (checked before the pass; more would give all-zero components).
    layer
        Layer to read (``None``: ``X``).
    normalize_total, log1p
        Per-batch transforms applied first (see :func:`cellsight.pp.mean_var`; both need
        non-negative data).
    zscore
        Scale every gene to unit variance (scanpy's ``scale``): a mean/variance pass first,
        then PCA of the z-scored data.
    max_value
        With ``zscore``: clip the z-scores to ``[-max_value, max_value]``, as scanpy's; must be
        ``> 0`` (``None``: no clipping). Only valid with ``zscore=True``.
    genes
        Genes to use; default: ``var["highly_variable"]`` of an AnnData when present
        (``use_highly_variable``), else all.
    algorithm, svd_lowrank_niter, n_oversamples, seed
        See :class:`cellsight.stats.IncrementalPCA` (``"auto"`` is exact up to 4096 genes).
    batch_size, devices, num_workers
        Cells per minibatch; processes; DataLoader workers per process (shards).
    inplace
        For an in-memory AnnData write ``obsm["X_pca"]``, ``varm["PCs"]`` (genes not used are
        zero), ``uns["pca"]["variance"]`` (ddof=1, as scanpy) and ``["variance_ratio"]``.

    Returns
    -------
    The fitted :class:`cellsight.stats.IncrementalPCA`.
    """
    max_value = check_max_value(max_value)
    if max_value is not None and not zscore:
        raise ValueError(
            f"max_value={max_value} clips z-scores, but zscore=False; pass zscore=True to "
            "scale and clip, or drop max_value."
        )
    use_genes = _pca_genes(data, genes, use_highly_variable)
    src = stream_data(
        data, layer=layer, batch_size=batch_size, num_workers=num_workers
    )
    transforms = standard_transforms(normalize_total, log1p, use_genes)
    # unknown genes fail here, before n_components is checked against them or data are read
    out_genes = bind_transforms(transforms, src.var_names_g)
    check_n_components(n_components, len(out_genes), src.n_obs)
    if zscore:
        mv = OnePassMeanVarStd(out_genes, algorithm="shifted_data", output_path=None)
        fit_statistic(mv, src.datamodule, transforms=transforms,
                      input_var_names_g=src.var_names_g, devices=devices)
        # scanpy's scale divides by the sample standard deviation (ddof=1)
        stats = mv.to_dataframe(ddof=1)
        transforms = standard_transforms(normalize_total, log1p, use_genes) + [
            ZScore(stats["mean"], stats["std"], out_genes, max_value=max_value)
        ]
    model = IncrementalPCA(
        out_genes, n_components, svd_lowrank_niter=svd_lowrank_niter,
        n_oversamples=n_oversamples, algorithm=algorithm, seed=seed,
    )
    fit_statistic(model, src.datamodule, transforms=transforms,
                  input_var_names_g=src.var_names_g, devices=devices, seed=seed)
    adata = src.adata
    if inplace and adata is not None:
        adata.obsm["X_pca"] = project(model, adata, transforms, layer=layer)
        pcs = np.zeros((adata.n_vars, n_components), dtype=np.float32)
        pos = pd.Index(adata.var_names).get_indexer(out_genes)
        pcs[pos[pos >= 0]] = model.components_kg.T.numpy()[pos >= 0]
        adata.varm["PCs"] = pcs
        n = float(model.x_size)
        variance = (model.explained_variance_k * n / max(n - 1, 1)).numpy()
        adata.uns["pca"] = {
            "variance": variance,
            "variance_ratio": model.explained_variance_ratio_k.numpy(),
            "params": {"zero_center": True, "use_highly_variable": use_genes is not None,
                       "mask_var": None},
        }
    return model


def quantiles(
    data: Data,
    q: float | Sequence[float] = (0.5,),
    *,
    layer: str | None = None,
    normalize_total: float | None = None,
    log1p: bool = False,
    genes: Sequence[str] | None = None,
    compression: int = 200,
    batch_size: int = 1024,
    devices: int = 1,
    num_workers: int = 0,
) -> pd.DataFrame:
    """Per-gene quantiles of the non-zero values, from t-digests built in one streaming pass.

    Parameters
    ----------
    data
        AnnData, ``.h5ad`` path, or shard paths.
    q
        Quantiles in ``[0, 1]``: a sequence, or one number (treated as ``[q]``: the result
        has the same single column either way).
    layer, normalize_total, log1p, genes
        What to summarise (see :func:`cellsight.pp.mean_var`).
    compression
        Centroids per gene (accuracy; see :class:`cellsight.stats.TDigest`).
    batch_size, devices, num_workers
        Cells per minibatch; processes; DataLoader workers per process (shards).

    Returns
    -------
    DataFrame indexed by gene with one column per quantile, named by the float ``q`` (NaN
    for a gene without non-zero values).
    """
    q = check_quantiles(q)
    src = stream_data(data, layer=layer, batch_size=batch_size, num_workers=num_workers)
    transforms = standard_transforms(normalize_total, log1p, genes)
    out_genes = bind_transforms(transforms, src.var_names_g)
    model = TDigest(out_genes, compression=compression)
    fit_statistic(model, src.datamodule, transforms=transforms,
                  input_var_names_g=src.var_names_g, devices=devices)
    df = model.to_dataframe(q).drop(columns=["n_nonzero"])
    df.columns = pd.Index(q, dtype=float)
    return df
