"""Test shards cut from the real 10k mouse counts, and a per-rank cell recorder."""

from __future__ import annotations

import functools
import os

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp

from cellsight.datasets import data_path

MOUSE = str(data_path("mouse_10k"))  # the bundled copy of the real 10k mouse counts


@functools.lru_cache(maxsize=1)
def _mouse() -> ad.AnnData:
    return ad.read_h5ad(MOUSE)


def mouse_cells(n_cells: int = 600, n_genes: int = 200, start: int = 0) -> ad.AnnData:
    """Real raw counts (CSR) with toy obs columns: batch, label (with 'unknown'), donor, age."""
    a = _mouse()[start : start + n_cells, :n_genes].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    i = np.arange(n_cells)
    a.obs["batch"] = np.array(["b0", "b1", "b2"])[i % 3]
    a.obs["label"] = np.array(["T", "B", "NK", "unknown"])[(i // 7) % 4]
    a.obs["donor"] = np.array(["d0", "d1"])[(i // 5) % 2]
    a.obs["age"] = np.random.default_rng(0).normal(50, 10, n_cells)
    a.obs["sf"] = np.asarray(a.X.sum(1)).ravel() / 100 + 0.5
    return a


def write_shards(adata: ad.AnnData, tmp_path, bounds, fmt: str = "h5ad", name: str = "s"):
    """Write ``adata[lo:hi]`` for each ``(lo, hi)`` to a shard; returns the paths."""
    paths = []
    for k, (lo, hi) in enumerate(bounds):
        part = adata[lo:hi].copy()
        if fmt == "h5ad":
            p = str(tmp_path / f"{name}{k}.h5ad")
            part.write_h5ad(p)
        else:
            p = str(tmp_path / f"{name}{k}.zarr")
            part.write_zarr(p)
        paths.append(p)
    return paths


def cut(n: int, parts: int) -> list[tuple[int, int]]:
    """Uneven contiguous bounds of ``n`` cells into ``parts`` shards."""
    edges = np.linspace(0, n, parts + 1).astype(int)
    edges[1:-1] += np.arange(1, parts) * 7  # make sizes uneven
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class FileRecorder(pl.Callback):
    """Each rank appends the cells of its training and validation steps to its own file."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _write(self, trainer, stage: str, batch) -> None:
        path = os.path.join(self.out_dir, f"{stage}-rank{trainer.global_rank}.txt")
        cells = batch["ind_x"][:, 0].cpu().numpy()
        with open(path, "a") as fh:
            fh.write(f"{trainer.current_epoch} " + " ".join(map(str, cells)) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._write(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._write(trainer, "val", batch)


def read_recorded(out_dir: str, stage: str, rank: int) -> dict[int, list[np.ndarray]]:
    """Epoch -> list of minibatch cell arrays written by :class:`FileRecorder`."""
    out: dict[int, list[np.ndarray]] = {}
    with open(os.path.join(out_dir, f"{stage}-rank{rank}.txt")) as fh:
        for line in fh:
            epoch, *cells = line.split()
            out.setdefault(int(epoch), []).append(np.asarray(cells, dtype=int))
    return out
