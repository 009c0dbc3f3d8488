"""Row reads from ``.h5ad`` / zarr shards: contiguous partial reads, never a whole file.

A shard stores its matrix either as CSR (``data``/``indices``/``indptr``, anndata's on-disk
encoding) or dense. Reading a set of rows groups them into contiguous runs (rows closer than
``max_gap`` are merged into one run), reads each run with one slice per array (``indptr`` for
the run, then the run's ``data``/``indices``), and picks the requested rows out of it. File
handles are opened lazily, once per process (DataLoader workers and DDP processes each open
their own; a handle inherited through ``fork`` is never reused).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellsight.data import validate as V

__all__ = [
    "shard_format",
    "open_shard",
    "matrix_elem",
    "matrix_kind",
    "read_obs_names",
    "ShardReader",
    "check_chunk_values",
]

# rows between two requested rows that are read anyway rather than starting a new read
MAX_GAP_ROWS = 256


def shard_format(path: str) -> str:
    """``"zarr"`` for a directory or a ``.zarr`` path, ``"h5ad"`` otherwise."""
    if os.path.isdir(path) or str(path).rstrip("/").endswith(".zarr"):
        return "zarr"
    return "h5ad"


def open_shard(path: str):
    """The root group of a shard, opened read-only (an ``h5py.File`` or a ``zarr.Group``)."""
    if not os.path.exists(path):
        raise ValueError(f"Shard {path!r} does not exist; check the path.")
    if shard_format(path) == "zarr":
        import zarr

        return zarr.open_group(path, mode="r")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(
            f"Shard {path!r} is not a readable .h5ad (HDF5) file ({err}); pass .h5ad files or "
            "zarr directories written by anndata."
        ) from err


def matrix_elem(root, layer: str | None, path: str):
    """The on-disk ``X`` (``layer=None``) or ``layers[layer]`` (clear error if absent)."""
    if layer is None:
        if "X" not in root:
            raise ValueError(f"Shard {path!r} has no X; pass layer='<name>' to read a layer.")
        return root["X"]
    if "layers" not in root or layer not in root["layers"]:
        have = list(root["layers"].keys()) if "layers" in root else []
        raise ValueError(
            f"Shard {path!r} has no layer {layer!r} (layers: {have}); pass an existing layer "
            "or layer=None for X."
        )
    return root["layers"][layer]


def matrix_kind(elem, path: str) -> tuple[str, tuple[int, int]]:
    """``("csr" | "dense", shape)`` of an on-disk matrix; CSC and other encodings are rejected."""
    enc = elem.attrs.get("encoding-type", None)
    if isinstance(enc, bytes):
        enc = enc.decode()
    if enc == "csr_matrix":
        return "csr", tuple(int(s) for s in elem.attrs["shape"])
    if enc == "csc_matrix":
        raise ValueError(
            f"Shard {path!r} stores its matrix as CSC; streaming reads rows, which CSC cannot "
            "do without reading whole columns. Rewrite the shard with a CSR matrix "
            "(adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...))."
        )
    if hasattr(elem, "shape") and len(elem.shape) == 2 and enc in (None, "array"):
        return "dense", tuple(int(s) for s in elem.shape)
    raise ValueError(
        f"Shard {path!r} has a matrix with unsupported encoding {enc!r}; use a dense array or "
        "a CSR matrix."
    )


def read_obs_names(path: str) -> pd.Index:
    """The cell names of one shard (reads only the ``obs`` index)."""
    root = open_shard(path)
    try:
        obs = root["obs"]
        key = obs.attrs.get("_index", "_index")
        return pd.Index(np.asarray(anndata.io.read_elem(obs[key])).astype(str))
    finally:
        if isinstance(root, h5py.File):
            root.close()


def check_chunk_values(
    x, rows: np.ndarray, path: str, var_names: pd.Index, *, layer: str | None,
    require_counts: bool, likelihood: str | None,
) -> None:
    """Reject a chunk with NaN/inf (always) or non-count values (``require_counts``).

    The fast test runs on the stored values; only when it fails is a one-chunk AnnData built so
    :func:`cellsight.data.validate.check_matrix_values` can name the first bad cell and gene
    with exactly the in-memory message (prefixed with the shard).

    Parameters
    ----------
    x
        The chunk (CSR or dense), rows in the order of ``rows``.
    rows
        Row numbers of the chunk inside the shard ``path``.
    """
    vals = x.data if sp.issparse(x) else np.asarray(x)
    with np.errstate(invalid="ignore"):
        bad = not np.isfinite(vals).all()
        if require_counts and not bad:
            bad = bool((vals < 0).any() or (vals != np.round(vals)).any())
    if not bad:
        return
    names = read_obs_names(path)[rows]
    chunk = anndata.AnnData(
        X=x if layer is None else None,
        obs=pd.DataFrame(index=names),
        var=pd.DataFrame(index=var_names),
        layers=None if layer is None else {layer: x},
    )
    try:
        V.check_matrix_values(chunk, layer, require_counts=require_counts, likelihood=likelihood)
    except ValueError as err:
        raise ValueError(f"While streaming shard {path!r}: {err}") from None


class ShardReader:
    """Reads arbitrary rows of a list of shards seen as one matrix (cells concatenated).

    Parameters
    ----------
    paths
        Shard paths, in order.
    n_obs
        Cells per shard.
    layer
        ``None`` for ``X`` or a layer name, in every shard.
    var_names
        Genes (for error messages).
    require_counts, likelihood
        Check every chunk read for raw counts (see :func:`check_chunk_values`).
    max_gap
        Requested rows at most this far apart are read in one contiguous slice.
    """

    def __init__(
        self,
        paths: Sequence[str],
        n_obs: Sequence[int],
        layer: str | None,
        var_names: pd.Index,
        *,
        require_counts: bool = False,
        likelihood: str | None = None,
        max_gap: int = MAX_GAP_ROWS,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.n_obs = np.asarray(n_obs, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_obs)]).astype(np.int64)
        self.layer = layer
        self.var_names = pd.Index(var_names)
        self.require_counts = bool(require_counts)
        self.likelihood = likelihood
        self.max_gap = int(max_gap)
        self.bytes_read = 0
        self._elems: dict[int, tuple] = {}
        self._roots: list = []
        self._pid = os.getpid()

    @property
    def n_total(self) -> int:
        """Cells over all shards."""
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_elems"], state["_roots"] = {}, []
        return state

    def close(self) -> None:
        """Close the files this process opened."""
        if self._pid == os.getpid():
            for root in self._roots:
                if isinstance(root, h5py.File):
                    root.close()
        self._elems, self._roots = {}, []

    def _elem(self, s: int) -> tuple:
        if self._pid != os.getpid():  # inherited through fork: open our own handles
            self._elems, self._roots, self._pid = {}, [], os.getpid()
        if s not in self._elems:
            root = open_shard(self.paths[s])
            self._roots.append(root)
            elem = matrix_elem(root, self.layer, self.paths[s])
            kind, _ = matrix_kind(elem, self.paths[s])
            if kind == "csr":
                self._elems[s] = (kind, elem["indptr"], elem["indices"], elem["data"])
            else:
                self._elems[s] = (kind, elem)
        return self._elems[s]

    def _read_run(self, s: int, start: int, stop: int):
        """Rows ``start:stop`` of shard ``s`` as CSR or dense (one slice per array)."""
        kind, *arrs = self._elem(s)
        n_vars = len(self.var_names)
        if kind == "dense":
            block = np.asarray(arrs[0][start:stop])
            self.bytes_read += block.nbytes
            return block
        indptr_ds, indices_ds, data_ds = arrs
        ptr = np.asarray(indptr_ds[start : stop + 1], dtype=np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        data = np.asarray(data_ds[lo:hi])
        indices = np.asarray(indices_ds[lo:hi])
        self.bytes_read += ptr.nbytes + data.nbytes + indices.nbytes
        return sp.csr_matrix((data, indices, ptr - lo), shape=(stop - start, n_vars))

    def read_shard_rows(self, s: int, rows: np.ndarray):
        """Sorted, unique ``rows`` of shard ``s`` (merged into contiguous runs)."""
        if len(rows) == 0:
            return sp.csr_matrix((0, len(self.var_names)), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(rows) > self.max_gap) + 1
        pieces = []
        for run in np.split(rows, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            block = self._read_run(s, start, stop)
            if len(run) != stop - start:
                block = block[run - start]
            pieces.append(block)
        out = pieces[0] if len(pieces) == 1 else _stack(pieces)
        check_chunk_values(
            out, rows, self.paths[s], self.var_names, layer=self.layer,
            require_counts=self.require_counts, likelihood=self.likelihood,
        )
        return out

    def read(self, cells: np.ndarray):
        """Rows of the global cell indices ``cells`` (any order, repeats allowed), as float32.

        Returns a CSR matrix when any shard is sparse, else a dense array; row ``i`` is cell
        ``cells[i]``.
        """
        cells = np.asarray(cells, dtype=np.int64)
        uniq, inverse = np.unique(cells, return_inverse=True)
        shard_of = np.searchsorted(self.offsets, uniq, side="right") - 1
        pieces = []
        for s in np.unique(shard_of):
            local = uniq[shard_of == s] - self.offsets[s]
            pieces.append(self.read_shard_rows(int(s), local))
        if not pieces:
            return np.zeros((0, len(self.var_names)), dtype=np.float32)
        x = pieces[0] if len(pieces) == 1 else _stack(pieces)
        x = x[inverse] if not np.array_equal(inverse, np.arange(len(uniq))) else x
        return x.astype(np.float32, copy=False)


def _stack(pieces: list):
    if all(isinstance(p, np.ndarray) for p in pieces):
        return np.concatenate(pieces, axis=0)
    return sp.vstack([sp.csr_matrix(p) for p in pieces], format="csr")
