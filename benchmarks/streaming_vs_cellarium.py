"""One streaming pass of mean/var and of PCA over the same h5ad shards: cellsight vs cellarium-ml.

Shards are cut from the bundled mouse counts (10k cells x 1000 genes, tiled to ``--cells``
cells) into a temporary folder. Both tools stream the same files with the same transforms
(normalise total to 1e4, log1p), minibatch size and one process; cellarium-ml runs in its own
virtual environment (``../shared/tools/peer-venv cellarium``) through a subprocess, and only
the ``Trainer.fit`` calls are timed on both sides, in wall time and in process CPU time (both
run one thread; CPU time is the fairer measure on a machine shared with other work). We also
report the rate at which our mean/var pass reads matrix bytes, next to a plain sequential read
of the same files (the limit here).

Prints one line per metric and exits 0 whether or not a goal is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MOUSE = os.path.join(HERE, "..", "..", "shared", "data",
                     "mouse_10k_subset_1000genes_raw__scanpy-1.11.5-sdist.h5ad")
PEER_VENV = os.path.join(HERE, "..", "..", "shared", "tools", "peer-venv")

PEER_SCRIPT = r'''
import json, sys, time
import numpy as np, torch, lightning.pytorch as pl
from cellarium.ml import CellariumAnnDataDataModule, CellariumModule
from cellarium.ml.data import DistributedAnnDataCollection
from cellarium.ml.models import IncrementalPCA, OnePassMeanVarStd
from cellarium.ml.transforms import Log1p, NormalizeTotal
from cellarium.ml.utilities.data import AnnDataField, densify

def main():
    torch.set_num_threads(1)
    files, shard, last, bs, k = sys.argv[1].split(","), *map(int, sys.argv[2:6])
    dadc = DistributedAnnDataCollection(files, shard_size=shard, last_shard_size=last,
                                        max_cache_size=2)
    var = np.asarray(dadc.var_names)
    out = {}
    for name in ("mean_var", "ipca"):
        dm = CellariumAnnDataDataModule(
            dadc, batch_keys={"x_ng": AnnDataField(attr="X", convert_fn=densify),
                              "var_names_g": AnnDataField(attr="var_names")},
            batch_size=bs, iteration_strategy="same_order", num_workers=0)
        model = OnePassMeanVarStd(var, output_path=None) if name == "mean_var" \
            else IncrementalPCA(var, k)
        module = CellariumModule(transforms=[NormalizeTotal(), Log1p()], model=model)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False)
        t, c = time.perf_counter(), time.process_time()
        trainer.fit(module, dm)
        out[name] = time.perf_counter() - t
        out[name + "_cpu"] = time.process_time() - c
        if name == "mean_var":
            out["mean_g"] = model.mean_g.tolist()
        else:
            out["ev_k"] = model.explained_variance_k.tolist()
    print("RESULT " + json.dumps(out))

if __name__ == "__main__":
    main()
'''


def write_shards(folder: str, n_cells: int, shard_size: int) -> list[str]:
    base = ad.read_h5ad(MOUSE)
    base.X = sp.csr_matrix(base.X, dtype=np.float32)
    reps = int(np.ceil(n_cells / base.n_obs))
    big = sp.vstack([base.X] * reps, format="csr")[:n_cells]
    paths = []
    for k, lo in enumerate(range(0, n_cells, shard_size)):
        part = ad.AnnData(X=big[lo : lo + shard_size], var=base.var.copy())
        part.obs_names = [f"c{i}" for i in range(lo, lo + part.n_obs)]
        path = os.path.join(folder, f"shard{k:03d}.h5ad")
        part.write_h5ad(path)
        paths.append(path)
    return paths


def sequential_read_rate(paths: list[str]) -> tuple[float, int]:
    """Bytes per second of reading every file front to back in 16 MiB chunks."""
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(16 * 1024**2):
                total += len(chunk)
    return total / (time.perf_counter() - t), total


def run_ours(paths: list[str], batch_size: int, k: int) -> dict:
    from cellsight.stats import (
        IncrementalPCA,
        Log1p,
        NormalizeTotal,
        OnePassMeanVarStd,
        fit_statistic,
        stream_data,
    )

    out = {}
    src = stream_data(paths, batch_size=batch_size)
    genes = src.var_names_g
    mv = OnePassMeanVarStd(genes, output_path=None)
    reader = src.datamodule.inner.reader
    before = reader.bytes_read
    t, c = time.perf_counter(), time.process_time()
    fit_statistic(mv, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                  input_var_names_g=genes)
    out["mean_var"] = time.perf_counter() - t
    out["mean_var_cpu"] = time.process_time() - c
    out["bytes_read"] = reader.bytes_read - before
    out["mean_g"] = mv.mean_g.numpy()
    for algo in ("auto", "incremental"):
        pca = IncrementalPCA(genes, k, algorithm=algo)
        t, c = time.perf_counter(), time.process_time()
        fit_statistic(pca, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                      input_var_names_g=genes)
        out[f"ipca_{algo}"] = time.perf_counter() - t
        out[f"ipca_{algo}_cpu"] = time.process_time() - c
        out[f"ev_{algo}"] = pca.explained_variance_k.numpy()
        out[f"algo_{algo}"] = pca.algorithm
    return out


def run_peer(paths: list[str], shard_size: int, last: int, batch_size: int, k: int):
    if not os.path.exists(PEER_VENV):
        return None, "peer-venv tool not found"
    try:
        python = subprocess.run([PEER_VENV, "cellarium"], capture_output=True, text=True,
                                check=True, timeout=3600).stdout.strip().splitlines()[-1]
    except (subprocess.SubprocessError, IndexError) as err:
        return None, f"could not create the cellarium-ml environment ({err})"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(PEER_SCRIPT)
        script = fh.name
    try:
        proc = subprocess.run(
            [python, script, ",".join(paths), str(shard_size), str(last), str(batch_size),
             str(k)], capture_output=True, text=True, timeout=3600,
        )
    finally:
        os.unlink(script)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), None
    return None, f"cellarium-ml run failed: {proc.stderr.strip().splitlines()[-1:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=80_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=2_000)
    parser.add_argument("--n-components", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="cellsight-bench-")
    try:
        paths = write_shards(folder, args.cells, args.shard_size)
        last = args.cells - args.shard_size * (len(paths) - 1)
        rate, n_bytes = sequential_read_rate(paths)
        ours = run_ours(paths, args.batch_size, args.n_components)
        peer, why = run_peer(paths, args.shard_size, last, args.batch_size, args.n_components)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"data: {args.cells} cells x 1000 genes in {len(paths)} h5ad shards "
          f"({n_bytes / 1e6:.1f} MB), minibatch {args.batch_size}, 1 process")
    our_rate = ours["bytes_read"] / ours["mean_var"]
    print(f"read rate (mean/var pass): cellsight {our_rate / 1e6:.1f} MB/s, plain sequential "
          f"read {rate / 1e6:.1f} MB/s, ratio {our_rate / rate:.2f} (limit 1)")
    algo = ours["algo_auto"]
    if peer is None:
        print(f"mean/var pass seconds: cellsight {ours['mean_var']:.2f}, cellarium-ml skipped "
              f"({why})")
        print(f"ipca pass seconds: cellsight {ours['ipca_auto']:.2f} ({algo}), "
              f"{ours['ipca_incremental']:.2f} (incremental), cellarium-ml skipped")
        return 0
    for key, label in (("mean_var", "mean/var pass"), ("ipca", "ipca pass")):
        ours_key = "mean_var" if key == "mean_var" else "ipca_auto"
        extra = "" if key == "mean_var" else f" ({algo})"
        for suffix, what in (("", "wall seconds"), ("_cpu", "CPU seconds")):
            mine, theirs = ours[ours_key + suffix], peer[key + suffix]
            print(f"{label} {what}: cellsight {mine:.2f}{extra}, cellarium-ml {theirs:.2f}, "
                  f"ratio {mine / theirs:.2f} (goal <= 0.5)")
    print(f"ipca pass seconds, incremental algorithm as cellarium's: cellsight "
          f"{ours['ipca_incremental']:.2f}, cellarium-ml {peer['ipca']:.2f}, ratio "
          f"{ours['ipca_incremental'] / peer['ipca']:.2f}")
    diff = np.abs(ours["mean_g"] - np.asarray(peer["mean_g"])).max()
    ev_rel = np.abs(np.asarray(peer["ev_k"])[:10] / ours["ev_auto"][:10] - 1).max()
    ours_rel = np.abs(ours["ev_incremental"][:10] / ours["ev_auto"][:10] - 1).max()
    print(f"agreement: max |mean difference| {diff:.2e}; top-10 explained variance vs our "
          f"exact (gram) pass, max relative difference: cellarium-ml {ev_rel:.3f}, our "
          f"incremental {ours_rel:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
