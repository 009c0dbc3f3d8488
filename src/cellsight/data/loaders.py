"""In-memory minibatch loading: registry arrays held once, sliced per batch.

scvi-tools' ``AnnDataLoader`` indexes an AnnData per minibatch; here the registered arrays are
turned into tensors (dense where they fit, CSR otherwise) once, and a minibatch is one fancy
index per key. Batches are dicts keyed by scvi-tools' ``REGISTRY_KEYS`` (``"X"``, ``"batch"``,
``"labels"``, ...), the same keys the sharded loaders produce, so a module never knows where
its data came from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi.data import AnnDataManager

from cellsight.data.sparse import csr_tensor

__all__ = [
    "registry_arrays",
    "TensorBatchLoader",
    "dist_info",
    "rank_slice",
    "epoch_permutation",
    "split_indices",
]

# dense X larger than this many bytes stays sparse (CSR) and is densified per minibatch
DENSE_LIMIT_BYTES = 2 * 1024**3


def registry_arrays(
    manager: AnnDataManager, keys: list[str] | None = None
) -> dict[str, torch.Tensor | sp.csr_matrix]:
    """Every registered array of ``manager`` as float32 tensors (X may stay CSR).

    Categorical fields come back as ``(n, 1)`` float tensors of codes (scvi-tools' layout).
    """
    out: dict[str, torch.Tensor | sp.csr_matrix] = {}
    for key, reg in manager.registry["field_registries"].items():
        if keys is not None and key not in keys:
            continue
        if not reg["data_registry"]:
            continue  # optional, empty field
        arr = manager.get_from_registry(key)
        if isinstance(arr, pd.DataFrame | pd.Series):
            arr = arr.to_numpy()
        if sp.issparse(arr):
            arr = sp.csr_matrix(arr, dtype=np.float32)
            if arr.shape[0] * arr.shape[1] * 4 <= DENSE_LIMIT_BYTES:
                arr = torch.from_numpy(arr.toarray())
            out[key] = arr
            continue
        arr = np.asarray(arr)
        if arr.ndim == 1:
            arr = arr[:, None]
        out[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group, (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def rank_slice(order: np.ndarray, rank: int, world: int, *, pad: bool) -> np.ndarray:
    """The part of ``order`` that ``rank`` processes.

    With ``pad`` (training under DDP) every rank gets ``ceil(n / world)`` items, the shortfall
    taken from the start of ``order`` (as torch's ``DistributedSampler``), so every rank runs
    the same number of steps. Without it, ranks get disjoint strided slices covering all items.
    """
    if world == 1:
        return order
    if pad:
        total = math.ceil(len(order) / world) * world
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
    return order[rank::world]


def split_indices(
    n: int, train_size: float, validation_size: float | None, seed: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation split with scvi-tools' sizes (ceil for train, floor for validation).

    ``validation_size=None`` gives every cell not in training to validation (scvi-tools computes
    ``floor((1 - train_size) * n)``, which can lose a cell to floating-point error).
    """
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size={train_size} must be in (0, 1].")
    rest = validation_size is None
    if rest:
        validation_size = 1.0 - train_size
    if validation_size < 0 or train_size + validation_size > 1 + 1e-9:
        raise ValueError(
            f"train_size + validation_size = {train_size + validation_size:.3f} must be <= 1 "
            "and validation_size >= 0."
        )
    n_train = math.ceil(train_size * n)
    # validation_size=None means "all other cells" (exactly, without floating-point loss)
    n_val = n - n_train if rest else math.floor(validation_size * n)
    if n_train + n_val > n:
        n_val = n - n_train
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val])


class TensorBatchLoader:
    """Minibatches of registry tensors for a set of cell indices.

    Parameters
    ----------
    arrays
        Key -> tensor (or CSR matrix for X) over all cells, as from :func:`registry_arrays`.
    indices
        The cells this loader serves (positions into ``arrays``).
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle with a permutation that depends only on ``(seed, epoch)``; the epoch is set
        with :meth:`set_epoch` (the training plan does so at every epoch start), as with
        torch's ``DistributedSampler``.
    seed
        Seed of the shuffles.
    drop_last
        Drop a last minibatch smaller than ``batch_size``.
    distributed
        Split the cells across DDP ranks (each rank sees a disjoint part; padded to equal
        length when ``shuffle`` so every rank runs the same number of steps).
    device
        Device the minibatches are moved to (``None``: leave on CPU, Lightning moves them).
    sparse_x
        Serve a CSR-held ``X`` as torch CSR tensors instead of densifying each minibatch
        (streaming statistics work on the non-zeros).
    """

    def __init__(
        self,
        arrays: dict[str, torch.Tensor | sp.csr_matrix],
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        distributed: bool = True,
        device: torch.device | str | None = None,
        sparse_x: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.arrays = arrays
        n_total = next(iter(arrays.values())).shape[0]
        self.indices = (
            np.arange(n_total) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.distributed = distributed
        self.device = device
        self.sparse_x = bool(sparse_x)
        self.epoch = 0
        self._batches_done = 0  # minibatches served in the current epoch
        self._resume_at = 0  # first minibatch of the next iteration (resuming mid-epoch)

    # ------------------------------------------------------------------ ordering
    def _epoch_order(self) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            order = order[epoch_permutation(len(order), self.seed, self.epoch)]
        if self.distributed:
            rank, world = dist_info()
            order = rank_slice(order, rank, world, pad=self.shuffle)
        return order

    def __len__(self) -> int:
        n = len(self.indices)
        if self.distributed:
            _, world = dist_info()
            n = math.ceil(n / world) if self.shuffle else len(range(0, n, world))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that determines the next shuffle."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Position for resuming mid-epoch: the epoch and how many minibatches were served."""
        return {"epoch": self.epoch, "batches_done": self._batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues ``state``'s epoch after its served minibatches."""
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))
        self._resume_at = int(state.get("batches_done", 0))

    # ------------------------------------------------------------------ iteration
    def take(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The minibatch of the given absolute cell indices."""
        out = {}
        t_idx = torch.from_numpy(idx)
        for key, arr in self.arrays.items():
            if isinstance(arr, torch.Tensor):
                t = arr.index_select(0, t_idx)
            elif self.sparse_x:
                t = csr_tensor(arr[idx])
            else:
                t = torch.from_numpy(arr[idx].toarray())
            out[key] = t if self.device is None else t.to(self.device, non_blocking=True)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # everything that depends on loader state is fixed here, eagerly: Lightning may call
        # iter() more than once per epoch and may stop early without exhausting the iterator
        order = self._epoch_order()
        n_batches = len(order) // self.batch_size if self.drop_last else math.ceil(
            len(order) / self.batch_size
        )
        start, self._resume_at = self._resume_at, 0
        self._batches_done = start
        return self._generate(order, start, n_batches)

    def _generate(self, order: np.ndarray, start: int, n_batches: int):
        for b in range(start, n_batches):
            batch = self.take(order[b * self.batch_size : (b + 1) * self.batch_size])
            self._batches_done = b + 1
            yield batch
