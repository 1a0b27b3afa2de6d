"""Several processes (``jax.distributed``): who writes, host copies of global arrays, and
the check that every process was given the same arguments.

In a run of P processes every process runs the same program (single program, multiple
data): the same calls in the same order, each process driving its own devices. The
helpers here are collectives where they say so: every process must call them, in the
same order, or the run waits forever.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from funcnet._errors import ArgumentError


def several() -> bool:
    """Whether this run has more than one process."""
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes shared files: process 0, the only one."""
    return jax.process_index() == 0


def host_copy(tree):
    """Every array leaf of ``tree`` as a whole numpy array on this process.

    A leaf held whole by this process's devices (on one device, replicated, or sharded
    over this process's devices alone) is copied from them; a leaf split across
    processes is gathered from all of them (``multihost_utils.process_allgather``, a
    collective: every process must call host_copy on the same tree). Other leaves (PRNG
    keys, Python numbers) come back as they are.
    """
    def copy(leaf):
        if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype,
                                                                   jax.dtypes.prng_key):
            return leaf
        if leaf.is_fully_addressable or leaf.is_fully_replicated:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(copy, tree)


def digest(*parts) -> np.ndarray:
    """A SHA-256 of ``parts`` (arrays by dtype, shape and bytes; anything else by repr)
    as 8 uint32 words."""
    sha = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, jax.Array)):
            array = np.ascontiguousarray(np.asarray(part))
            sha.update(f"{array.dtype}{array.shape}".encode())
            sha.update(array.tobytes())
        else:
            sha.update(repr(part).encode())
    return np.frombuffer(sha.digest(), np.uint32).copy()


def check_same_everywhere(parts: Dict[str, np.ndarray], fixes: Dict[str, str]) -> None:
    """Raises ArgumentError when the digests ``parts[name]`` (from :func:`digest`) differ
    between processes, naming each differing part, the processes that disagree with
    process 0 and ``fixes[name]``. A collective: every process calls it with the same
    names."""
    names = sorted(parts)
    table = np.asarray(multihost_utils.process_allgather(np.stack([parts[n] for n in names])))
    problems = []
    for row, name in enumerate(names):
        differing = _differing(table[:, row])
        if differing:
            problems.append(f"{name} differs on process(es) {differing} from process 0: "
                            f"{fixes[name]}")
    if problems:
        raise ArgumentError("processes", f"every process of a run of {table.shape[0]} must "
                                         f"be given the same arguments, but " +
                                         "; ".join(problems))


def _differing(rows: Iterable[np.ndarray]):
    rows = list(rows)
    return [index for index, row in enumerate(rows) if not np.array_equal(row, rows[0])]
