"""Build a Lightning Trainer and run one fit: the only place cellsight trains anything."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import pandas as pd
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger

from cellsight.checks import check_int, is_integer
from cellsight.train.callbacks import HistoryCallback, read_history

__all__ = ["fit", "resolve_strategy", "check_fit_args"]


def resolve_strategy(accelerator: str, devices: int | str | list, strategy: Any) -> Any:
    """CPU multi-process training defaults to ``ddp_spawn`` (gloo).

    Lightning's ``"auto"`` picks ``"ddp"``, which re-launches the calling script: right for a
    script, wrong for a notebook or a test. Pass ``strategy="ddp"`` explicitly from scripts.
    """
    if isinstance(devices, int):
        n_dev = devices
    else:
        n_dev = len(devices) if isinstance(devices, list) else 0
    if strategy == "auto" and accelerator in ("cpu", "auto") and n_dev > 1:
        return "ddp_spawn"
    return strategy


def fit(
    plan: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    *,
    max_epochs: int,
    accelerator: str = "cpu",
    devices: int | str | list = 1,
    strategy: Any = "auto",
    early_stopping: bool = False,
    early_stopping_monitor: str = "elbo_validation",
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    early_stopping_mode: str = "min",
    seed: int = 0,
    enable_progress_bar: bool = True,
    callbacks: list | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> pd.DataFrame:
    """Train ``plan`` on ``datamodule`` and return the per-epoch history.

    Parameters
    ----------
    plan
        A LightningModule (a training plan wrapping a module).
    datamodule
        Provides ``train_dataloader`` / ``val_dataloader``.
    max_epochs
        Number of passes over the training cells.
    accelerator, devices, strategy
        As in :class:`lightning.pytorch.Trainer`. On CPU with ``devices > 1`` the default
        strategy is ``"ddp_spawn"`` with the gloo backend.
    early_stopping
        Stop when ``early_stopping_monitor`` has not improved by ``early_stopping_min_delta``
        for ``early_stopping_patience`` epochs (needs a validation split).
    seed
        Seeds Python, NumPy and torch before training, so CPU runs are identical.
    enable_progress_bar
        Show Lightning's progress bar.
    callbacks
        Extra Lightning callbacks.
    ckpt_path
        Resume from this Lightning checkpoint (restores the mid-epoch loader position).
    trainer_kwargs
        Any other :class:`lightning.pytorch.Trainer` argument.

    Returns
    -------
    DataFrame indexed by epoch with one column per logged metric (``elbo_train``,
    ``reconstruction_loss_validation``, ...).
    """
    check_fit_args(max_epochs, devices)
    pl.seed_everything(seed, workers=True, verbose=False)
    callbacks = list(callbacks or [])
    has_val = getattr(datamodule, "n_validation", 1) > 0
    if early_stopping:
        if not has_val and early_stopping_monitor.endswith("validation"):
            raise ValueError(
                f"early_stopping monitors {early_stopping_monitor!r} but there is no validation "
                "split; pass train_size < 1 (or validation_size > 0)."
            )
        callbacks.append(
            EarlyStopping(
                monitor=early_stopping_monitor,
                patience=early_stopping_patience,
                min_delta=early_stopping_min_delta,
                mode=early_stopping_mode,
            )
        )
    logdir = tempfile.mkdtemp(prefix="cellsight-")
    history_path = os.path.join(logdir, "history.jsonl")
    callbacks.append(HistoryCallback(history_path))
    logger = CSVLogger(logdir, name="", version="")
    kwargs = dict(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=resolve_strategy(accelerator, devices, strategy),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=enable_progress_bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    if not has_val:
        kwargs["limit_val_batches"] = 0
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*The number of training batches.*")
        warnings.filterwarnings("ignore", ".*in the `DataLoader` to improve performance.*")
        warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
        trainer.fit(plan, datamodule=datamodule, ckpt_path=ckpt_path)
    history = read_history(history_path)
    shutil.rmtree(logdir, ignore_errors=True)
    return history


def check_fit_args(max_epochs, devices=1) -> None:
    """Reject a ``max_epochs`` that is not an integer >= 1 (Lightning reads -1 as "forever"
    and 0 as "train nothing") and a ``devices`` Lightning would reject or misread: a positive
    int, ``"auto"``, ``-1`` (all), a digit string or a non-empty list of device indices."""
    check_int(max_epochs, "max_epochs")
    if isinstance(devices, str):
        ok = devices == "auto" or devices.strip().lstrip("-").isdigit() and int(devices) != 0
    elif isinstance(devices, (list, tuple)):
        ok = len(devices) > 0 and all(is_integer(d) and d >= 0 for d in devices)
    else:
        ok = is_integer(devices) and (devices >= 1 or devices == -1)
    if not ok:
        raise ValueError(
            f"devices={devices!r} must be a positive number of devices (1 trains in this "
            "process; 2 or more on CPU run that many DDP processes), -1 or 'auto' (all), or a "
            "list of device indices."
        )
