"""Lightning data module over shards: the sharded twin of :class:`AnnDataModule`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager

from cellsight.checks import check_int
from cellsight.data.loaders import split_indices
from cellsight.data.shards import read_shards, shard_set
from cellsight.data.shards_io import ShardReader
from cellsight.data.shards_loader import (
    ShardedDataset,
    ShardedLoader,
    batch_code_array,
    obs_arrays,
)
from cellsight.data.validate import cell_positions

__all__ = ["ShardedDataModule", "sharded_inference_loader"]

DEFAULT_BLOCK_SIZE = 256
DEFAULT_BUFFER_BLOCKS = 16


def _x_layer(stub: AnnData, manager: AnnDataManager | None) -> str | None:
    """The shards' layer to stream: the model's ``layer`` if set up with one, else the stub's."""
    layer = shard_set(stub).layer
    if manager is not None:
        setup_layer = manager.registry["setup_args"].get("layer")
        if setup_layer is not None:
            layer = setup_layer
    return layer


def _reader(stub, manager, require_counts: bool, likelihood: str | None) -> ShardReader:
    info = shard_set(stub)
    return ShardReader(
        info.paths, info.n_obs, _x_layer(stub, manager), stub.var_names,
        require_counts=require_counts, likelihood=likelihood,
    )


class ShardedDataModule(pl.LightningDataModule):
    """Train/validation minibatches streamed from ``.h5ad`` / zarr shards.

    Reads contiguous blocks of rows and shuffles cells within a buffer of blocks ("block
    shuffling"; see :mod:`cellsight.data.shards_plan`), deterministically per epoch from
    ``seed``. Cells are split across DDP ranks (from ``torch.distributed``; Lightning must run
    with ``use_distributed_sampler=False``, as :func:`cellsight.train.fit` does) and across
    DataLoader workers without overlap or loss. Under DDP, training pads every rank to
    ``ceil(n_train / world_size)`` cells (at most ``world_size - 1`` repeats per epoch) so all
    ranks run the same number of steps; validation serves every cell exactly once. The training
    loader's position is saved in Lightning checkpoints (mid-epoch resume).

    Parameters
    ----------
    stub_or_paths
        A stub from :func:`cellsight.data.read_shards`, or shard paths.
    manager
        The model's AnnDataManager (``model.adata_manager``): minibatches then carry every
        registered field, categories encoded with its mappings. ``None``: only ``"X"``, plus
        ``"batch"`` codes when ``batch_key`` is given (for streaming statistics).
    batch_size
        Cells per minibatch.
    train_size, validation_size
        Fractions of cells (scvi-tools' semantics; ``validation_size=None``: the rest).
    seed
        Seed of the split and of the per-epoch shuffles.
    shuffle
        Shuffle the training cells (``False``: serve them in order, every epoch alike).
    num_workers
        DataLoader worker processes per rank.
    block_size
        Consecutive cells per read.
    buffer_blocks
        Blocks shuffled together in memory (``block_size * buffer_blocks`` cells per buffer).
    drop_last
        Drop a last training minibatch smaller than ``batch_size``.
    layer
        With paths: the shards' layer to stream (``None``: ``X``).
    batch_key
        Without a manager: obs column whose codes are served as ``"batch"``.
    shuffle_set_split
        Split cells at random (seeded) rather than in order.
    train_indices, validation_indices
        Explicit split (global cell numbers); overrides the sizes.
    require_counts, likelihood
        Check every chunk read for raw counts (the model's likelihood name for messages).
    return_indices
        Add ``"ind_x"`` (global cell numbers, ``(n, 1)`` int64) to minibatches.
    rank, world_size
        Override the DDP rank (simulates a rank without a process group).
    """

    def __init__(
        self,
        stub_or_paths: AnnData | Sequence[str | os.PathLike],
        manager: AnnDataManager | None = None,
        batch_size: int = 128,
        train_size: float = 1.0,
        validation_size: float | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        buffer_blocks: int = DEFAULT_BUFFER_BLOCKS,
        drop_last: bool = False,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        shuffle_set_split: bool = True,
        train_indices: np.ndarray | None = None,
        validation_indices: np.ndarray | None = None,
        require_counts: bool = False,
        likelihood: str | None = None,
        return_indices: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(stub_or_paths, AnnData):
            stub = stub_or_paths
            shard_set(stub)  # clear error for a non-sharded AnnData
        else:
            stub = read_shards(stub_or_paths, layer=layer)
        if manager is not None and batch_key is not None:
            raise ValueError(
                "Pass either manager (a model's registry) or batch_key (model-free streaming), "
                "not both; with a manager the batch comes from its setup."
            )
        self.stub = stub
        self.var_names = pd.Index(stub.var_names)
        self.n_obs, self.n_vars = stub.n_obs, stub.n_vars
        self.batch_categories: list | None = None
        if manager is not None:
            if list(manager.registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"][
                "column_names"
            ]) != list(self.var_names):
                raise ValueError(
                    "The shards' genes differ from the manager's registered genes; build the "
                    "manager from this stub (setup_anndata + the model) or reorder the shards."
                )
            self.arrays = obs_arrays(stub.obs, manager)
        elif batch_key is not None:
            codes, self.batch_categories = batch_code_array(stub.obs, batch_key)
            self.arrays = {REGISTRY_KEYS.BATCH_KEY: codes}
        else:
            self.arrays = {}
        self.reader = _reader(stub, manager, require_counts, likelihood)
        if train_indices is None:
            train_indices, validation_indices = split_indices(
                self.n_obs, train_size, validation_size, seed, shuffle=shuffle_set_split
            )
        self.train_indices = np.asarray(train_indices, dtype=np.int64)
        self.validation_indices = np.asarray(
            validation_indices if validation_indices is not None else [], dtype=np.int64
        )
        for name, idx in (("train", self.train_indices), ("validation", self.validation_indices)):
            if len(idx) and (idx.min() < 0 or idx.max() >= self.n_obs):
                raise ValueError(f"{name} indices must be in [0, {self.n_obs}).")
        if len(self.train_indices) == 0:
            raise ValueError(
                f"The training split is empty ({self.n_obs} cells, train_size={train_size}); "
                "use more cells or a larger train_size."
            )
        self.n_train = len(self.train_indices)
        self.n_validation = len(self.validation_indices)
        self.batch_size = check_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_workers = int(num_workers)
        self.block_size = int(block_size)
        self.buffer_blocks = int(buffer_blocks)
        self.drop_last = bool(drop_last)
        self.return_indices = bool(return_indices)
        self.rank, self.world_size = rank, world_size

    def _dataset(self, indices: np.ndarray, *, train: bool) -> ShardedDataset:
        return ShardedDataset(
            self.reader,
            self.arrays,
            indices,
            batch_size=self.batch_size,
            shuffle=self.shuffle and train,
            seed=self.seed,
            block_size=self.block_size,
            buffer_blocks=self.buffer_blocks,
            drop_last=self.drop_last and train,
            even=train,
            drop_singleton=train,
            rank=self.rank,
            world_size=self.world_size,
            return_indices=self.return_indices,
        )

    def train_dataloader(self) -> ShardedLoader:
        return ShardedLoader(self._dataset(self.train_indices, train=True), self.num_workers)

    def val_dataloader(self) -> ShardedLoader | list:
        if self.n_validation == 0:
            return []
        return ShardedLoader(
            self._dataset(self.validation_indices, train=False), self.num_workers
        )

    def predict_dataloader(self) -> ShardedLoader:
        """Every cell once, in order."""
        return ShardedLoader(
            self._dataset(np.arange(self.n_obs), train=False), self.num_workers
        )


def sharded_inference_loader(
    stub: AnnData,
    manager: AnnDataManager,
    indices: np.ndarray | None = None,
    batch_size: int = 1024,
    *,
    device: torch.device | str | None = None,
    require_counts: bool = False,
    likelihood: str | None = None,
    num_workers: int = 0,
) -> ShardedLoader:
    """Ordered minibatches of the given cells (all by default) of a sharded stub, for inference.

    The sharded twin of the in-memory inference loader: same keys, cells in the order of
    ``indices``, no rank split, moved to ``device``.
    """
    n = stub.n_obs
    idx = cell_positions(indices, n)
    dataset = ShardedDataset(
        _reader(stub, manager, require_counts, likelihood),
        obs_arrays(stub.obs, manager),
        idx.astype(np.int64),
        batch_size=batch_size,
        shuffle=False,
        block_size=DEFAULT_BLOCK_SIZE,
        buffer_blocks=DEFAULT_BUFFER_BLOCKS,
        even=False,
        rank=0,
        world_size=1,
    )
    return ShardedLoader(dataset, num_workers, device=device)
