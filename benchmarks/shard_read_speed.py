"""Streaming speed: cellsight's block-shuffled shard reads vs a plain sequential read.

Cuts the real 10k-cell mouse counts (1000 genes, CSR, gzip) into shards (``--copies``
repeats them to make the data larger), then times one epoch of dense float32 minibatches:

- ``cellsight``: :class:`cellsight.data.ShardedDataModule` (shuffled: contiguous blocks,
  shuffled within a buffer of blocks; count checks on), 0 and 2 DataLoader workers;
- ``sequential``: each file read whole with h5py (no shuffle), then sliced into minibatches,
  the fastest possible way to touch every cell once (and the one that needs the whole file in
  memory).

Prints cells/s and bytes/s (bytes read from the arrays, after decompression) for each, and
the ratio to sequential. Benchmarks report; they never fail on a missed goal.

    python benchmarks/shard_read_speed.py [--copies 4] [--shards 8] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import torch

from cellsight.data import ShardedDataModule, read_shards
from cellsight.datasets import data_path

HERE = os.path.dirname(os.path.abspath(__file__))
MOUSE = str(data_path("mouse_10k"))


def make_shards(out_dir: str, copies: int, n_shards: int) -> list[str]:
    base = ad.read_h5ad(MOUSE)
    base.X = sp.csr_matrix(base.X, dtype=np.float32)
    big = ad.concat([base] * copies, index_unique="-") if copies > 1 else base
    edges = np.linspace(0, big.n_obs, n_shards + 1).astype(int)
    paths = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        p = os.path.join(out_dir, f"shard{k}.h5ad")
        big[lo:hi].copy().write_h5ad(p, compression="gzip")
        paths.append(p)
    return paths


def time_ours(paths, batch_size: int, num_workers: int) -> tuple[float, int, int]:
    stub = read_shards(paths)
    dm = ShardedDataModule(stub, batch_size=batch_size, num_workers=num_workers,
                           require_counts=True)
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["X"].shape[0]
    seconds = time.perf_counter() - t0
    # bytes: measured in process; with workers, estimate from the in-process run's bytes/cell
    return seconds, n, dm.reader.bytes_read


def time_sequential(paths, batch_size: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    n, nbytes = 0, 0
    for p in paths:
        with h5py.File(p, "r") as f:
            g = f["X"]
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            shape = tuple(g.attrs["shape"])
        nbytes += data.nbytes + indices.nbytes + indptr.nbytes
        x = sp.csr_matrix((data, indices, indptr), shape=shape)
        for lo in range(0, shape[0], batch_size):
            xb = torch.from_numpy(x[lo : lo + batch_size].toarray())
            n += xb.shape[0]
    return time.perf_counter() - t0, n, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shards(tmp, args.copies, args.shards)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"data: {args.copies * 10000} cells x 1000 genes in {args.shards} shards, "
              f"{size / 1e6:.1f} MB on disk")
        time_sequential(paths, args.batch_size)  # warm the page cache for both
        s_sec, s_n, s_bytes = time_sequential(paths, args.batch_size)
        o_sec, o_n, o_bytes = time_ours(paths, args.batch_size, 0)
        bytes_per_cell = o_bytes / max(o_n, 1)
        w_sec, w_n, _ = time_ours(paths, args.batch_size, 2)
        seq_cps, seq_bps = s_n / s_sec, s_bytes / s_sec
        for label, sec, n, nbytes in (
            ("cellsight (0 workers)", o_sec, o_n, o_bytes),
            ("cellsight (2 workers)", w_sec, w_n, bytes_per_cell * w_n),
        ):
            cps, bps = n / sec, nbytes / sec
            print(f"shard read cells/s: {label} {cps:,.0f}, sequential {seq_cps:,.0f}, "
                  f"ratio {cps / seq_cps:.2f} (goal >= 0.5)")
            print(f"shard read MB/s: {label} {bps / 1e6:,.1f}, sequential {seq_bps / 1e6:,.1f}, "
                  f"ratio {bps / seq_bps:.2f}")
        print(f"bytes read per epoch: cellsight {o_bytes / 1e6:.1f} MB, sequential "
              f"{s_bytes / 1e6:.1f} MB (ratio {o_bytes / s_bytes:.2f}; 1.0 = no re-reads)")


if __name__ == "__main__":
    main()
