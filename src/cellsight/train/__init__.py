"""The one training path: a Lightning training plan, trainer set-up, DDP and callbacks."""

from cellsight.train.callbacks import HistoryCallback, read_history
from cellsight.train.plan import TrainingPlan
from cellsight.train.trainer import fit

__all__ = ["TrainingPlan", "fit", "HistoryCallback", "read_history"]
