"""Training: one compiled step with any optax optimizer, fit over epochs, metrics, data
parallelism over a device mesh. Checkpoints are :mod:`funcnet.checkpoint`."""

from funcnet.train._fit import FitResult, History, TrainingError, fit
from funcnet.train._metrics import accuracy, evaluate
from funcnet.train._parallel import data_parallel_mesh, shard_batch
from funcnet.train._step import TrainState, init_train_state, train_step

__all__ = [
    "accuracy", "data_parallel_mesh", "evaluate", "fit", "FitResult", "History",
    "init_train_state", "shard_batch", "train_step", "TrainingError", "TrainState",
]
