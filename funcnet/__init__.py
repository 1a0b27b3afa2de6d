"""funcnet: networks as chains of progressive layer functions, with an explicit backward pass.

    z_{i+1} = g_i(w_i; z_i),  i = 1..L,   z_1 = x,   loss = l_y(z_{L+1})

Reverse mode is library code you can read (``funcnet.ad._walk``): the forward pass records
each layer's pullback, the backward pass computes p_i = A_i^T q_{i+1} and
q_i = B_i^T q_{i+1} layer by layer, and extensions compute more quantities on the way.
Subpackages: ``funcnet.nn`` (layers), ``funcnet.ad`` (differentiation),
``funcnet.train`` (training). This module only re-exports. See the README for a tour.
"""

from funcnet import atomic, checkpoint, data, losses
from funcnet._caches import clear_caches
from funcnet._errors import ArgumentError, LayerError
from funcnet.ad import (Backprop, GradCheckReport, GradientCheckError, JacobianPlan, LayerCheck,
                        backprop, check_grads, clipped_value_and_grad, extensions, ggn_vp,
                        grad, hessian_sqrt, hvp, jacobian, jacobian_plan, jvp, layer_jacobians,
                        per_example_grad_norms, per_example_grads, sampled_hessian_sqrt,
                        value_and_grad, vjp)
from funcnet.nn import (Chain, Dense, Layer, Repeat, Residual, Summary, avg_pool, chain, conv,
                        dense, dropout, embedding, flatten, gelu, identity, layer, layer_norm,
                        leaky_relu, max_pool, relu, repeat, reshape, residual, self_attention,
                        sigmoid, softplus, summary, tanh)
from funcnet.train import (DPSGD, FitResult, History, TrainingError, TrainState, accuracy,
                           data_parallel_mesh, dp_sgd, evaluate, fit, global_batch,
                           init_train_state, model_parallel_mesh, param_shardings,
                           privacy_spent, shard_batch, state_shardings, train_step)

__version__ = "0.1.0"

# The layer classes (fnet.Chain, fnet.Dense, fnet.Repeat, fnet.Residual) are importable
# here for isinstance checks; help(funcnet.nn) documents them. __all__ lists the contract.

__all__ = [
    "accuracy", "ArgumentError", "atomic", "avg_pool", "Backprop", "backprop", "chain",
    "check_grads", "checkpoint", "clear_caches", "clipped_value_and_grad", "conv", "data",
    "data_parallel_mesh", "dense", "dp_sgd", "DPSGD", "dropout", "embedding", "evaluate",
    "extensions", "fit", "FitResult", "flatten", "gelu", "ggn_vp", "grad", "GradCheckReport",
    "global_batch", "GradientCheckError", "hessian_sqrt", "History", "hvp", "identity", "init_train_state", "jacobian",
    "jacobian_plan", "JacobianPlan", "jvp", "Layer", "layer", "layer_jacobians",
    "layer_norm", "LayerCheck", "LayerError", "leaky_relu", "losses", "max_pool",
    "model_parallel_mesh", "param_shardings", "per_example_grad_norms", "per_example_grads", "privacy_spent", "relu", "repeat",
    "reshape", "residual", "sampled_hessian_sqrt", "self_attention", "shard_batch", "sigmoid", "softplus",
    "state_shardings", "Summary", "summary", "tanh", "train_step", "TrainingError", "TrainState",
    "value_and_grad", "vjp",
]
