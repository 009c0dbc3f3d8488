"""The training plan shared by cellsight's variational models.

It is scvi-tools' public ``scvi.train.TrainingPlan`` (optimiser, KL warm-up by epochs or steps,
ELBO metrics reduced across DDP ranks) plus two things cellsight needs everywhere: the loaders'
per-epoch shuffle is set from the trainer's epoch (so resuming reproduces the order), and the
per-step metrics dictionary a module may add is logged with its name.
"""

from __future__ import annotations

import inspect

from scvi.train import TrainingPlan as _ScviTrainingPlan

from cellsight.checks import check_number

__all__ = ["TrainingPlan", "check_lr"]


def check_lr(lr) -> None:
    """Reject a learning rate that is not a finite number >= 0 (0 freezes the weights)."""
    check_number(lr, "lr", what="e.g. 1e-3")


class TrainingPlan(_ScviTrainingPlan):
    """scvi-tools' training plan with epoch-seeded shuffling.

    Parameters are those of :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``,
    ``n_epochs_kl_warmup``, ``n_steps_kl_warmup``, ``max_kl_weight``, ``min_kl_weight``,
    ``reduce_lr_on_plateau``, ...). Extra keyword arguments go to the module's ``loss``; a
    name that is neither a plan argument nor a ``loss`` argument, a negative or non-finite
    learning rate, or a negative weight decay is a ``ValueError`` here, before training.
    """

    def __init__(self, module, **kwargs) -> None:
        check_lr(kwargs.get("lr", 1e-3))
        check_number(kwargs.get("weight_decay", 0.0), "weight_decay")
        _check_loss_kwargs(type(self), module, kwargs)
        super().__init__(module, **kwargs)

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)


def _check_loss_kwargs(plan_cls: type, module, kwargs: dict) -> None:
    """Reject keyword arguments that neither the plan (``plan_cls`` and its bases) nor
    ``module.loss`` takes: the plan forwards unknown names to ``loss``, which would fail only
    at the first training step."""
    loss_params = inspect.signature(module.loss).parameters
    if any(p.kind is p.VAR_KEYWORD for p in loss_params.values()):
        return
    known = set(loss_params)
    for cls in plan_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            known |= set(inspect.signature(init).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        loss_names = sorted(n for n in loss_params if n not in ("tensors", "inference_outputs",
                                                                 "generative_outputs"))
        raise ValueError(
            f"plan_kwargs {unknown} are not arguments of {plan_cls.__name__} nor of "
            f"{type(module).__name__}.loss (which takes {loss_names}); check the spelling "
            "(plan arguments: lr, weight_decay, n_epochs_kl_warmup, reduce_lr_on_plateau, ...)."
        )
