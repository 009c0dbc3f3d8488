"""The training plan shared by cellsight's variational models.

It is scvi-tools' public ``scvi.train.TrainingPlan`` (optimiser, KL warm-up by epochs or steps,
ELBO metrics reduced across DDP ranks) plus two things cellsight needs everywhere: the loaders'
per-epoch shuffle is set from the trainer's epoch (so resuming reproduces the order), and the
per-step metrics dictionary a module may add is logged with its name.
"""

from __future__ import annotations

from scvi.train import TrainingPlan as _ScviTrainingPlan

__all__ = ["TrainingPlan"]


class TrainingPlan(_ScviTrainingPlan):
    """scvi-tools' training plan with epoch-seeded shuffling.

    Parameters are those of :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``,
    ``n_epochs_kl_warmup``, ``n_steps_kl_warmup``, ``max_kl_weight``, ``min_kl_weight``,
    ``reduce_lr_on_plateau``, ...). Extra keyword arguments go to the module's ``loss``.
    """

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)
