"""Checkpoints: save a training state (params, optimizer state, step, PRNG keys) and
restore it into a template, atomically and with every byte checked.

    save(path, tree, step=..., metadata=...)    # tree: any pytree of arrays and scalars
    ckpt = load(path, like)                     # like: a tree of the same layout
    ckpt.tree, ckpt.step, ckpt.metadata

Example (resuming training)::

    state = {"params": params, "opt_state": opt.init(params), "key": key}
    fnet.checkpoint.save("run/ckpt.npz", state, step=step)
    ...
    like = {"params": params0, "opt_state": opt.init(params0), "key": jax.random.key(0)}
    state, step, _ = fnet.checkpoint.load("run/ckpt.npz", like)

``like`` may also be abstract (``jax.eval_shape(make_state)``): only its structure,
shapes and dtypes are used, and its shardings where it has them.

File format (version 1): one uncompressed ``.npz`` archive, readable with
``np.load(path, allow_pickle=False)`` alone, holding

- ``header``: UTF-8 JSON as a uint8 array, with ``format`` ("funcnet-checkpoint"),
  ``format_version`` (1), ``step`` (int or null), ``metadata`` (a JSON object),
  ``structure`` (``str(treedef)`` of the saved tree), ``leaves`` (one record per leaf, in
  ``jax.tree_util`` flattening order: key path, kind, dtype, shape, and how it is stored)
  and ``checksum`` ("sha256:<hex>" over the header without its checksum, serialised with
  sorted keys and no spaces, followed by every stored leaf's raw bytes in order);
- ``leaf_0 .. leaf_{n-1}``: the leaves. Arrays of numpy's own dtypes are stored as they
  are; bfloat16 and the other ml_dtypes as unsigned-integer views of the same width
  (``stored_dtype``), so that no pickle is needed; typed PRNG keys as
  ``jax.random.key_data`` plus the ``impl`` name; Python bool/int/float/complex as 0-d
  bool/int64/float64/complex128 arrays, restored as the same Python type.

Atomicity: ``save`` writes a temporary file ``.<name>.<random>.tmp`` in the target's
directory, flushes and fsyncs it, ``os.replace``s it onto the target and fsyncs the
directory (:func:`funcnet.atomic.atomic_write`). At every moment the target is either the
previous checkpoint or the new one, whole. A save that fails (Ctrl-C, or an ``OSError``
such as a full disk, a file size limit or a directory without write permission, which
``save`` raises as a :class:`CheckpointError` naming the path, the system's reason and a
fix) removes its temporary file and leaves the previous checkpoint as it was. A process
killed outright (SIGKILL, power loss) may leave its temporary file behind; it never
affects the target, and the next ``save`` to the same path removes it (never the
temporary file of a save still running in another process).

Validation: ``load`` trusts nothing in the file. Besides the checksum, every header field
and leaf record must be one ``save`` could have written (a known dtype, a stored dtype
and shape that follow from the leaf's dtype, shape, PRNG implementation or Python type,
a non-negative step, distinct key paths, no extra archive entries), checked before any
jax array is built; anything else, even under a valid checksum, is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import operator
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from funcnet._processes import host_copy, is_writer, several
from funcnet.atomic import atomic_write, temporary_files

__all__ = ["Checkpoint", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION", "info", "load",
           "save"]

FORMAT_NAME = "funcnet-checkpoint"
#: The format version this module writes; it reads this version and all older ones.
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

_HEADER = "header"
_ZIP_MAGIC = b"PK\x03\x04"
_PYTHON_TYPES = {"bool": bool, "int": int, "float": float, "complex": complex}
_PYTHON_KINDS = {"bool": "b", "int": "i", "float": "f", "complex": "c"}
_PYTHON_STORAGE = {"bool": np.bool_, "int": np.int64, "float": np.float64,
                   "complex": np.complex128}
_MISMATCH_HINT = (
    "The checkpoint was written for another network or optimizer (or another layout of "
    "the saved tree). Build `like` exactly as the tree that was saved: same layers and "
    "widths, same input shape, same optimizer, same dtypes (and the same jax_enable_x64 "
    "setting). checkpoint.info(path) shows what the file holds."
)
_CORRUPT_HINT = (
    "The file was damaged after it was written (save itself never leaves a partial "
    "file at the target path); restore it from a copy or use an earlier checkpoint."
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, naming the file.

    Attributes:
      path: the checkpoint's path, as given.
      problem: what is wrong, with expected and found values and how to fix it.
    """

    def __init__(self, path: PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


class Checkpoint(NamedTuple):
    """What :func:`load` returns: the restored tree (in the template's structure), the
    step saved with it (None if none was) and its metadata (a JSON object, {} if none)."""

    tree: Any
    step: Optional[int]
    metadata: Dict[str, Any]


# ----------------------------------------------------------------------------- save


def save(path: PathLike, tree: Any, *, step: Optional[int] = None,
         metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``tree`` (any pytree) to ``path`` atomically; return ``path`` as a Path.

    Leaves may be jax or numpy arrays of any numeric dtype (bfloat16 included), typed PRNG
    key arrays (``jax.random.key``) and Python bool/int/float/complex. The tree is saved
    exactly: :func:`load` gives back every leaf bit for bit, with its dtype.

    Args:
      path: the file to write (any name; ``.npz`` is conventional). Its directory must
        exist. An existing file there is replaced only once the new one is complete and
        on disk, and keeps its permissions.
      tree: e.g. ``{"params": params, "opt_state": opt_state, "key": key}``.
      step: the training step, stored as a Python int.
      metadata: a JSON-serialisable dict (it comes back through JSON: tuples as lists).

    Several processes (``jax.distributed``): every process calls save with the same
    arguments, as it calls a collective; leaves split across processes are gathered,
    process 0 alone writes the file (never two writers on one path), and save returns on
    every process once the file is whole on disk (or raises on every process when it
    could not be written). :func:`load` then reads it on every process, from a file
    system they share.

    Raises:
      CheckpointError: an unsupported leaf (named by its key path), a traced value (save
        cannot run inside ``jax.jit``), a bad step or metadata, a missing directory, or
        a failed write (a full disk, a file size limit, no permission: the system's
        reason and what to do; the previous file at ``path`` is then unchanged).
    """
    path = Path(os.fspath(path))
    if several():
        return _save_from_every_process(path, tree, step, metadata)
    return _write(path, tree, step, metadata)


def _save_from_every_process(path: Path, tree: Any, step, metadata) -> Path:
    """:func:`save` in a run of several processes: gather what is split across
    processes, process 0 writes, and every process learns whether it did (a broadcast
    from process 0, so no process returns before the file is whole on disk)."""
    tree = host_copy(tree)
    failure = None
    if is_writer():
        try:
            _write(path, tree, step, metadata)
        except CheckpointError as error:
            failure = error
    written = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
    if failure is not None:
        raise failure
    if not written:
        raise CheckpointError(path, "could not be written by process 0, which alone writes "
                                    "it in a run of several processes (its own error says "
                                    "why); the previous file there is unchanged.")
    return path


def _write(path: Path, tree: Any, step, metadata) -> Path:
    """:func:`save` by this process alone."""
    step = _check_step(path, step)
    metadata = _check_metadata(path, metadata)
    directory = path.parent
    with _writing(path):
        if not directory.is_dir():
            raise CheckpointError(path, f"the directory {directory} does not exist; create "
                                        f"it first (os.makedirs({str(directory)!r}, "
                                        f"exist_ok=True)).")
        if path.is_dir():
            raise CheckpointError(path, "is a directory; give a file name inside it, e.g. "
                                        f"{path / 'checkpoint.npz'}.")

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs, stored = [], []
    for key_path, leaf in flat:
        spec, array = _encode_leaf(path, _where(key_path), leaf)
        specs.append(spec)
        stored.append(array)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
              "metadata": metadata, "structure": str(treedef), "leaves": specs}
    header["checksum"] = _checksum(header, stored)

    entries = {_HEADER: np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)}
    entries.update((f"leaf_{i}", array) for i, array in enumerate(stored))
    with _writing(path):
        atomic_write(path, lambda file: _write_archive(file, entries))
    return path


_WRITE_FIXES = {
    errno.ENOSPC: "Free space on that disk (e.g. delete old checkpoints) or save to another "
                  "disk.",
    getattr(errno, "EDQUOT", -1): "Free space under your disk quota (e.g. delete old "
                                  "checkpoints) or save elsewhere.",
    errno.EFBIG: "The file is larger than this process may write (the file size limit, "
                 "`ulimit -f`) or than the file system allows: raise the limit or save to "
                 "another file system.",
    errno.EACCES: "Check the permissions of the directory {dir} (saving creates a "
                  "temporary file there and renames it onto the path) and of the file.",
    errno.EROFS: "The file system is read-only; save to a writable directory.",
}
_WRITE_FIXES[errno.EPERM] = _WRITE_FIXES[errno.EACCES]


@contextlib.contextmanager
def _writing(path: Path):
    """Turns an OSError of saving into a CheckpointError with the reason and a fix."""
    try:
        yield
    except OSError as e:
        fix = _WRITE_FIXES.get(e.errno, "Check the disk and the directory {dir}.")
        raise CheckpointError(path, f"could not be written: {e}. The previous file at the "
                                    f"path, if any, is unchanged. "
                                    f"{fix.format(dir=path.parent)}") from e


def _where(key_path) -> str:
    """A leaf's key path as jax prints it, e.g. ``['opt_state'][0].mu['w']``."""
    return jax.tree_util.keystr(key_path) or "<root>"


def _check_step(path: Path, step: Any) -> Optional[int]:
    if step is None:
        return None
    try:
        if isinstance(step, bool):
            raise TypeError
        index = operator.index(step)
        if index < 0:
            raise TypeError
        return index
    except TypeError:
        raise CheckpointError(path, f"step must be a non-negative integer (or None), got "
                                    f"{step!r}; pass e.g. step=int(step).") from None


def _check_metadata(path: Path, metadata: Any) -> Dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, f"metadata must be a dict, got {type(metadata).__name__}.")
    try:  # Normalise through JSON now, so that the checksum sees what load will see.
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"metadata must be JSON-serialisable ({e}); store arrays "
                                    f"in the tree and convert other values to str, int, "
                                    f"float, bool, list or dict.") from None


def _encode_leaf(path: Path, where: str, leaf: Any) -> Tuple[dict, np.ndarray]:
    """One leaf -> (its header record, the array stored for it)."""
    kind = _python_kind(leaf)
    if kind is not None:
        try:
            array = np.asarray(leaf, _PYTHON_STORAGE[kind])
        except OverflowError:
            raise CheckpointError(path, f"leaf {where} is the Python int {leaf}, outside the "
                                        f"int64 range that checkpoints store.") from None
        return _spec(where, "python", kind, (), array, type=kind), array
    if isinstance(leaf, jax.core.Tracer):
        raise CheckpointError(path, f"leaf {where} is a traced value ({leaf}): save cannot "
                                    f"run inside jax.jit/vmap/grad. Return the state from "
                                    f"the jitted step and save it outside.")
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise CheckpointError(path, f"leaf {where} is a {type(leaf).__name__}; checkpoints "
                                    f"hold arrays, PRNG keys and Python numbers. Move other "
                                    f"values into `metadata` or out of the tree.")
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        array = _to_numpy(path, where, lambda: jax.random.key_data(leaf))
        return _spec(where, "key", str(leaf.dtype), leaf.shape, array,
                     impl=str(jax.random.key_impl(leaf))), array
    array = _to_numpy(path, where, lambda: leaf)
    dtype = array.dtype
    storage = _storage_dtype(dtype.name)
    if storage is None:
        raise CheckpointError(path, f"leaf {where} has dtype {dtype}, which checkpoints "
                                    f"do not store (the numeric dtypes of jax arrays only, "
                                    f"bfloat16 included).")
    array = array.view(storage)
    return _spec(where, "array", dtype.name, leaf.shape, array), array


def _python_kind(leaf: Any) -> Optional[str]:
    """"bool", "int", "float" or "complex" for a Python number (numpy scalars are arrays
    here, although np.float64 subclasses float), else None."""
    if isinstance(leaf, np.generic):
        return None
    return next((k for k, t in _PYTHON_TYPES.items() if isinstance(leaf, t)), None)


def _spec(where: str, kind: str, dtype: str, shape, array: np.ndarray, **extra) -> dict:
    return {"path": where, "kind": kind, "dtype": dtype, "shape": [int(d) for d in shape],
            "stored_dtype": array.dtype.name, "stored_shape": list(array.shape), **extra}


def _to_numpy(path: Path, where: str, get) -> np.ndarray:
    try:
        array = np.asarray(get())
    except Exception as e:
        raise CheckpointError(path, f"leaf {where} cannot be copied to host memory "
                                    f"({type(e).__name__}: {e}).") from None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.asarray(array, order="C")  # (np.ascontiguousarray would make 0-d 1-d)


def _storage_dtype(name: str) -> Optional[np.dtype]:
    """The dtype that arrays of dtype ``name`` are stored as: numpy's numeric dtypes as
    they are, bfloat16 and the other ml_dtypes as unsigned integers of their width; None
    where ``name`` is no dtype of jax arrays (not a dtype, or not numeric, or numpy's
    float128 and complex256, which jax lacks)."""
    try:
        dtype = jnp.dtype(name)
    except Exception:  # Any string may come from a file; numpy raises various errors.
        return None
    if dtype.name != name or dtype.itemsize > (16 if dtype.kind == "c" else 8):
        return None
    if dtype.kind in "biufc":
        return dtype
    if dtype.kind == "V" and dtype.names is None and dtype.subdtype is None:
        return np.dtype(f"uint{8 * dtype.itemsize}")  # (jnp.dtype names no other void)
    return None


@functools.lru_cache(maxsize=16)
def _key_layout(impl: str) -> Optional[Tuple[str, str, Tuple[int, ...]]]:
    """The key dtype's name, the key data's dtype name and the key data's trailing shape
    of the PRNG implementation named ``impl``; None if jax knows no such implementation."""
    def make():
        key = jax.random.key(0, impl=impl)
        return key, jax.random.key_data(key)

    try:
        key, data = jax.eval_shape(make)
    except (ValueError, TypeError):
        return None
    return str(key.dtype), np.dtype(data.dtype).name, tuple(data.shape)


def _canonical(header: dict) -> bytes:
    core = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(core, sort_keys=True, separators=(",", ":")).encode()


def _checksum(header: dict, stored: List[np.ndarray]) -> str:
    digest = hashlib.sha256(_canonical(header))
    for array in stored:
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return "sha256:" + digest.hexdigest()


def _write_archive(file, entries: Dict[str, np.ndarray]) -> None:
    """The archive itself (a separate function so tests can interrupt it)."""
    np.savez(file, **entries)


# ----------------------------------------------------------------------------- load


def load(path: PathLike, like: Any) -> Checkpoint:
    """Read the checkpoint at ``path`` into the structure of the template ``like``.

    ``like`` is a tree of the layout that was saved, e.g. freshly initialised params and
    ``opt.init(params)``, or ``jax.eval_shape`` of the function that makes them. Its leaf
    count, key paths, shapes and dtypes must equal the checkpoint's, and ``str`` of its
    tree structure the stored one; the result is built with ``like``'s treedef, so optax
    states come back as their NamedTuples. Arrays come back as jax arrays with the saved
    dtypes (placed with ``like``'s shardings where its leaves have them), typed PRNG keys
    as typed keys, Python numbers as Python numbers, ``step`` as int (or None).

    Raises:
      CheckpointError: naming the file, when it is missing, is not a funcnet checkpoint,
        is corrupt or truncated (unreadable archive, or checksum mismatch), was written by
        a newer format version, or does not match ``like`` (naming the first differing
        leaf by key path, with the expected and found shape and dtype).
    """
    path = Path(os.fspath(path))
    _check_readable(path)
    template, treedef = _describe_template(path, like)
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = _read_header(path, archive)
            _match(path, header, template, str(treedef))
            stored = _read_leaves(path, archive, header)
    except CheckpointError:
        raise
    except Exception as e:  # Any failure to parse the archive means a damaged file.
        raise _unreadable(path, e) from e
    leaves = [_decode_leaf(path, spec, array, leaf)
              for spec, array, (_, leaf) in zip(header["leaves"], stored, template)]
    return Checkpoint(jax.tree_util.tree_unflatten(treedef, leaves), header["step"],
                      header["metadata"])


def info(path: PathLike) -> Dict[str, Any]:
    """The checkpoint's header (format, version, step, metadata, structure and one record
    per leaf: key path, kind, dtype, shape), without reading or verifying the leaves;
    for seeing what a file holds, e.g. to build a template for :func:`load`."""
    path = Path(os.fspath(path))
    _check_readable(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _read_header(path, archive)
    except CheckpointError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(path, f"is corrupt or truncated: reading it failed with "
                                 f"{type(e).__name__}: {e}. {_CORRUPT_HINT}")


def _check_readable(path: Path) -> None:
    if not path.exists():
        where = (f"its directory {path.parent} exists" if path.parent.is_dir()
                 else f"its directory {path.parent} does not exist either")
        leftovers = [p.name for p in temporary_files(path)]
        note = (f"; beside it are incomplete temporary files of interrupted saves, which "
                f"cannot be loaded (the next save removes them): {', '.join(leftovers)}"
                if leftovers else "")
        raise CheckpointError(path, f"no such file ({where}{note}). Check the path, or "
                                    f"save a checkpoint there first.")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file.")
    try:
        with open(path, "rb") as f:
            start = f.read(len(_ZIP_MAGIC))
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e}).") from None
    if not start:
        raise CheckpointError(path, f"is empty (0 bytes), so it is not a funcnet checkpoint. "
                                    f"{_CORRUPT_HINT}")
    if start != _ZIP_MAGIC:
        raise CheckpointError(path, f"is not a funcnet checkpoint: it is not an .npz (zip) "
                                    f"archive (it starts with {start!r}, not {_ZIP_MAGIC!r}).")


def _read_header(path: Path, archive) -> Dict[str, Any]:
    if _HEADER not in archive.files:
        shown = ", ".join(archive.files[:5]) + (", ..." if len(archive.files) > 5 else "")
        raise CheckpointError(path, f"is not a funcnet checkpoint: an .npz archive without a "
                                    f"{_HEADER!r} entry (it holds: {shown or 'nothing'}).")
    raw = archive[_HEADER]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(path, f"is not a funcnet checkpoint: its {_HEADER!r} entry is "
                                    f"a {raw.dtype} array of shape {raw.shape}, not JSON bytes.")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(path, f"is corrupt: its header is not valid JSON ({e}). "
                                    f"{_CORRUPT_HINT}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(path, f"is not a funcnet checkpoint: its header names the "
                                    f"format {found!r}, not {FORMAT_NAME!r}.")
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(path, f"is corrupt: format_version is {version!r}, not a "
                                    f"positive integer. {_CORRUPT_HINT}")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"has format version {version}, newer than this funcnet "
                                    f"reads (up to {FORMAT_VERSION}); it was written by a "
                                    f"newer funcnet. Upgrade funcnet to load it.")
    _validate_header(path, header)
    return header


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_header(path: Path, header: dict) -> None:
    def bad(what):
        return CheckpointError(path, f"is corrupt: its header's {what}. {_CORRUPT_HINT}")

    fields = {"step": lambda v: v is None or (_is_int(v) and v >= 0),
              "metadata": lambda v: isinstance(v, dict),
              "structure": lambda v: isinstance(v, str), "leaves": lambda v: isinstance(v, list),
              "checksum": lambda v: isinstance(v, str) and v.startswith("sha256:")}
    for name, ok in fields.items():
        if name not in header or not ok(header[name]):
            raise bad(f"field {name!r} is missing or malformed ({header.get(name)!r})")
    shape_ok = lambda v: isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)
    for i, spec in enumerate(header["leaves"]):
        ok = (isinstance(spec, dict)
              and all(isinstance(spec.get(k), str) for k in ("path", "dtype", "stored_dtype"))
              and shape_ok(spec.get("shape")) and shape_ok(spec.get("stored_shape"))
              and (spec.get("kind") == "array"
                   or (spec.get("kind") == "key" and isinstance(spec.get("impl"), str))
                   or (spec.get("kind") == "python" and spec.get("type") in _PYTHON_TYPES)))
        if not ok:
            raise bad(f"record of leaf {i} is malformed ({spec!r})")
        problem = _record_problem(spec)
        if problem:
            raise bad(f"record of leaf {i}, {spec['path']}, {problem}")
    paths = [spec["path"] for spec in header["leaves"]]
    if len(set(paths)) != len(paths):
        twice = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise bad(f"leaves name the key path {twice} twice")


def _record_problem(spec: dict) -> Optional[str]:
    """What makes a well-formed leaf record one that save never writes, or None: its
    stored dtype and shape must follow from its dtype and shape (and PRNG implementation,
    or Python type), so that _decode_leaf cannot fail or change the shape."""
    kind, dtype, shape = spec["kind"], spec["dtype"], tuple(spec["shape"])
    if kind == "python":
        if dtype != spec["type"] or shape:
            return f"gives a Python {spec['type']} the dtype {dtype!r} and shape {shape}"
        storage, stored_shape = np.dtype(_PYTHON_STORAGE[dtype]).name, ()
    elif kind == "key":
        layout = _key_layout(spec["impl"])
        if layout is None:
            return f"names the PRNG implementation {spec['impl']!r}, which jax does not know"
        key_dtype, storage, trailing = layout
        if dtype != key_dtype:
            return (f"gives a key of implementation {spec['impl']} the dtype {dtype!r}, not "
                    f"{key_dtype!r}")
        stored_shape = shape + trailing
    else:
        stored = _storage_dtype(dtype)
        if stored is None:
            return f"has the dtype {dtype!r}, which is not a dtype of jax arrays"
        storage, stored_shape = stored.name, shape
    found = (spec["stored_dtype"], tuple(spec["stored_shape"]))
    if found != (storage, stored_shape):
        return (f"stores a {_show(_found(spec))} as {found[0]} of shape {found[1]}, where "
                f"save stores it as {storage} of shape {stored_shape}")
    if math.prod(stored_shape) * np.dtype(storage).itemsize > sys.maxsize:
        return f"gives the shape {shape}, larger than any array can be"
    return None


def _describe_template(path: Path, like: Any) -> Tuple[List[Tuple[str, Any]], Any]:
    """``like`` -> ([(key path, leaf)], treedef), checking each leaf can be a template."""
    if like is None:
        raise CheckpointError(path, "load needs a template `like` (a tree of the saved "
                                    "layout, e.g. fresh params and opt.init(params), or "
                                    "jax.eval_shape of what makes them); got None. "
                                    "checkpoint.info(path) shows what the file holds.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    template = [(_where(k), leaf) for k, leaf in flat]
    for where, leaf in template:
        if not (_python_kind(leaf) is not None
                or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))):
            raise CheckpointError(path, f"template leaf {where} is a {type(leaf).__name__}; "
                                        f"template leaves must be arrays, "
                                        f"jax.ShapeDtypeStructs, PRNG keys or Python numbers.")
    return template, treedef


def _expected(leaf: Any) -> Tuple:
    """A template leaf as (kind, dtype name, shape), comparable with a stored record."""
    kind = _python_kind(leaf)
    if kind is not None:
        return ("python", kind, ())
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return ("key", str(dtype), tuple(leaf.shape))
    return ("array", np.dtype(dtype).name, tuple(int(d) for d in leaf.shape))


def _found(spec: dict) -> Tuple:
    if spec["kind"] == "python":
        return ("python", spec["type"], ())
    return (spec["kind"], spec["dtype"], tuple(spec["shape"]))


def _abstract_python_number(leaf: Any, expected: Tuple, found: Tuple) -> bool:
    """A stored Python number also matches a 0-d ShapeDtypeStruct of its kind, which is
    what jax.eval_shape makes of a Python number (it still comes back as the number)."""
    return (found[0] == "python" and isinstance(leaf, jax.ShapeDtypeStruct)
            and expected[0] == "array" and expected[2] == ()
            and jnp.dtype(expected[1]).kind == _PYTHON_KINDS[found[1]])


def _show(described: Tuple) -> str:
    kind, dtype, shape = described
    if kind == "python":
        return f"Python {dtype}"
    what = "PRNG key array" if kind == "key" else "array"
    return f"{dtype} {what} of shape {shape}"


def _match(path: Path, header: dict, template: List[Tuple[str, Any]], structure: str) -> None:
    stored = header["leaves"]
    for i, (spec, (where, leaf)) in enumerate(zip(stored, template)):
        if spec["path"] != where:
            raise CheckpointError(path, f"does not match the template: leaf {i} of the "
                                        f"template is {where}, of the checkpoint "
                                        f"{spec['path']}. {_MISMATCH_HINT}")
        expected, found = _expected(leaf), _found(spec)
        if expected != found and not _abstract_python_number(leaf, expected, found):
            raise CheckpointError(path, f"does not match the template at leaf {i}, {where}: "
                                        f"expected {_show(expected)}, found {_show(found)}. "
                                        f"{_MISMATCH_HINT}")
    if len(stored) != len(template):
        first = (f"the first extra one is the template's {template[len(stored)][0]}"
                 if len(template) > len(stored)
                 else f"the first extra one is the checkpoint's {stored[len(template)]['path']}")
        raise CheckpointError(path, f"does not match the template: the template has "
                                    f"{len(template)} leaves, the checkpoint {len(stored)}; "
                                    f"{first}. {_MISMATCH_HINT}")
    if header["structure"] != structure:
        at = next((i for i, (a, b) in enumerate(zip(structure, header["structure"])) if a != b),
                  min(len(structure), len(header["structure"])))
        lo = max(0, at - 40)
        raise CheckpointError(path, f"does not match the template: the leaves agree but the "
                                    f"tree structures differ from character {at} on: "
                                    f"template ...{structure[lo:at + 40]}..., checkpoint "
                                    f"...{header['structure'][lo:at + 40]}... "
                                    f"{_MISMATCH_HINT}")


def _read_leaves(path: Path, archive, header: dict) -> List[np.ndarray]:
    specs = header["leaves"]
    missing = [f"leaf_{i}" for i in range(len(specs)) if f"leaf_{i}" not in archive.files]
    if missing:
        raise CheckpointError(path, f"is corrupt or truncated: entries {', '.join(missing[:5])}"
                                    f" are missing from the archive. {_CORRUPT_HINT}")
    extra = sorted(set(archive.files) - {_HEADER} - {f"leaf_{i}" for i in range(len(specs))})
    if extra:
        raise CheckpointError(path, f"is corrupt: the archive holds entries that its header "
                                    f"does not list ({', '.join(extra[:5])}). {_CORRUPT_HINT}")
    stored = []
    for i, spec in enumerate(specs):
        array = archive[f"leaf_{i}"]
        if array.dtype.name != spec["stored_dtype"] or list(array.shape) != spec["stored_shape"]:
            raise CheckpointError(path, f"is corrupt: entry leaf_{i} ({spec['path']}) holds a "
                                        f"{array.dtype.name} array of shape {array.shape}, the "
                                        f"header says {spec['stored_dtype']} "
                                        f"{tuple(spec['stored_shape'])}. {_CORRUPT_HINT}")
        stored.append(array)
    checksum = _checksum(header, stored)
    if checksum != header["checksum"]:
        raise CheckpointError(path, f"is corrupt: checksum mismatch (the header records "
                                    f"{header['checksum'][:23]}..., the contents hash to "
                                    f"{checksum[:23]}...). {_CORRUPT_HINT}")
    return stored


def _decode_leaf(path: Path, spec: dict, array: np.ndarray, like_leaf: Any) -> Any:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if spec["kind"] == "python":
        return _PYTHON_TYPES[spec["type"]](array[()])
    if spec["kind"] == "key":
        return _place(jax.random.wrap_key_data(array, impl=spec["impl"]), like_leaf)
    dtype = jnp.dtype(spec["dtype"])
    if array.dtype != dtype:
        array = array.view(dtype)
    restored = _place(array, like_leaf)
    if restored.dtype != dtype:
        raise CheckpointError(path, f"leaf {spec['path']} is {dtype} but jax made it "
                                    f"{restored.dtype}: enable 64-bit types "
                                    f"(jax.config.update('jax_enable_x64', True)) before "
                                    f"loading this checkpoint.")
    return restored


def _place(value, like_leaf: Any) -> jax.Array:
    """On ``like_leaf``'s sharding when it has one (a concrete array or a ShapeDtypeStruct
    with a sharding), else on the default device."""
    sharding = None
    if isinstance(like_leaf, (jax.Array, jax.ShapeDtypeStruct)) and not isinstance(
            like_leaf, jax.core.Tracer):
        sharding = getattr(like_leaf, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)
