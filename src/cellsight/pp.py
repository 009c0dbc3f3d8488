"""Preprocessing that streams: scanpy-like functions over AnnData, files or shards.

``data`` is an in-memory AnnData, a ``.h5ad`` path, a list of shard paths, or a stub from
:func:`cellsight.data.read_shards`; files are streamed and never loaded whole. With
``devices > 1`` the pass runs in several processes (DDP) and the results are reduced across
them. For an in-memory AnnData the results are also written where scanpy writes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import pandas as pd
from anndata import AnnData

from cellsight.stats.base import fit_statistic
from cellsight.stats.data import stream_data
from cellsight.stats.hvg import HVGSeuratV3
from cellsight.stats.mean_var import OnePassMeanVarStd, check_ddof
from cellsight.stats.transforms import bind_transforms, standard_transforms

__all__ = ["highly_variable_genes", "mean_var"]

Data = AnnData | str | os.PathLike | Sequence[str | os.PathLike]


def highly_variable_genes(
    data: Data,
    n_top_genes: int = 2000,
    flavor: Literal["seurat_v3", "seurat_v3_paper"] = "seurat_v3",
    batch_key: str | None = None,
    *,
    layer: str | None = None,
    span: float = 0.3,
    inplace: bool = True,
    batch_size: int = 1024,
    devices: int = 1,
    num_workers: int = 0,
    output_path: str | None = None,
) -> pd.DataFrame:
    """Seurat v3 highly variable genes from raw counts, in two streaming passes.

    The same genes as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3" | "seurat_v3_paper")``.

    Parameters
    ----------
    data
        Raw counts: AnnData, ``.h5ad`` path, or shard paths.
    n_top_genes
        Number of genes to select.
    flavor
        ``"seurat_v3"`` (median rank first) or ``"seurat_v3_paper"`` (number of batches
        first), as scanpy.
    batch_key
        obs column of batches: genes are ranked within each batch, then combined.
    layer
        Layer with the counts (``None``: ``X``).
    span
        LOESS span.
    inplace
        For an in-memory AnnData, write ``var["highly_variable"]``, ``highly_variable_rank``,
        ``means``, ``variances``, ``variances_norm`` (and ``highly_variable_nbatches`` with a
        batch key) and ``uns["hvg"]``, as scanpy does.
    batch_size, devices, num_workers
        Cells per minibatch; processes; DataLoader workers per process (shards).
    output_path
        Also write the table to this CSV.

    Returns
    -------
    DataFrame indexed by gene with the columns above.
    """
    src = stream_data(
        data, layer=layer, batch_key=batch_key, batch_size=batch_size,
        num_workers=num_workers, require_counts=True,
    )
    model = HVGSeuratV3(
        src.var_names_g, n_top_genes, n_batch=src.n_batch, flavor=flavor,
        use_batch_key=batch_key is not None, span=span, output_path=output_path,
    )
    fit_statistic(model, src.datamodule, input_var_names_g=src.var_names_g, devices=devices)
    df = model.hvg_df
    if batch_key is None:
        df = df.drop(columns=["highly_variable_nbatches"])
    if inplace and src.adata is not None:
        var = src.adata.var
        var["highly_variable"] = df["highly_variable"].to_numpy()
        var["highly_variable_rank"] = df["highly_variable_rank"].to_numpy()
        var["means"] = df["means"].to_numpy()
        var["variances"] = df["variances"].to_numpy()
        var["variances_norm"] = df["variances_norm"].to_numpy()
        if batch_key is not None:
            var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
        src.adata.uns["hvg"] = {"flavor": flavor}
    return df


def mean_var(
    data: Data,
    normalize_total: float | None = None,
    log1p: bool = False,
    batch_key: str | None = None,
    *,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    algorithm: Literal["naive", "shifted_data"] = "shifted_data",
    ddof: int = 0,
    batch_size: int = 1024,
    devices: int = 1,
    num_workers: int = 0,
    output_path: str | None = None,
) -> pd.DataFrame:
    """Per-gene mean, variance and standard deviation in one streaming pass.

    Parameters
    ----------
    data
        AnnData, ``.h5ad`` path, or shard paths.
    normalize_total
        Scale every cell to this total first (scanpy's ``target_sum``); ``None``: no scaling.
        Needs non-negative data (a ``ValueError`` otherwise).
    log1p
        Take ``log(1 + x)`` (after normalising). Needs non-negative data (raw or normalised
        counts): a negative value raises a ``ValueError`` at the first minibatch holding one,
        before any result is returned.
    batch_key
        obs column of batches: adds ``mean_<batch>``, ``var_<batch>``, ``std_<batch>``.
    layer
        Layer to read (``None``: ``X``).
    genes
        Only these genes, in this order (after normalising).
    algorithm
        ``"shifted_data"`` (stable) or ``"naive"``.
    ddof
        Delta degrees of freedom of the variance (0: numpy's default; 1: scanpy's): the
        divisor is ``n - ddof``. An integer with ``0 <= ddof < n_cells`` (checked before the
        pass); a batch of ``batch_key`` with ``n <= ddof`` cells gets NaN ``var_<batch>`` and
        ``std_<batch>``, with a ``RuntimeWarning``.
    batch_size, devices, num_workers
        Cells per minibatch; processes; DataLoader workers per process (shards).
    output_path
        Also write the table to this CSV (it can feed a ``ZScore`` transform).

    Returns
    -------
    DataFrame indexed by gene with ``mean``, ``var``, ``std`` (and per-batch columns).
    """
    ddof = check_ddof(ddof)
    src = stream_data(
        data, layer=layer, batch_key=batch_key, batch_size=batch_size, num_workers=num_workers
    )
    if ddof >= src.n_obs:
        raise ValueError(
            f"ddof={ddof} leaves no degrees of freedom: the data have {src.n_obs} cells and "
            "the variance divides by n_cells - ddof; use ddof=0 (population) or 1 (sample)."
        )
    transforms = standard_transforms(normalize_total, log1p, genes)
    out_genes = bind_transforms(transforms, src.var_names_g)
    model = OnePassMeanVarStd(
        out_genes, algorithm=algorithm, n_batch=src.n_batch, output_path=None,
        batch_categories=src.batch_categories,
    )
    fit_statistic(model, src.datamodule, transforms=transforms,
                  input_var_names_g=src.var_names_g, devices=devices)
    df = model.to_dataframe(ddof=ddof)
    if output_path is not None:
        df.to_csv(output_path)
    return df
