"""Callbacks of the training path."""

from __future__ import annotations

import json
import math
import os
import time

import lightning.pytorch as pl
import pandas as pd

__all__ = ["HistoryCallback", "EpochTimer", "read_history"]


class EpochTimer(pl.Callback):
    """Wall and process-CPU seconds of each training epoch (validation included).

    ``wall`` and ``cpu`` are lists with one entry per epoch (the benchmarks' speed measure).
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.process_time() - self._t[1])


class HistoryCallback(pl.Callback):
    """Record every epoch-level metric at the end of each training epoch.

    Rank 0 appends one JSON line per epoch to ``path``; the file, not the callback object, is
    the record, so the history survives ``ddp_spawn`` (whose workers are other processes).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        row = {"epoch": int(trainer.current_epoch)}
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step"):
                continue
            v = float(value.detach().cpu()) if hasattr(value, "detach") else float(value)
            row[key] = v if math.isfinite(v) else None
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_history(path: str) -> pd.DataFrame:
    """The per-epoch history written by :class:`HistoryCallback`."""
    if not os.path.exists(path):
        return pd.DataFrame()
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return pd.DataFrame()
    hist = pd.DataFrame(rows).drop_duplicates("epoch", keep="last").set_index("epoch")
    hist = hist.drop(columns=[c for c in ("kl_weight",) if c in hist])
    return hist.sort_index(axis=1).astype(float)
