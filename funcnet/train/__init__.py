"""Training: one compiled step with any optax optimizer, fit over epochs, metrics, data
parallelism over a device mesh (one process or several), weights split over a mesh's
"model" axis, differentially private training (DP-SGD). Checkpoints are
:mod:`funcnet.checkpoint`."""

from funcnet.train._fit import FitResult, History, TrainingError, fit
from funcnet.train._metrics import accuracy, evaluate
from funcnet.train._parallel import data_parallel_mesh, global_batch, shard_batch
from funcnet.train._privacy import DPSGD, dp_sgd, privacy_spent
from funcnet.train._sharding import model_parallel_mesh, param_shardings, state_shardings
from funcnet.train._state import TrainState, init_train_state
from funcnet.train._step import train_step

__all__ = [
    "accuracy", "data_parallel_mesh", "dp_sgd", "DPSGD", "evaluate", "fit", "FitResult",
    "global_batch", "History", "init_train_state", "model_parallel_mesh", "param_shardings",
    "privacy_spent", "shard_batch", "state_shardings", "train_step", "TrainingError",
    "TrainState",
]
