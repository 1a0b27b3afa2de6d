"""Differentiation: the one backward walk and what is built on it.

The walk (``_walk``) computes p_i = A_i^T q_{i+1} and q_i = B_i^T q_{i+1} for every
container, memory policy (``_policies``) and extension (``extensions``); reverse mode
(``_reverse``), per-example gradients, Jacobians (``_jacobians``, planned by
``_accumulation``), ``check_grads`` and the curvature products (``_curvature``) are
built on it, the curvature extensions on square-root factors it carries (``_factors``,
seeded by ``_hessian_sqrt``); forward mode (``_forward``) composes ``jax.jvp`` the same
way.
"""

from funcnet.ad import extensions
from funcnet.ad._accumulation import JacobianPlan
from funcnet.ad._curvature import ggn_vp, hvp
from funcnet.ad._check_grads import GradCheckReport, GradientCheckError, LayerCheck, check_grads
from funcnet.ad._forward import jvp
from funcnet.ad._jacobians import jacobian, jacobian_plan, layer_jacobians
from funcnet.ad._per_example import (clipped_value_and_grad, per_example_grad_norms,
                                     per_example_grads)
from funcnet.ad._hessian_sqrt import hessian_sqrt, sampled_hessian_sqrt
from funcnet.ad._policies import REMAT_POLICIES
from funcnet.ad._reverse import Backprop, backprop, grad, value_and_grad, vjp

__all__ = [
    "Backprop", "backprop", "check_grads", "clipped_value_and_grad", "extensions",
    "ggn_vp", "grad", "GradCheckReport", "GradientCheckError", "hessian_sqrt", "hvp",
    "jacobian", "jacobian_plan", "JacobianPlan", "jvp", "LayerCheck", "layer_jacobians",
    "per_example_grad_norms", "per_example_grads", "REMAT_POLICIES", "sampled_hessian_sqrt",
    "value_and_grad", "vjp",
]
