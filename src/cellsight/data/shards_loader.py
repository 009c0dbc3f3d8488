"""Streaming minibatches from shards: an IterableDataset, its DataLoader, and obs arrays.

Minibatches are dicts with the keys, dtypes and shapes of
:class:`cellsight.data.loaders.TensorBatchLoader`: ``"X"`` ``(n, g)`` float32 and the obs
fields of the registry (``"batch"``, ``"labels"`` ``(n, 1)``, ``"extra_categorical_covs"``
``(n, k)``, ``"extra_continuous_covs"`` ``(n, c)``, ``"size_factor"`` ``(n, 1)``, all float32),
plus ``"ind_x"`` (``(n, 1)`` int64 global cell numbers) on request. The per-cell obs fields are
small, so they are encoded once (codes through the registry's categorical mappings) and held in
memory; only ``X`` is streamed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cellsight.data import validate as V
from cellsight.data.loaders import dist_info
from cellsight.data.shards_io import ShardReader
from cellsight.data.shards_plan import epoch_stream, n_batches, rank_positions, serve_sequence
from cellsight.data.sparse import csr_tensor

__all__ = ["obs_arrays", "batch_code_array", "ShardedDataset", "ShardedLoader"]

K = REGISTRY_KEYS


def _codes(values: pd.Series, categories, key: str) -> np.ndarray:
    """Codes of ``values`` in ``categories`` (the registry's mapping); unknown values rejected."""
    cats = list(categories)
    codes = pd.Categorical(values.astype(object), categories=cats).codes
    if (codes < 0).any():
        V.check_known_categories(values, cats, key)
    return codes.astype(np.float32)


def obs_arrays(obs: pd.DataFrame, manager: AnnDataManager) -> dict[str, np.ndarray]:
    """Every registered per-cell field of ``manager`` computed from ``obs``, as float32 arrays.

    Categorical fields are encoded with the registry's mappings (so shards whose obs differ
    from the registered AnnData get the model's codes, and unknown categories are rejected);
    numerical fields are read from their columns. Other fields are taken from the manager's
    registered AnnData, which must then have the same cells.
    """
    out: dict[str, np.ndarray] = {}
    n = len(obs)
    for key, reg in manager.registry["field_registries"].items():
        data_reg, state = reg["data_registry"], reg["state_registry"]
        if key == K.X_KEY or not data_reg:
            continue
        if "categorical_mapping" in state:
            orig = state["original_key"]
            if orig in obs.columns:
                arr = _codes(obs[orig], state["categorical_mapping"], orig)[:, None]
            elif str(orig).startswith("_scvi_"):  # not set up: a single category
                arr = np.zeros((n, 1), dtype=np.float32)
            else:
                raise ValueError(f"obs column {orig!r} (registered for {key!r}) is missing.")
        elif "mappings" in state:
            arr = np.stack(
                [_codes(obs[col], cats, col) for col, cats in state["mappings"].items()], axis=1
            )
        elif "columns" in state:
            arr = obs[list(state["columns"])].to_numpy(dtype=np.float32)
        elif data_reg.get("attr_name") == "obs" and data_reg.get("attr_key") in obs.columns:
            arr = obs[data_reg["attr_key"]].to_numpy(dtype=np.float32)[:, None]
        elif manager.adata is not None and manager.adata.n_obs == n:
            got = manager.get_from_registry(key)
            got = got.to_numpy() if isinstance(got, pd.DataFrame | pd.Series) else got
            got = got.toarray() if sp.issparse(got) else np.asarray(got)
            arr = got.reshape(n, -1).astype(np.float32)
        else:
            raise ValueError(
                f"Registry field {key!r} ({data_reg.get('attr_name')}) cannot be streamed from "
                "shards; only obs-based fields are supported."
            )
        out[key] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def batch_code_array(obs: pd.DataFrame, batch_key: str) -> tuple[np.ndarray, list]:
    """``(n, 1)`` codes of ``obs[batch_key]`` and its categories (as scvi-tools orders them:
    a categorical column keeps its order, other columns are sorted)."""
    V.check_obs_keys(_ObsHolder(obs), {"batch_key": batch_key})
    col = obs[batch_key]
    if col.isna().any():
        raise ValueError(f"obs[{batch_key!r}] has missing values; fill them first.")
    cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")
    cats = list(cat.cat.categories)
    return _codes(col, cats, batch_key)[:, None], cats


class _ObsHolder:
    """Just enough of an AnnData (``.obs``) for the obs-key checks of :mod:`validate`."""

    def __init__(self, obs: pd.DataFrame) -> None:
        self.obs = obs


_PACKED = "_packed_csr"  # key of a worker's minibatch: X as CSR parts, everything numpy


def _identity(batch):
    return batch


def to_tensors(batch: dict, sparse_x: bool = False) -> dict[str, torch.Tensor]:
    """A minibatch as sent by a worker (numpy; ``X`` as CSR parts) -> the dict of tensors.

    With ``sparse_x``, a sparse ``X`` stays a torch CSR tensor.
    """
    if not batch.pop(_PACKED, False):
        return batch
    csr = batch.pop("X_csr", None)
    if csr is not None:
        indptr, indices, data, n_vars = csr
        shape = (len(indptr) - 1, int(n_vars))
        x = sp.csr_matrix((data, indices, indptr), shape=shape)
        rest = {k: torch.from_numpy(v) for k, v in batch.items()}
        if sparse_x:
            return {K.X_KEY: csr_tensor(x), **rest}
        return {K.X_KEY: torch.from_numpy(x.toarray()), **rest}
    x_ng = batch.pop(K.X_KEY)
    return {K.X_KEY: torch.from_numpy(x_ng), **{k: torch.from_numpy(v) for k, v in batch.items()}}


def _packed_x(parts: list, n_vars: int) -> dict:
    """X of a minibatch for sending: CSR parts when sparse, else the dense rows."""
    if all(sp.issparse(p) for p in parts):
        x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        data = np.ascontiguousarray(x.data, dtype=np.float32)
        return {"X_csr": (x.indptr.astype(np.int64), x.indices.astype(np.int32), data, n_vars)}
    dense = [p.toarray() if sp.issparse(p) else np.asarray(p) for p in parts]
    x_ng = dense[0] if len(dense) == 1 else np.concatenate(dense)
    return {K.X_KEY: np.ascontiguousarray(x_ng, dtype=np.float32)}


class ShardedDataset(IterableDataset):
    """Minibatches streamed from shards for one rank; split further over DataLoader workers.

    Parameters
    ----------
    reader
        Reads rows of the shards.
    arrays
        Per-cell obs fields (key -> ``(n_total, d)`` float32), from :func:`obs_arrays`.
    indices
        Global cell numbers to serve.
    batch_size
        Cells per minibatch.
    shuffle, seed
        Block shuffling seeded by ``(seed, epoch)`` (see :mod:`cellsight.data.shards_plan`);
        without shuffle, cells come in the order of ``indices``.
    block_size, buffer_blocks
        Cells per contiguous read; blocks shuffled together in memory.
    drop_last
        Drop a last minibatch smaller than ``batch_size``.
    even
        Pad ranks to equal length so all run the same number of steps (training under DDP).
    drop_singleton
        Drop a last minibatch of a single cell (it breaks BatchNorm; as scvi-tools).
    rank, world_size
        This process's rank; ``None``: from ``torch.distributed`` (``(0, 1)`` if not
        initialised). Passing them simulates a rank without a process group.
    return_indices
        Add ``"ind_x"`` (global cell numbers) to every minibatch.
    """

    def __init__(
        self,
        reader: ShardReader,
        arrays: dict[str, np.ndarray],
        indices: np.ndarray,
        *,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        block_size: int = 256,
        buffer_blocks: int = 16,
        drop_last: bool = False,
        even: bool = True,
        drop_singleton: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        return_indices: bool = False,
    ) -> None:
        for name, v in (("batch_size", batch_size), ("block_size", block_size),
                        ("buffer_blocks", buffer_blocks)):
            if int(v) < 1:
                raise ValueError(f"{name}={v} must be >= 1.")
        if (rank is None) != (world_size is None):
            raise ValueError("Pass both rank and world_size, or neither.")
        self.reader = reader
        self.arrays = arrays
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.buffer_blocks = int(buffer_blocks)
        self.drop_last = bool(drop_last)
        self.even = bool(even)
        self.drop_singleton = bool(drop_singleton)
        self.rank, self.world_size = rank, world_size
        self._pinned_dist: tuple[int, int] | None = None  # set per iteration by ShardedLoader
        self.return_indices = bool(return_indices)
        self.pack_sparse = False  # yield packed numpy (set by ShardedLoader for workers)
        self.sparse_x = False  # yield a sparse X as a torch CSR tensor (streaming statistics)
        self.epoch = 0
        self.skip = 0  # minibatches of the serving sequence already served (resume)
        self.n_streams = 1  # workers the serving sequence is planned for

    # ------------------------------------------------------------------ plan
    def dist(self) -> tuple[int, int]:
        """(rank, world size) used to split the cells.

        Given ones first; else the ones the loader pinned in the rank's own process when it
        started iterating (DataLoader workers are forked children outside the process group,
        where ``torch.distributed`` reports ``(0, 1)``); else ``torch.distributed``'s.
        """
        if self.rank is not None:
            return int(self.rank), int(self.world_size)
        if self._pinned_dist is not None:
            return self._pinned_dist
        return dist_info()

    def _rank_cells(self) -> tuple[np.ndarray, np.ndarray]:
        cells, buffer_id = epoch_stream(
            self.indices, block_size=self.block_size, buffer_blocks=self.buffer_blocks,
            shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
        )
        rank, world = self.dist()
        pos = rank_positions(len(cells), rank, world, even=self.even)
        return cells[pos], buffer_id[pos]

    def _n_rank_cells(self) -> int:
        rank, world = self.dist()
        n = len(self.indices)
        if self.even and world > 1:
            return -(-n // world)
        return n // world + (1 if rank < n % world else 0)

    def _drop_last(self, n_cells: int) -> bool:
        single = self.drop_singleton and n_cells > 1 and n_cells % self.batch_size == 1
        return self.drop_last or single

    def __len__(self) -> int:
        n = self._n_rank_cells()
        return n_batches(n, self.batch_size, self._drop_last(n))

    def sequence(self) -> np.ndarray:
        """Minibatch numbers still to serve this epoch, in serving order."""
        return serve_sequence(len(self), self.n_streams)[self.skip :]

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.sequence()[worker::n_workers]
        if len(mine) == 0:
            return iter(())
        cells, buffer_id = self._rank_cells()
        return self._generate(cells, buffer_id, mine)

    def _generate(self, cells, buffer_id, mine) -> Iterator[dict[str, torch.Tensor]]:
        bs = self.batch_size
        batches = [np.arange(b * bs, min((b + 1) * bs, len(cells))) for b in mine]
        # every position this worker serves, with its minibatch, grouped by buffer
        pos_all = np.concatenate(batches)
        j_all = np.repeat(np.arange(len(batches)), [len(p) for p in batches])
        buf_all = buffer_id[pos_all]
        order = np.lexsort((pos_all, buf_all))
        pos_all, j_all, buf_all = pos_all[order], j_all[order], buf_all[order]
        loaded: dict[int, tuple[np.ndarray, object]] = {}
        for j, pos in enumerate(batches):
            for buf in np.unique(buffer_id[pos]):
                if buf not in loaded:  # read what this worker still needs from the buffer
                    lo, hi = np.searchsorted(buf_all, [buf, buf + 1])
                    keep = pos_all[lo:hi][j_all[lo:hi] >= j]
                    loaded[buf] = (keep, self.reader.read(cells[keep]))
            yield self._batch(pos, cells, buffer_id, loaded)
            nxt = set(np.unique(buffer_id[batches[j + 1]])) if j + 1 < len(batches) else set()
            for buf in [b for b in loaded if b not in nxt]:
                del loaded[buf]

    def _batch(self, pos, cells, buffer_id, loaded) -> dict[str, torch.Tensor]:
        # a minibatch is a range of positions; each run of one buffer is a row slice of it
        bid = buffer_id[pos]
        parts = []
        for seg in np.split(np.arange(len(pos)), np.flatnonzero(np.diff(bid)) + 1):
            keep, x = loaded[bid[seg[0]]]
            start = int(np.searchsorted(keep, pos[seg[0]]))
            parts.append(x[start : start + len(seg)])
        idx = cells[pos]
        obs = {key: arr[idx] for key, arr in self.arrays.items()}
        if self.return_indices:
            obs[K.INDICES_KEY] = idx[:, None].copy()
        if self.pack_sparse:  # in a worker: one pickled message, X as CSR (bytes ~ non-zeros)
            return {_PACKED: True, **obs, **_packed_x(parts, self.reader.var_names.size)}
        if self.sparse_x and all(sp.issparse(p) for p in parts):
            x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
            out = {K.X_KEY: csr_tensor(x)}
            out.update({key: torch.from_numpy(v) for key, v in obs.items()})
            return out
        dense = [p.toarray() if sp.issparse(p) else np.asarray(p) for p in parts]
        x_ng = dense[0] if len(dense) == 1 else np.concatenate(dense)
        out = {K.X_KEY: torch.from_numpy(np.ascontiguousarray(x_ng, dtype=np.float32))}
        out.update({key: torch.from_numpy(v) for key, v in obs.items()})
        return out


class ShardedLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ShardedDataset` that can resume mid-epoch.

    It counts the minibatches it has handed out; :meth:`state_dict` /
    :meth:`load_state_dict` save and restore that position (Lightning stores them in its
    checkpoints), and :meth:`set_epoch` selects the shuffle. Workers are not persistent, so
    each epoch's workers receive the current epoch and position.

    Parameters
    ----------
    dataset
        The streamed minibatches.
    num_workers
        DataLoader worker processes (``0``: read in the main process).
    device
        Move minibatches to this device (``None``: leave them on CPU).
    """

    def __init__(
        self, dataset: ShardedDataset, num_workers: int = 0,
        device: torch.device | str | None = None, **kwargs,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0.")
        # workers send numpy (pickled once, no shared-memory tensor per key) with X as CSR
        # (bytes ~ non-zeros); the main process makes the tensors
        dataset.pack_sparse = num_workers > 0
        if num_workers > 0:
            kwargs.setdefault("collate_fn", _identity)
        # an own generator: iterating must not draw from torch's global RNG (which seeds the
        # model's sampling), so streamed and in-memory training consume the same random numbers
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs
        )
        self.device = device
        self._served = 0
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that determines the next shuffle."""
        self.dataset.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        """The position: epoch, minibatches served, and the worker count the order was made for."""
        return {
            "epoch": self.dataset.epoch,
            "batches_done": self._served,
            "n_streams": self.dataset.n_streams,
            "seed": self.dataset.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration serves the rest of ``state``'s epoch, in the same order."""
        self.dataset.epoch = int(state["epoch"])
        self.dataset.seed = int(state.get("seed", self.dataset.seed))
        self._resume = dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds, resume, self._resume = self.dataset, self._resume, None
        ds.skip, ds.n_streams = 0, max(1, self.num_workers)
        # fix the rank here, in the rank's process, before workers are forked from it
        ds._pinned_dist = None
        ds._pinned_dist = ds.dist()
        # resume only inside the saved epoch: a state saved at an epoch's end (all minibatches
        # served) or an epoch moved on by set_epoch starts a fresh epoch
        if resume is not None and int(resume["epoch"]) == ds.epoch:
            ds.n_streams = int(resume.get("n_streams", 1))
            ds.skip = int(resume["batches_done"])
            if ds.skip >= len(ds):
                ds.skip, ds.n_streams = 0, max(1, self.num_workers)
        self._served = ds.skip
        return self._count(super().__iter__())

    def _count(self, it) -> Iterator[dict[str, torch.Tensor]]:
        for batch in it:
            self._served += 1
            batch = to_tensors(batch, self.dataset.sparse_x)
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield batch
