"""The training plan of CauTrigger: the shared epoch-metrics plan plus per-epoch loss weights."""

from __future__ import annotations

from typing import Any

from cellsight.models.cautrigger.weights import stage_multipliers
from cellsight.train import EpochMetricsTrainingPlan

__all__ = ["CauTriggerTrainingPlan"]


class CauTriggerTrainingPlan(EpochMetricsTrainingPlan):
    """Sets the module's loss weights at every epoch start (staged training) and logs every
    loss term per epoch (``recons_loss_train``, ``causal_loss_train``, ...).

    Parameters
    ----------
    module
        A :class:`~cellsight.models.cautrigger.module.CauTriggerModule`.
    base_weights
        Weight of each loss term as given to ``train``.
    scheme
        A resolved weight scheme (:func:`~cellsight.models.cautrigger.weights.resolve_scheme`)
        or ``None`` for constant weights.
    kwargs
        :class:`scvi.train.TrainingPlan` arguments and the module's other loss arguments.
    """

    def __init__(self, module, base_weights: dict[str, float], scheme: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.base_weights = dict(base_weights)
        self.scheme = scheme
        self.loss_kwargs["weights"] = dict(base_weights)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        weights = dict(self.base_weights)
        if self.scheme is not None:
            mult = stage_multipliers(self.scheme, self.current_epoch, self.trainer.max_epochs)
            weights = {k: v * mult[k] for k, v in weights.items()}
        self.loss_kwargs["weights"] = weights
