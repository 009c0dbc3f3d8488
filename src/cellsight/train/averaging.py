"""Epoch weight averaging for any model of the one training path (FADVI uses it by default):
the model keeps the mean of its epoch-end weights over the last
part of training (stochastic weight averaging at a constant learning rate, Izmailov et al. 2018).

Why: the label head fits the labelled cells perfectly within about 30 epochs (training
accuracy 1.0 on the bundled PBMC data), and from then on each epoch's weights predict the
cells it never saw with an accuracy that jumps by up to 0.06 from one epoch to the next (one
run: 0.80, 0.78, 0.78, 0.71 at epochs 80-100): the last iterate is one noisy draw. The mean of
the epoch-end weights from the second half of training is a point near the centre of the
region the optimiser wanders in; measured on the hidden-label protocol of
``benchmarks/fadvi_vs_fadvi.py`` (six data/model seeds) it lifts ``predict`` accuracy on
hidden cells and brings the batch predictability from ``z_l`` and ``z_r`` closer to chance (see
the notes of :class:`~cellsight.models.fadvi.FADVI`).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

__all__ = ["EpochWeightAveraging"]


class EpochWeightAveraging(pl.Callback):
    """Replace the trained module's weights by the mean of its epoch-end weights from epoch
    ``ceil(start_fraction * max_epochs) + 1`` (1-based) to the last.

    Floating-point parameters and buffers are averaged (in float64, cast back); other buffers
    keep their last value. The learning rate is not changed. The average is swapped in before
    the validation cells are scored after the last epoch (so the history's last validation row
    describes the averaged model), or at the end of training when there is no such validation
    (``train_size=1``, early stopping before the last epoch: then the epochs seen so far are
    averaged, none if stopped before the averaging started). The running sum is saved in
    Lightning checkpoints, so a resumed run averages the same epochs.

    Parameters
    ----------
    start_fraction
        Fraction of ``max_epochs`` trained before averaging starts, in ``[0, 1)`` (0: every
        epoch's weights).
    """

    def __init__(self, start_fraction: float = 0.5) -> None:
        if not 0.0 <= float(start_fraction) < 1.0:
            raise ValueError(f"weight averaging start_fraction={start_fraction} must be in [0, 1).")
        self.start_fraction = float(start_fraction)
        self._sum: dict[str, torch.Tensor] | None = None
        self.n_averaged = 0
        self._swapped = False
        self._last_epoch = -1  # the last epoch whose weights were added

    def _first_epoch(self, trainer: pl.Trainer) -> int:
        """0-based index of the first averaged epoch."""
        return math.ceil(self.start_fraction * trainer.max_epochs)

    def _accumulate(self, trainer: pl.Trainer, module: torch.nn.Module) -> None:
        if trainer.current_epoch < self._first_epoch(trainer):
            return
        if trainer.current_epoch == self._last_epoch:
            return
        self._last_epoch = trainer.current_epoch
        state = module.state_dict()
        if self._sum is None:
            self._sum = {k: v.detach().to(torch.float64).clone()
                         for k, v in state.items() if v.is_floating_point()}
        else:
            for k, total in self._sum.items():
                total += state[k].detach().to(torch.float64)
        self.n_averaged += 1

    def _swap_in(self, module: torch.nn.Module) -> None:
        if self._swapped or self._sum is None:
            return
        state = module.state_dict()
        with torch.no_grad():
            for k, total in self._sum.items():
                state[k].copy_((total / self.n_averaged).to(state[k].dtype))
        self._swapped = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.current_epoch == trainer.max_epochs - 1
        if trainer.sanity_checking or not last or self._swapped:
            return
        self._accumulate(trainer, pl_module.module)  # the last epoch's weights join the mean
        self._swap_in(pl_module.module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._swapped:
            self._accumulate(trainer, pl_module.module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module.module)

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n_averaged": self.n_averaged, "swapped": self._swapped,
                "last_epoch": self._last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self._sum = state_dict["sum"]
        self.n_averaged = int(state_dict["n_averaged"])
        self._swapped = bool(state_dict["swapped"])
        self._last_epoch = int(state_dict["last_epoch"])
