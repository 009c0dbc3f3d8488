"""Lightning data module over a registered in-memory AnnData (train / validation split)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
from scvi.data import AnnDataManager

from cellsight.checks import check_int
from cellsight.data.loaders import TensorBatchLoader, registry_arrays, split_indices
from cellsight.data.shards import is_sharded

__all__ = ["AnnDataModule"]


class AnnDataModule(pl.LightningDataModule):
    """Train/validation minibatches from a registered AnnData, held once in memory.

    Parameters
    ----------
    manager
        The AnnDataManager the model registered.
    train_size, validation_size
        Fractions of cells (scvi-tools semantics: ``validation_size=None`` means the rest).
    batch_size
        Cells per minibatch.
    seed
        Seed of the split and of the per-epoch shuffles.
    shuffle_set_split
        Split at random (``False``: the first cells train, the next validate).
    drop_last
        Drop a last, smaller training minibatch.
    train_indices, validation_indices
        Explicit split; overrides the sizes.
    """

    def __init__(
        self,
        manager: AnnDataManager,
        *,
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        seed: int = 0,
        shuffle_set_split: bool = True,
        drop_last: bool = False,
        train_indices: np.ndarray | None = None,
        validation_indices: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        batch_size = check_int(batch_size, "batch_size")
        if is_sharded(manager.adata):
            raise ValueError(
                "AnnDataModule reads the matrices of an AnnData in memory, and this one is a "
                "read_shards stub (its X is all zeros; the counts are in the files): use "
                "cellsight.data.ShardedDataModule(stub, manager, ...)."
            )
        self.arrays = registry_arrays(manager)
        n = manager.adata.n_obs
        if train_indices is None:
            train_indices, validation_indices = split_indices(
                n, train_size, validation_size, seed, shuffle=shuffle_set_split
            )
        self.train_indices = np.asarray(train_indices, dtype=np.int64)
        self.validation_indices = np.asarray(
            validation_indices if validation_indices is not None else [], dtype=np.int64
        )
        if len(self.train_indices) == 0:
            raise ValueError(
                f"The training split is empty ({n} cells, train_size={train_size}); use more "
                "cells or a larger train_size."
            )
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.n_train = len(self.train_indices)
        self.n_validation = len(self.validation_indices)

    def train_dataloader(self) -> TensorBatchLoader:
        drop_last = self.drop_last
        # a last minibatch of one cell breaks BatchNorm; drop it (as scvi-tools does)
        if self.n_train % self.batch_size == 1 and self.n_train > 1:
            drop_last = True
        return TensorBatchLoader(
            self.arrays,
            self.train_indices,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=drop_last,
        )

    def val_dataloader(self) -> TensorBatchLoader | list:
        if self.n_validation == 0:
            return []
        return TensorBatchLoader(
            self.arrays, self.validation_indices, batch_size=self.batch_size, shuffle=False
        )
