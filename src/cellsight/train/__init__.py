"""The one training path: a Lightning training plan, trainer set-up, DDP and callbacks."""

from cellsight.train.averaging import EpochWeightAveraging
from cellsight.train.callbacks import EpochTimer, HistoryCallback, read_history
from cellsight.train.epoch_plan import EpochMetricsTrainingPlan
from cellsight.train.plan import TrainingPlan
from cellsight.train.trainer import fit

__all__ = [
    "TrainingPlan", "EpochMetricsTrainingPlan", "fit", "HistoryCallback", "EpochTimer",
    "read_history", "EpochWeightAveraging",
]
