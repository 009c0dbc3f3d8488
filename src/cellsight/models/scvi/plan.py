"""Where :class:`EpochMetricsTrainingPlan` used to live; it is now shared, in
:mod:`cellsight.train.epoch_plan` (this name stays importable)."""

from cellsight.train.epoch_plan import EpochMetricsTrainingPlan

__all__ = ["EpochMetricsTrainingPlan"]
