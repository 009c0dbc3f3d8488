"""Data larger than memory: a list of ``.h5ad`` / zarr shards seen as one AnnData.

:func:`read_shards` reads only ``obs`` and ``var`` of every shard and returns an AnnData
*stub*: the real ``obs`` of all cells (so ``setup_anndata`` and the registry see every
category), ``var`` of shard 0, and an all-zero sparse ``X`` of the full shape that costs no
memory. The stub is marked in ``adata.uns["_cellsight_shards"]``; models notice the mark
(:func:`is_sharded`) and stream minibatches from the files instead of reading ``X``::

    adata = cellsight.data.read_shards(["part0.h5ad", "part1.h5ad"])
    SCVI.setup_anndata(adata, batch_key="sample")
    model = SCVI(adata)
    model.train()  # streams the shards (cellsight.data.ShardedDataModule)

Because the stub's ``X`` is zeros, value checks (NaN, raw counts) happen while streaming, on
every chunk read; :func:`validate_shards` runs them over all the data up front.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellsight.data.shards_io import ShardReader, matrix_elem, matrix_kind, open_shard
from cellsight.data.validate import describe_gene_difference

__all__ = [
    "SHARDS_UNS_KEY",
    "ShardSet",
    "read_shards",
    "is_sharded",
    "shard_set",
    "validate_shards",
]

SHARDS_UNS_KEY = "_cellsight_shards"


@dataclass(frozen=True)
class ShardSet:
    """Where a sharded AnnData's matrix lives.

    Attributes
    ----------
    paths
        Absolute shard paths, in cell order.
    n_obs
        Cells per shard.
    layer
        The shards' layer that plays the role of ``X`` (``None``: ``X``).
    """

    paths: tuple[str, ...]
    n_obs: tuple[int, ...]
    layer: str | None

    @property
    def offsets(self) -> np.ndarray:
        """First global cell index of each shard, plus the total."""
        return np.concatenate([[0], np.cumsum(self.n_obs)]).astype(np.int64)


def _read_frame(root, key: str) -> pd.DataFrame:
    return anndata.io.read_elem(root[key])


def _read_obsm(root, key: str, i: int, path: str, n: int):
    """``obsm[key]`` of one shard as a 2-D numpy array or CSR matrix."""
    if "obsm" not in root or key not in root["obsm"]:
        raise ValueError(
            f"Shard {i} ({path!r}) has no obsm[{key!r}]; every shard needs the obsm_keys "
            "matrices (write them with the shards, or leave the key out)."
        )
    arr = anndata.io.read_elem(root["obsm"][key])
    if isinstance(arr, pd.DataFrame):
        arr = arr.to_numpy()
    arr = arr.tocsr() if sp.issparse(arr) else np.asarray(arr)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(
            f"Shard {i} ({path!r}) has obsm[{key!r}] of shape {arr.shape} for {n} cells; "
            "it must be cells x columns."
        )
    return arr


def _check_schema(i: int, path: str, path0: str, var0: pd.Index, cols0: list, var, obs) -> None:
    """Shard ``i`` must have shard 0's genes in the same order and the same obs columns."""
    var_names = pd.Index(var.index.astype(str))
    difference = describe_gene_difference(var0, var_names, "shard 0", "this shard")
    if difference:
        raise ValueError(
            f"Shard {i} ({path!r}) does not have the genes of shard 0 ({path0!r}): "
            f"{difference}. Every shard needs the same genes in the same order; subset and "
            "reorder it with adata[:, genes_of_shard_0] before writing."
        )
    cols = list(obs.columns)
    missing = [c for c in cols0 if c not in cols]
    extra = [c for c in cols if c not in cols0]
    if missing or extra:
        what = []
        if missing:
            what.append(f"lacks obs column(s) {missing}")
        if extra:
            what.append(f"has obs column(s) {extra} that shard 0 does not")
        raise ValueError(
            f"Shard {i} ({path!r}) {' and '.join(what)} (shard 0 is {path0!r}). Every shard "
            "needs the same obs columns; add or drop columns before writing the shards."
        )


def merge_category_orders(orders: Sequence[Sequence]) -> list:
    """One order of all categories that keeps the relative order of every shard's categories.

    Shards cut from one AnnData lose the categories their cells do not use (AnnData drops
    unused categories when a subset is copied), so a shard's categories are a subsequence of
    the full order; merging the subsequences recovers that order wherever the shards determine
    it, and with it the category codes (a label head's class order, a batch's one-hot column)
    that the in-memory AnnData gets. A union in order of first appearance instead puts a
    category missing from shard 0 after the others: the codes, and so the model trained from
    the shards, then differ from in-memory training with the same seed.

    Where the shards leave the order open (two categories never in one shard), the category
    seen first (shard, then position) comes first. If the shards contradict each other (``a``
    before ``b`` in one, after it in another), the categories that no contradiction holds back
    are placed first, then the first-seen category of the contradiction is released.

    Parameters
    ----------
    orders
        Each shard's categories, in its own order.
    """
    first: dict = {}  # category -> rank of its first appearance
    succ: dict = {}
    n_pred: dict = {}
    for order in orders:
        for c in order:
            if c not in first:
                first[c] = len(first)
                succ[c], n_pred[c] = set(), 0
        for a, b in zip(order[:-1], order[1:]):  # consecutive pairs imply the whole order
            if b not in succ[a]:
                succ[a].add(b)
                n_pred[b] += 1
    ready = [(first[c], c) for c in first if n_pred[c] == 0]
    heapq.heapify(ready)
    merged: list = []
    left = dict(first)
    while left:
        if not ready:  # contradictory orders: a cycle; release its first-seen category
            c = min(left, key=left.__getitem__)
            n_pred[c] = 0
            ready = [(first[c], c)]
        _, c = heapq.heappop(ready)
        if c not in left:
            continue
        merged.append(c)
        del left[c]
        for b in succ[c]:
            n_pred[b] -= 1
            if n_pred[b] == 0 and b in left:
                heapq.heappush(ready, (first[b], b))
    return merged


def _concat_obs(frames: list[pd.DataFrame], columns: list) -> pd.DataFrame:
    """Concatenate obs frames; categorical columns keep a categorical dtype with the union of
    the shards' categories, ordered by :func:`merge_category_orders` (the in-memory order when
    the shards were cut from one AnnData)."""
    out = {}
    for col in columns:
        parts = [f[col] for f in frames]
        if all(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
            cats = merge_category_orders([list(p.cat.categories) for p in parts])
            values = np.concatenate([np.asarray(p.astype(object)) for p in parts])
            out[col] = pd.Categorical(values, categories=cats)
        else:
            out[col] = pd.concat([p.reset_index(drop=True) for p in parts], ignore_index=True)
    obs = pd.DataFrame(out)
    obs.index = pd.Index(np.concatenate([f.index.astype(str).to_numpy() for f in frames]))
    if not obs.index.is_unique:
        shard = np.repeat(np.arange(len(frames)), [len(f) for f in frames])
        obs.index = pd.Index([f"{n}-{s}" for n, s in zip(obs.index, shard)])
    return obs


def read_shards(
    paths: Sequence[str | os.PathLike],
    layer: str | None = None,
    obsm_keys: Sequence[str] | None = None,
) -> AnnData:
    """An AnnData stub over ``.h5ad`` / zarr shards; reads ``obs`` and ``var`` (and the
    ``obsm`` matrices named in ``obsm_keys``) only.

    Parameters
    ----------
    paths
        Shard files (``.h5ad``) or zarr directories, in the order their cells are numbered.
        Every shard needs shard 0's genes in the same order and the same ``obs`` columns.
    layer
        The shards' layer streamed as the model's input (``None``: ``X``). It must be stored
        as CSR or dense in every shard.
    obsm_keys
        ``obsm`` matrices to load into the stub's ``obsm`` (concatenated over the shards, in
        memory: per-cell side inputs such as CauTrigger2L's downstream matrix ``"X_down"``,
        small next to ``X``), with their ``uns[key + "_feature"]`` names from shard 0 when
        present. Every shard needs each of them, with the same number of columns. Models
        stream ``X`` from the files and read these from the stub.

    Returns
    -------
    AnnData with the concatenated ``obs`` of all shards (a unique index: cell names are kept
    when unique over all shards, else suffixed ``-<shard number>``), ``var`` of shard 0, an
    all-zero CSR ``X`` of the full shape (also under ``layers[layer]``), and
    ``uns["_cellsight_shards"]`` recording paths, cells per shard and layer. Set it up and
    train a model on it as on any AnnData.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("read_shards needs at least one shard path.")
    dup = pd.Index(paths)[pd.Index(paths).duplicated()]
    if len(dup):
        raise ValueError(f"Shard path(s) given more than once: {list(dup)}; pass each once.")
    obsm_keys = [] if obsm_keys is None else [str(k) for k in obsm_keys]
    frames, n_obs = [], []
    side: dict[str, list] = {k: [] for k in obsm_keys}
    side_uns: dict[str, object] = {}
    var0 = cols0 = var_frame = None
    for i, path in enumerate(paths):
        root = open_shard(path)
        try:
            obs, var = _read_frame(root, "obs"), _read_frame(root, "var")
            _, shape = matrix_kind(matrix_elem(root, layer, path), path)
            for key in obsm_keys:
                side[key].append(_read_obsm(root, key, i, path, len(obs)))
                if i == 0 and "uns" in root and f"{key}_feature" in root["uns"]:
                    side_uns[f"{key}_feature"] = anndata.io.read_elem(
                        root["uns"][f"{key}_feature"])
        finally:
            if isinstance(root, h5py.File):
                root.close()
        if i == 0:
            var_frame, var0, cols0 = var, pd.Index(var.index.astype(str)), list(obs.columns)
        else:
            _check_schema(i, path, paths[0], var0, cols0, var, obs)
        if shape != (len(obs), len(var0)):
            raise ValueError(
                f"Shard {i} ({path!r}) has a {shape[0]} x {shape[1]} matrix but {len(obs)} cells "
                f"and {len(var0)} genes in obs/var; the file is inconsistent, rewrite it."
            )
        frames.append(obs)
        n_obs.append(len(obs))
    if sum(n_obs) == 0:
        raise ValueError(f"The shards hold no cells ({len(paths)} shard(s), all empty).")
    obs = _concat_obs(frames, cols0)
    var_frame = var_frame.copy()
    var_frame.index = var0
    zeros = sp.csr_matrix((len(obs), len(var0)), dtype=np.float32)
    stub = AnnData(X=zeros, obs=obs, var=var_frame)
    if layer is not None:
        stub.layers[layer] = zeros
    for key, parts in side.items():
        widths = {p.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(
                f"obsm[{key!r}] has {sorted(widths)} columns in different shards; every shard "
                "needs the same columns."
            )
        stub.obsm[key] = sp.vstack(parts).tocsr() if any(sp.issparse(p) for p in parts) else (
            np.concatenate(parts))
    stub.uns.update(side_uns)
    stub.uns[SHARDS_UNS_KEY] = json.dumps({"paths": paths, "n_obs": n_obs, "layer": layer})
    return stub


def is_sharded(adata) -> bool:
    """Whether ``adata`` is a stub from :func:`read_shards` (its matrix lives in shard files)."""
    return isinstance(adata, AnnData) and SHARDS_UNS_KEY in adata.uns


def shard_set(adata: AnnData) -> ShardSet:
    """The shards behind a stub made by :func:`read_shards`."""
    if not is_sharded(adata):
        raise ValueError(
            "This AnnData is not a sharded stub; make one with cellsight.data.read_shards(paths)."
        )
    rec = json.loads(adata.uns[SHARDS_UNS_KEY])
    if sum(rec["n_obs"]) != adata.n_obs:
        raise ValueError(
            f"The sharded AnnData has {adata.n_obs} cells but its shards hold "
            f"{sum(rec['n_obs'])}; do not subset a sharded stub, pass indices= instead."
        )
    return ShardSet(tuple(rec["paths"]), tuple(int(n) for n in rec["n_obs"]), rec["layer"])


def validate_shards(
    paths_or_stub: Sequence[str | os.PathLike] | AnnData,
    require_counts: bool = True,
    *,
    layer: str | None = None,
    likelihood: str | None = None,
    chunk_size: int = 4096,
) -> pd.DataFrame:
    """Check every value of every shard in one streaming pass (schema checks included).

    Parameters
    ----------
    paths_or_stub
        Shard paths, or a stub from :func:`read_shards` (its layer is used).
    require_counts
        Also require non-negative integer values (raw counts).
    layer
        Layer to check when paths are given (``None``: ``X``).
    likelihood
        Likelihood name used in error messages.
    chunk_size
        Rows read per contiguous chunk.

    Returns
    -------
    One row per shard: ``path``, ``n_obs``, ``nnz`` (stored non-zeros) and ``max`` value.

    Raises
    ------
    ValueError
        On the first chunk with NaN/inf values (or, with ``require_counts``, negative or
        non-integer values), naming the shard, cell and gene.
    """
    stub = paths_or_stub if isinstance(paths_or_stub, AnnData) else read_shards(
        paths_or_stub, layer=layer
    )
    info = shard_set(stub)
    reader = ShardReader(
        info.paths, info.n_obs, info.layer, stub.var_names,
        require_counts=require_counts, likelihood=likelihood,
    )
    rows = []
    try:
        for s, (path, n) in enumerate(zip(info.paths, info.n_obs)):
            nnz, vmax = 0, -np.inf
            for start in range(0, n, chunk_size):
                x = reader.read_shard_rows(s, np.arange(start, min(start + chunk_size, n)))
                vals = x.data if sp.issparse(x) else np.asarray(x)
                nnz += int(np.count_nonzero(vals))
                if vals.size:
                    vmax = max(vmax, float(vals.max()))
            rows.append({"path": path, "n_obs": n, "nnz": nnz, "max": vmax if n else np.nan})
    finally:
        reader.close()
    return pd.DataFrame(rows)
