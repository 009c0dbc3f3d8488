"""Where a statistic's minibatches come from: an in-memory AnnData, a path, or shards.

:func:`stream_data` turns the ``data`` argument of :mod:`cellsight.pp` / :mod:`cellsight.tl`
into a Lightning data module yielding dict minibatches (``"X"``, a torch CSR tensor when the
data are sparse, and, with a ``batch_key``, ``"batch"`` codes) split across DDP ranks
*without padding*: every cell is counted exactly once, which statistics need (training pads
ranks to equal length; gradient models ask for ``pad=True``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellsight.data import validate as V
from cellsight.data.loaders import TensorBatchLoader, dist_info

__all__ = ["StreamData", "stream_data", "anndata_arrays"]

# what needs raw counts, for the validation messages
HVG_COUNTS = "Seurat v3 highly variable gene selection"

PathLike = str | os.PathLike


@dataclass
class StreamData:
    """A data source ready to stream.

    Attributes
    ----------
    datamodule
        Yields the minibatches (``train_dataloader``).
    var_names_g
        Genes of ``"X"``, in order.
    batch_categories
        Names of the batch codes (``None`` without ``batch_key``).
    n_obs
        Number of cells.
    adata
        The in-memory AnnData (``None`` for shards).
    """

    datamodule: pl.LightningDataModule
    var_names_g: np.ndarray
    batch_categories: list[str] | None
    n_obs: int
    adata: AnnData | None = None

    @property
    def n_batch(self) -> int:
        """Number of batches (1 without ``batch_key``)."""
        return 1 if self.batch_categories is None else len(self.batch_categories)


def _batch_codes(obs: pd.DataFrame, batch_key: str) -> tuple[np.ndarray, list[str]]:
    col = obs[batch_key]
    if col.isna().any():
        first = obs.index[col.isna().to_numpy()][0]
        raise ValueError(
            f"obs[{batch_key!r}] has {int(col.isna().sum())} missing value(s) (first at cell "
            f"{first!r}); fill them with a category first."
        )
    cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")
    cat = cat.cat.remove_unused_categories()
    return cat.cat.codes.to_numpy().astype(np.float32)[:, None], [
        str(c) for c in cat.cat.categories
    ]


def anndata_arrays(
    adata: AnnData, layer: str | None, batch_key: str | None, require_counts: bool
) -> tuple[dict[str, torch.Tensor | sp.csr_matrix], list[str] | None]:
    """Validate an in-memory AnnData and return its minibatch arrays and batch names.

    ``X`` stays CSR when sparse (densified per minibatch); nothing is copied when it is
    already float32 CSR.
    """
    V.check_not_empty(adata)
    V.check_unique_var_names(adata.var_names)
    V.check_layer(adata, layer)
    V.check_obs_keys(adata, {"batch_key": batch_key})
    V.check_matrix_values(adata, layer, require_counts=require_counts,
                          likelihood=HVG_COUNTS if require_counts else None)
    x = V.get_matrix(adata, layer)
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
    else:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(x), dtype=np.float32))
    arrays: dict[str, torch.Tensor | sp.csr_matrix] = {"X": x}
    cats = None
    if batch_key is not None:
        codes, cats = _batch_codes(adata.obs, batch_key)
        arrays["batch"] = torch.from_numpy(codes)
    return arrays, cats


class _ArrayStatsModule(pl.LightningDataModule):
    """In-memory arrays served by :class:`TensorBatchLoader` (ranks split without padding
    unless shuffled, which pads them to equal length for gradient training)."""

    n_validation = 0

    def __init__(self, arrays, batch_size: int, shuffle: bool, seed: int) -> None:
        super().__init__()
        self.arrays = arrays
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)

    def train_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(
            self.arrays, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed,
            sparse_x=True,
        )


class _ShardStatsModule(pl.LightningDataModule):
    """Every cell of the shards once per epoch, split across ranks and workers, no padding."""

    n_validation = 0

    def __init__(self, stub: AnnData, batch_key, batch_size, num_workers, pad, shuffle, seed,
                 require_counts) -> None:
        super().__init__()
        from cellsight.data import ShardedDataModule

        self.inner = ShardedDataModule(
            stub, batch_key=batch_key, batch_size=batch_size, train_size=1.0,
            shuffle=shuffle, seed=seed, num_workers=num_workers,
            require_counts=require_counts, likelihood=HVG_COUNTS if require_counts else None,
        )
        self.pad = pad
        self.batch_categories = self.inner.batch_categories

    def train_dataloader(self):
        from cellsight.data.shards_loader import ShardedDataset, ShardedLoader

        inner = self.inner
        # the rank is fixed here, in the rank's process: DataLoader workers are forked
        # children that do not see the process group
        rank, world = dist_info()
        dataset = ShardedDataset(
            inner.reader, inner.arrays, np.arange(inner.n_obs), batch_size=inner.batch_size,
            shuffle=inner.shuffle, seed=inner.seed, block_size=inner.block_size,
            buffer_blocks=inner.buffer_blocks, even=self.pad, rank=rank, world_size=world,
        )
        dataset.sparse_x = True  # CSR minibatches: the statistics work on the non-zeros
        kwargs = {}
        if inner.num_workers > 0 and "fork" in mp.get_all_start_methods():
            # processes started by spawn (ddp_spawn ranks) default to spawning their DataLoader
            # workers too, and each would re-import everything; fork them as usual instead
            kwargs["multiprocessing_context"] = "fork"
        return ShardedLoader(dataset, inner.num_workers, **kwargs)


def stream_data(
    data: AnnData | PathLike | Sequence[PathLike],
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_size: int = 1024,
    num_workers: int = 0,
    pad: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    require_counts: bool = False,
) -> StreamData:
    """Build the minibatch source of ``data``.

    Parameters
    ----------
    data
        An in-memory AnnData, a stub from :func:`cellsight.data.read_shards`, one ``.h5ad``
        path, or a list of shard paths (streamed; never loaded whole).
    layer
        Layer to read instead of ``X``.
    batch_key
        obs column whose codes are served as ``"batch"``.
    batch_size
        Cells per minibatch.
    num_workers
        DataLoader workers per rank (shards only; in-memory data is sliced in process).
    pad
        Pad ranks to equal length (gradient training under DDP); statistics use ``False``.
    shuffle, seed
        Shuffle the cells (gradient training); statistics stream in order.
    require_counts
        Reject negative or non-integer values (checked up front in memory, per chunk for
        shards).
    """
    from cellsight.data import is_sharded, read_shards

    if isinstance(data, str | os.PathLike) or (
        isinstance(data, Sequence) and not isinstance(data, AnnData)
    ):
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        if not paths:
            raise ValueError("data is an empty list; pass an AnnData or shard paths.")
        data = read_shards(paths, layer=layer)
    if not isinstance(data, AnnData):
        raise ValueError(
            f"data must be an AnnData, a .h5ad path or a list of shard paths, got "
            f"{type(data).__name__}."
        )
    if is_sharded(data):
        if batch_key is not None:
            V.check_obs_keys(data, {"batch_key": batch_key})
        dm = _ShardStatsModule(data, batch_key, batch_size, num_workers, pad, shuffle, seed,
                               require_counts)
        cats = None if dm.batch_categories is None else [str(c) for c in dm.batch_categories]
        return StreamData(dm, np.asarray(data.var_names).astype(str), cats, data.n_obs, None)
    arrays, cats = anndata_arrays(data, layer, batch_key, require_counts)
    dm = _ArrayStatsModule(arrays, batch_size, shuffle=shuffle or pad, seed=seed)
    return StreamData(dm, np.asarray(data.var_names).astype(str), cats, data.n_obs, data)
