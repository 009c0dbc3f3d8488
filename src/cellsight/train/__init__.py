"""The one training path: a Lightning training plan, trainer set-up, DDP and callbacks."""

from cellsight.train.averaging import EpochWeightAveraging
from cellsight.train.callbacks import EpochTimer, HistoryCallback, read_history
from cellsight.train.epoch_plan import EpochMetricsTrainingPlan
from cellsight.train.native_adam import NativeAdam
from cellsight.train.plan import TrainingPlan, check_lr
from cellsight.train.trainer import check_fit_args, fit

__all__ = [
    "TrainingPlan", "EpochMetricsTrainingPlan", "fit", "HistoryCallback", "EpochTimer",
    "read_history", "EpochWeightAveraging", "check_fit_args", "check_lr", "NativeAdam",
]
