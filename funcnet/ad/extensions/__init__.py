"""Backpropagation extensions: quantities computed by the same backward walk as p_i, q_i.

Pass them to :func:`funcnet.backprop` (``extensions=(...)``); results come back in
``record.extensions[name]`` as pytrees like params. See :mod:`funcnet.ad.extensions._base`
for the protocol a new extension implements, and :mod:`funcnet.ad._factors` for the
curvature factors the curvature extensions read.
"""

from funcnet.ad.extensions._base import Extension, LeafContext
from funcnet.ad.extensions._batch_grad import BatchGrad, batch_grad
from funcnet.ad.extensions._batch_l2 import BatchL2, batch_l2
from funcnet.ad.extensions._diag_ggn import (BatchDiagGGN, DiagGGN, DiagGGNMC, batch_diag_ggn,
                                             diag_ggn, diag_ggn_mc)
from funcnet.ad.extensions._diag_hessian import DiagHessian, diag_hessian
from funcnet.ad.extensions._kronecker import KFAC, KFLR, kfac, kflr
from funcnet.ad.extensions._second_moment import SecondMoment, second_moment
from funcnet.ad.extensions._variance import Variance, variance

__all__ = ["BatchDiagGGN", "batch_diag_ggn", "BatchGrad", "batch_grad", "BatchL2", "batch_l2",
           "DiagGGN", "diag_ggn", "DiagGGNMC", "diag_ggn_mc", "DiagHessian", "diag_hessian",
           "Extension", "KFAC", "kfac", "KFLR", "kflr", "LeafContext", "SecondMoment",
           "second_moment", "Variance", "variance"]
