"""A training plan with the same optimisation and metrics as ``TrainingPlan``, less overhead.

scvi-tools' plan logs seven metrics through Lightning at every step (each ``self.log`` call
moves and wraps tensors) and runs Adam's per-parameter loop; for a small model such as scVI on
CPU that is a large share of a step. This plan sums the ELBO terms of each minibatch into one
tensor and publishes the epoch means once per epoch (reduced across DDP ranks), with the same
names and values as scvi-tools' ``ElboMetric`` (``elbo_train``, ``reconstruction_loss_train``,
``kl_local_train``, ``kl_global_train``, ``train_loss`` and the ``_validation`` ones), and uses
Adam/AdamW stepped by one C call over all parameters (:mod:`cellsight.train.native_adam`;
same update rule).

The epoch means go straight into ``trainer.callback_metrics`` (what early stopping, LR
schedulers and cellsight's history callback read) and to the trainer's loggers, instead of
through ``self.log``, whose per-call bookkeeping costs about a tenth of a small epoch.

Nothing here is specific to scVI; any module returning a ``LossOutput`` can use it.
"""

from __future__ import annotations

import math

import torch
from scvi.module.base import LossOutput

from cellsight.train.native_adam import NativeAdam
from cellsight.train.plan import TrainingPlan

__all__ = ["EpochMetricsTrainingPlan"]


class EpochMetricsTrainingPlan(TrainingPlan):
    """:class:`cellsight.train.TrainingPlan` with epoch-level metric logging and fused Adam.

    Parameters are those of :class:`scvi.train.TrainingPlan`.
    """

    def __init__(self, module, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self._sums: dict[str, torch.Tensor] = {}
        self._extra: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ optimiser
    def get_optimizer_creator(self):
        """Adam/AdamW (scvi-tools' ``lr``, ``eps``, ``weight_decay``) stepped by one C call
        (:class:`~cellsight.train.native_adam.NativeAdam`; torch's fused kernel without the
        native kernels)."""
        if self.optimizer_name not in ("Adam", "AdamW"):
            return super().get_optimizer_creator()
        decoupled = self.optimizer_name == "AdamW"

        def create(params):
            return NativeAdam(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                              decoupled_weight_decay=decoupled, fused=True)

        return create

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        _, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._accumulate("train", out)
        n_batches = self.trainer.num_training_batches
        if math.isfinite(n_batches) and batch_idx + 1 >= n_batches:
            # log before the epoch-end callbacks run (they record the history)
            self._log_epoch("train")
        return out.loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")  # loaders without a length: log here
        super().on_train_epoch_end()

    def validation_step(self, batch, batch_idx):
        _, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._accumulate("validation", out)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("validation")

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _accumulate(self, mode: str, out: LossOutput) -> None:
        n = float(out.n_obs_minibatch)
        loss = out.loss.detach()
        terms = [
            out.reconstruction_loss_sum.detach(),
            out.kl_local_sum.detach(),
            torch.as_tensor(out.kl_global_sum, dtype=loss.dtype, device=loss.device),
            loss * n,
            torch.tensor(n, device=loss.device),
            torch.tensor(1.0, device=loss.device),
        ]
        step = torch.stack([t.to(loss.dtype).reshape(()) for t in terms])
        self._sums[mode] = step if mode not in self._sums else self._sums[mode] + step
        extras = self._extra.setdefault(mode, {})
        for key, value in (out.extra_metrics or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                extras[key] = extras.get(key, 0.0) + value.detach() * n

    def _log_epoch(self, mode: str) -> None:
        sums = self._sums.pop(mode, None)
        extras = self._extra.pop(mode, {})
        if sums is None:
            return
        names = list(extras)
        if names:
            sums = torch.cat([sums, torch.stack([extras[k].reshape(()) for k in names])])
        if self.use_sync_dist:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        rec, kl_local, kl_global, loss_sum, n, steps = sums[:6]
        n_total = self.n_obs_training if mode == "train" else self.n_obs_validation
        n_total = 1 if not n_total else n_total
        metrics = {
            f"elbo_{mode}": (rec + kl_local) / n + kl_global / steps / n_total,
            f"reconstruction_loss_{mode}": rec / n,
            f"kl_local_{mode}": kl_local / n,
            f"kl_global_{mode}": kl_global / steps,
            f"{mode}_loss": loss_sum / n,
        }
        for i, key in enumerate(names):
            metrics[f"{key}_{mode}"] = sums[6 + i] / n
        trainer = self.trainer
        trainer.callback_metrics.update(metrics)
        trainer.progress_bar_metrics[f"{mode}_loss"] = float(metrics[f"{mode}_loss"])
        if trainer.is_global_zero:
            values = {k: float(v) for k, v in metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
