"""funcnet: networks as chains of progressive layer functions, with an explicit backward pass.

    z_{i+1} = g_i(w_i; z_i),  i = 1..L,   z_1 = x,   loss = l_y(z_{L+1})

Reverse mode is library code you can read (``funcnet._reverse``): the forward pass records
each layer's pullback, the backward pass computes p_i = A_i^T q_{i+1} and
q_i = B_i^T q_{i+1} layer by layer. See the README for a tour.
"""

from funcnet import atomic, checkpoint, data, losses
from funcnet._accumulation import JacobianPlan
from funcnet._activations import gelu, identity, leaky_relu, relu, sigmoid, softplus, tanh
from funcnet._chain import Chain, Residual, chain, residual
from funcnet._checks import GradCheckReport, GradientCheckError, LayerCheck, check_grads
from funcnet._dense import Dense, dense
from funcnet._errors import LayerError
from funcnet._forward import jvp
from funcnet._jacobians import jacobian, jacobian_plan, layer_jacobians
from funcnet._layer import Layer, layer
from funcnet._parallel import data_parallel_mesh, shard_batch
from funcnet._per_example import per_example_grads
from funcnet._repeat import Repeat, repeat
from funcnet._reshape import flatten
from funcnet._reverse import Backprop, backprop, grad, value_and_grad, vjp
from funcnet._summary import Summary, summary
from funcnet._training import (FitResult, History, TrainState, TrainingError, accuracy, evaluate,
                               fit, init_train_state, train_step)

__version__ = "0.1.0"

__all__ = [
    "accuracy", "atomic", "Backprop", "backprop", "Chain", "chain", "check_grads",
    "checkpoint", "data", "data_parallel_mesh", "Dense", "dense", "evaluate", "fit",
    "FitResult", "flatten", "gelu", "grad", "GradCheckReport", "GradientCheckError",
    "History", "identity", "init_train_state", "jacobian", "jacobian_plan", "JacobianPlan",
    "jvp", "Layer", "layer", "layer_jacobians", "LayerCheck", "LayerError", "leaky_relu",
    "losses", "per_example_grads", "relu", "Repeat", "repeat", "Residual", "residual",
    "shard_batch", "sigmoid", "softplus", "Summary", "summary", "tanh", "train_step",
    "TrainingError", "TrainState", "value_and_grad", "vjp",
]
