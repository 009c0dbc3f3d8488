"""FADVI's training plan: the fast epoch-metrics plan with a faster time scale for adversaries.

With gradient reversal the encoders and the adversaries move in the same step; if the
adversaries learn no faster than the encoders, the encoders learn to fool the current
adversaries instead of removing the information (a fresh classifier then still reads it).
``adversary_lr_factor`` gives the adversaries' parameters a larger learning rate (two time
scales, as in Heusel et al. 2017), which keeps them closer to the best response to the current
latents at the cost of nothing but an optimiser parameter group. On the bundled PBMC data with
LayerNorm encoders a factor of 10-30 changed the batch predictability of ``z_l`` by less than
0.03 (it is at chance already), so the default is 1.
"""

from __future__ import annotations

from cellsight.train import EpochMetricsTrainingPlan

__all__ = ["FADVITrainingPlan"]


class FADVITrainingPlan(EpochMetricsTrainingPlan):
    """:class:`~cellsight.train.EpochMetricsTrainingPlan` with the adversaries'
    learning rate multiplied by ``adversary_lr_factor`` (other parameters as scvi-tools')."""

    def __init__(self, module, adversary_lr_factor: float = 1.0, **kwargs) -> None:
        if not adversary_lr_factor > 0:
            raise ValueError(f"adversary_lr_factor={adversary_lr_factor} must be > 0.")
        super().__init__(module, **kwargs)
        self.adversary_lr_factor = float(adversary_lr_factor)

    def get_optimizer_creator(self):
        base = super().get_optimizer_creator()
        adversaries = getattr(self.module, "adversaries", None)
        if self.adversary_lr_factor == 1.0 or adversaries is None:
            return base
        adv_ids = {id(p) for p in adversaries.parameters()}

        def create(params):
            params = list(params)
            groups = [
                {"params": [p for p in params if id(p) not in adv_ids]},
                {"params": [p for p in params if id(p) in adv_ids],
                 "lr": self.lr * self.adversary_lr_factor},
            ]
            return base([g for g in groups if g["params"]])

        return create
