"""Backpropagation extensions: quantities computed by the same backward walk as p_i, q_i.

Pass them to :func:`funcnet.backprop` (``extensions=(...)``); results come back in
``record.extensions[name]`` as pytrees like params. See :mod:`funcnet.ad.extensions._base`
for the protocol a new extension implements.
"""

from funcnet.ad.extensions._base import Extension, LeafContext
from funcnet.ad.extensions._batch_grad import BatchGrad, batch_grad

__all__ = ["BatchGrad", "batch_grad", "Extension", "LeafContext"]
