"""Shared data and a DDP worker for the streaming-statistics tests."""

from __future__ import annotations

import functools
import os
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellsight.datasets import data_path

MOUSE = str(data_path("mouse_10k"))  # the bundled copy of the real 10k mouse counts


@functools.lru_cache(maxsize=1)
def _mouse() -> ad.AnnData:
    return ad.read_h5ad(MOUSE)


def mouse(n_cells: int | None = None, n_genes: int | None = None) -> ad.AnnData:
    """The bundled real mouse counts (10k x 1000, CSR float32), optionally the first cells/genes,
    with a 3-level 'sample' column (cells assigned at random, seeded)."""
    a = _mouse()
    a = a[: n_cells or a.n_obs, : n_genes or a.n_vars].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.obs["sample"] = np.random.default_rng(0).choice(["s0", "s1", "s2"], a.n_obs)
    return a


def lognorm(x: np.ndarray, target: float = 1e4) -> np.ndarray:
    """numpy reference of normalise-total then log1p (zero-total cells stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    tot = x.sum(1, keepdims=True)
    return np.log1p(x * (target / np.where(tot == 0, 1.0, tot)))


def write_shards(adata: ad.AnnData, folder, bounds) -> list[str]:
    """Write ``adata[lo:hi]`` for each ``(lo, hi)`` as ``.h5ad`` shards; returns the paths."""
    paths = []
    for k, (lo, hi) in enumerate(bounds):
        p = os.path.join(str(folder), f"shard{k}.h5ad")
        adata[lo:hi].copy().write_h5ad(p)
        paths.append(p)
    return paths


def run_all_statistics(paths, *, devices: int, num_workers: int, make_strategy=None) -> dict:
    """Mean/var (per batch), t-digest, HVG and IPCA over shards; their results as arrays.

    ``make_strategy`` returns a fresh Lightning strategy per fit (``None``: the default)."""
    from cellsight.stats import (
        HVGSeuratV3,
        IncrementalPCA,
        Log1p,
        NormalizeTotal,
        OnePassMeanVarStd,
        TDigest,
        fit_statistic,
        stream_data,
    )

    def kw():
        if os.environ.get("CELLSIGHT_TIMING"):
            print("fit start", os.environ.get("RANK"), time.time(), flush=True)
        strategy = None if make_strategy is None else make_strategy()
        return {"devices": devices, "strategy": strategy}

    src = stream_data(paths, batch_key="sample", batch_size=200, num_workers=num_workers)
    genes = src.var_names_g
    out = {}
    mv = OnePassMeanVarStd(genes, "shifted_data", n_batch=src.n_batch, output_path=None)
    fit_statistic(mv, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                  input_var_names_g=genes, **kw())
    out["mean_bg"], out["var_bg"] = mv.batch_mean_bg.numpy(), mv.batch_var_bg.numpy()
    out["n_b"] = mv.x_size_b.numpy()
    td = TDigest(genes)
    fit_statistic(td, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                  input_var_names_g=genes, **kw())
    out["quantiles"] = td.quantiles([0.5, 0.9]).numpy()
    hvg = HVGSeuratV3(genes, 50, n_batch=src.n_batch, use_batch_key=True, output_path=None)
    fit_statistic(hvg, src.datamodule, input_var_names_g=genes, **kw())
    out["hvg"] = hvg.hvg_df["highly_variable"].to_numpy()
    for algo in ("gram", "incremental"):
        pca = IncrementalPCA(genes, 5, algorithm=algo, n_oversamples=20)
        fit_statistic(pca, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                      input_var_names_g=genes, **kw())
        out[f"ev_{algo}"] = pca.explained_variance_k.numpy()
        out[f"pc_{algo}"] = pca.components_kg.numpy()
    return out


def ddp_worker(rank: int, world: int, paths: list[str], out_dir: str, port: int,
               num_workers: int) -> None:
    """One externally launched rank: Lightning joins it (no spawn per fit), every statistic
    runs in the same process group, and this rank's results are saved."""
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
        "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
    })
    def make_strategy():
        return DDPStrategy(broadcast_buffers=False, process_group_backend="gloo")

    out = run_all_statistics(paths, devices=world, num_workers=num_workers,
                             make_strategy=make_strategy)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
