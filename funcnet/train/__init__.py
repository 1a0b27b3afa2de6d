"""Training: one compiled step with any optax optimizer, fit over epochs, metrics, data
parallelism over a device mesh, differentially private training (DP-SGD). Checkpoints
are :mod:`funcnet.checkpoint`."""

from funcnet.train._fit import FitResult, History, TrainingError, fit
from funcnet.train._metrics import accuracy, evaluate
from funcnet.train._parallel import data_parallel_mesh, shard_batch
from funcnet.train._privacy import DPSGD, dp_sgd, privacy_spent
from funcnet.train._state import TrainState, init_train_state
from funcnet.train._step import train_step

__all__ = [
    "accuracy", "data_parallel_mesh", "dp_sgd", "DPSGD", "evaluate", "fit", "FitResult",
    "History", "init_train_state", "privacy_spent", "shard_batch", "train_step",
    "TrainingError", "TrainState",
]
