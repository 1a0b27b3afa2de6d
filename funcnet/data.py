"""Data sets for experiments: scikit-learn's bundled sets, MNIST-format (IDX) files, .npz.

Every loader returns a :class:`Dataset`: numpy arrays, batch first, split into a training
and a test part, ready for ``net.init(key, ds.in_shape)`` and ``net.apply(params, x)``.

* :func:`load_digits` (10 classes, 64 features), :func:`load_breast_cancer` (binary, 30
  features), :func:`load_diabetes` (regression, 10 features): the small sets that ship
  with scikit-learn (nothing is downloaded), each with a seeded train/test split and
  features standardised with the mean and standard deviation of the TRAINING part only,
  so no information from the test part leaks into the inputs.
* :func:`read_idx` / :func:`write_idx`: the IDX format of MNIST and its relatives
  (Fashion-MNIST, KMNIST, ...), gzipped or not; :func:`load_mnist` reads a directory of
  ``train-*`` and ``t10k-*`` files.
* :func:`load_npz`: arrays saved with ``np.savez`` at a local path.

A file that is missing, truncated or inconsistent raises :class:`DataError` (a
``ValueError``; the missing-file case is also a ``FileNotFoundError``) whose message names
the file, says what is wrong and how to fix it. The file loaders check the size a
header declares before reading the data, and refuse more than ``max_bytes`` of data per
file (per array of an .npz; 4 GiB by default), so a damaged or hostile file (a
decompression bomb, a header claiming terabytes) cannot make them allocate or decompress
more. Nothing here touches the network.

scikit-learn is an optional dependency (``pip install 'funcnet[experiments]'``); it is
imported only when one of its loaders is called.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import struct
import zipfile
import zlib
from typing import NamedTuple, Optional, Tuple, Union

import jax.numpy as jnp
import numpy as np

from funcnet._arguments import check_int
from funcnet.atomic import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

TASKS = ("classification", "binary", "regression")

#: The default ``max_bytes`` of the file loaders: 4 GiB of data per file (per array of
#: an .npz).
DEFAULT_MAX_BYTES = 4 * 2**30


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class DataError(ValueError):
    """A data file or data set that cannot be used as it is.

    Attributes:
      problem: what is wrong, with expected and actual values and the fix.
      path: the file (or directory) concerned, as a string; None when the problem spans
        several files (the message then names each of them).
    """

    def __init__(self, problem: str, path: Optional[PathLike] = None):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self._message = f"{self.path}: {problem}" if self.path is not None else problem
        super().__init__(self._message)

    def __str__(self) -> str:
        return self._message

    def __reduce__(self):
        return (type(self), (self.problem, self.path))


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or directory that does not exist. Both a :class:`DataError` and a
    ``FileNotFoundError``, so either ``except`` clause catches it."""

    def __init__(self, problem: str, path: Optional[PathLike] = None):
        super().__init__(problem, path)
        self.filename = self.path


def _missing(path: pathlib.Path, what: str) -> DataFileNotFoundError:
    """The error for a missing file, with a hint when a (un)gzipped twin exists."""
    hint = f" Check the path (relative paths start at {os.getcwd()})."
    if path.suffix == ".gz" and path.with_suffix("").exists():
        hint = f" An uncompressed file {path.with_suffix('').name} exists; pass that instead."
    elif path.suffix != ".gz" and path.with_name(path.name + ".gz").exists():
        hint = f" A gzipped file {path.name}.gz exists; pass that instead."
    return DataFileNotFoundError(f"no such {what}.{hint}", path)


# --------------------------------------------------------------------------------------
# The Dataset record and standardisation
# --------------------------------------------------------------------------------------


def _describe(array: np.ndarray) -> str:
    return f"{tuple(array.shape)} {array.dtype}"


class Dataset(NamedTuple):
    """A data set split into a training and a test part; numpy arrays, batch first.

    Fields:
      x_train: (N_train, *in_shape) inputs.     y_train: (N_train, ...) targets.
      x_test:  (N_test, *in_shape) inputs.      y_test:  (N_test, ...) targets.
      name: a short name ("digits", "mnist", the .npz file's stem, ...).
      task: "classification" (int32 labels (N,) in [0, n_classes), for
        ``fnet.losses.softmax_cross_entropy``), "binary" (int32 labels (N,) in {0, 1},
        for ``fnet.losses.logistic``) or "regression" (float targets (N, k), for
        ``fnet.losses.squared_error``).
      n_classes: the number of classes (2 for "binary"); None for "regression".
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    task: str
    n_classes: Optional[int]

    @property
    def in_shape(self) -> Tuple[int, ...]:
        """The shape of one input example (no batch axis), as ``net.init`` takes it."""
        return tuple(self.x_train.shape[1:])

    def summary(self) -> str:
        """A few lines: name, task, and the shape and dtype of each array."""
        kind = self.task if self.n_classes is None else f"{self.task}, {self.n_classes} classes"
        return (
            f"{self.name}: {kind}\n"
            f"  train: x {_describe(self.x_train)}, y {_describe(self.y_train)}\n"
            f"  test:  x {_describe(self.x_test)}, y {_describe(self.y_test)}"
        )

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, n_classes={self.n_classes}, "
            f"x_train={_describe(self.x_train)}, y_train={_describe(self.y_train)}, "
            f"x_test={_describe(self.x_test)}, y_test={_describe(self.y_test)})"
        )


def _float_dtype(dtype, where: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{where}: dtype={dtype!r} is not a numpy dtype. {e}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{where}: dtype must be a floating type (np.float32, np.float64, "
            f"jnp.bfloat16, ...), got {dt}. Inputs are standardised, so they are not "
            f"integers; labels are always int32."
        )
    return dt


def standardize(x_train, x_test=None, *, dtype=None):
    """Standardises features with the statistics of the TRAINING part only.

    Each feature (every position of the trailing axes) gets
    ``(x - mean) / std`` with mean and std (population, ddof=0) taken over the batch axis
    of ``x_train``, computed in float64; ``x_test`` is transformed with the same mean and
    std, so nothing about it leaks into the transformation. A feature that is constant on
    the training part (std zero, up to rounding) is divided by 1 instead, so it becomes
    zero there rather than NaN. Exactly::

        mean = x_train.astype(np.float64).mean(axis=0)
        std = x_train.astype(np.float64).std(axis=0)    # then 1 where constant
        x_s = ((x.astype(np.float64) - mean) / std).astype(dtype)

    Args:
      x_train: (N_train, ...) array, N_train >= 1, finite.
      x_test: (N_test, ...) array with x_train's trailing shape, or None.
      dtype: the dtype of the results; default x_train's dtype when it is floating,
        otherwise float32 (funcnet's default).

    Returns:
      ``(x_train_std, x_test_std, (mean, std))``; x_test_std is None when x_test is;
      mean and std are float64 arrays of shape x_train.shape[1:] (std with the 1s).

    >>> xs, _, (mean, std) = standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> xs.tolist(), mean.tolist(), std.tolist()
    ([[-1.0, 0.0], [1.0, 0.0]], [2.0, 5.0], [1.0, 1.0])
    """
    x_train = np.asarray(x_train)
    if x_train.ndim < 1 or x_train.shape[0] == 0:
        raise DataError(
            f"standardize: x_train must have a leading batch axis with at least one "
            f"example, got shape {tuple(x_train.shape)}."
        )
    if dtype is None:
        dtype = x_train.dtype if np.issubdtype(x_train.dtype, np.floating) else np.float32
    dtype = _float_dtype(dtype, "standardize")
    train64 = x_train.astype(np.float64)
    finite = np.isfinite(train64)
    if not finite.all():
        at = np.argwhere(~finite)[0]
        raise DataError(
            f"standardize: x_train holds a non-finite value {train64[tuple(at)]} at index "
            f"{tuple(int(i) for i in at)}; mean and std would be NaN. Remove or impute it."
        )
    mean = train64.mean(axis=0)
    std = train64.std(axis=0)
    constant = std <= 10 * np.finfo(np.float64).eps * np.abs(mean)
    std = np.where(constant, 1.0, std)

    def apply(x):
        return ((x.astype(np.float64) - mean) / std).astype(dtype)

    x_test_std = None
    if x_test is not None:
        x_test = np.asarray(x_test)
        if x_test.shape[1:] != x_train.shape[1:] or x_test.ndim != x_train.ndim:
            raise DataError(
                f"standardize: x_test has shape {tuple(x_test.shape)} but x_train has "
                f"{tuple(x_train.shape)}; every axis but the first (the batch) must match."
            )
        x_test_std = apply(x_test)
    return apply(x_train), x_test_std, (mean, std)


# --------------------------------------------------------------------------------------
# scikit-learn's bundled data sets
# --------------------------------------------------------------------------------------


def _check_split_args(where: str, seed, test_fraction) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"{where}: seed must be a non-negative int, got {seed!r}.")
    if not isinstance(test_fraction, (float, int, np.floating)) or not 0 < test_fraction < 1:
        raise ValueError(
            f"{where}: test_fraction must be a number strictly between 0 and 1 (the share "
            f"of examples held out for testing), got {test_fraction!r}."
        )


def _import_sklearn(where: str):
    try:
        from sklearn import datasets, model_selection
    except ImportError as e:
        raise ImportError(
            f"{where} needs scikit-learn, which is an optional dependency of funcnet. "
            f"Install it with: pip install 'funcnet[experiments]' (or pip install "
            f"scikit-learn)."
        ) from e
    return datasets, model_selection


def _sklearn_dataset(name, task, n_classes, seed, test_fraction, dtype) -> Dataset:
    where = f"load_{name}"
    _check_split_args(where, seed, test_fraction)
    dtype = _float_dtype(dtype, where)
    datasets, model_selection = _import_sklearn(where)
    if name == "diabetes":
        x, y = datasets.load_diabetes(return_X_y=True, scaled=False)
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    stratify = None if task == "regression" else y
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, random_state=int(seed), stratify=stratify
    )
    x_train, x_test, _ = standardize(x_train, x_test, dtype=dtype)
    if task == "regression":
        y_train, y_test = y_train.reshape(-1, 1).astype(dtype), y_test.reshape(-1, 1).astype(dtype)
    else:
        y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    return Dataset(x_train, y_train, x_test, y_test, name, task, n_classes)


def load_digits(seed: int = 0, test_fraction: float = 0.25, dtype=np.float32) -> Dataset:
    """scikit-learn's handwritten digits: 1797 8x8 images, 10 classes.

    Returns a :class:`Dataset` with task "classification", n_classes 10:
    x (N, 64) of ``dtype``, labels y (N,) int32 in 0..9. The split is stratified (each
    class keeps its share in both parts) and seeded: the same ``seed`` gives the same
    split. Features are standardised with the training part's mean and std
    (:func:`standardize`); the pixels that are blank in every training image stay 0.

    Args:
      seed: seeds the split (non-negative int).
      test_fraction: share of the examples held out as the test part, in (0, 1).
      dtype: floating dtype of x.
    """
    return _sklearn_dataset("digits", "classification", 10, seed, test_fraction, dtype)


def load_breast_cancer(seed: int = 0, test_fraction: float = 0.25, dtype=np.float32) -> Dataset:
    """scikit-learn's Wisconsin breast cancer set: 569 examples, 30 features, binary.

    Returns a :class:`Dataset` with task "binary", n_classes 2: x (N, 30) of ``dtype``,
    labels y (N,) int32 in {0, 1} (1 = benign, as scikit-learn has it). Stratified,
    seeded split; features standardised with the training part's statistics.
    Arguments as for :func:`load_digits`.
    """
    return _sklearn_dataset("breast_cancer", "binary", 2, seed, test_fraction, dtype)


def load_diabetes(seed: int = 0, test_fraction: float = 0.25, dtype=np.float32) -> Dataset:
    """scikit-learn's diabetes set: 442 patients, 10 features, a regression target.

    Returns a :class:`Dataset` with task "regression", n_classes None: x (N, 10) of
    ``dtype``, targets y (N, 1) of ``dtype`` (a column, so that y matches a one-output
    network under ``fnet.losses.squared_error``). Seeded, shuffled split (not stratified).

    Only x is standardised (from the raw features, ``scaled=False`` in scikit-learn,
    with the training part's statistics). y is left AS GIVEN: disease progression one
    year on, roughly 25..346, so squared errors are in the thousands; divide y by its
    training std (or similar) yourself if you want unit-scale targets.
    Arguments as for :func:`load_digits`.
    """
    return _sklearn_dataset("diabetes", "regression", None, seed, test_fraction, dtype)


# --------------------------------------------------------------------------------------
# IDX files (the MNIST format)
# --------------------------------------------------------------------------------------

#: IDX type code -> element dtype (big-endian as stored).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
#: deflate's largest expansion (zlib's technical notes): no gzip file of n bytes
#: decompresses to more than 1032 * n bytes.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 2**20


def _open(path: pathlib.Path, what: str):
    """``path`` opened for binary reading; a missing file or a directory is a DataError."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _missing(path, what) from None
    except IsADirectoryError:
        raise DataError(f"is a directory, expected {what}.", path) from None


def _check_max_bytes(max_bytes) -> int:
    return check_int("max_bytes", max_bytes, minimum=1)


def _too_big(declared: str, size: int, max_bytes: int) -> str:
    return (
        f"{declared}, more than max_bytes={max_bytes} allows; refused before reading it. "
        f"If the file is what you expect, pass max_bytes={size} (or more) to raise the limit."
    )


def _read_upto(f, n: int) -> bytearray:
    """At most ``n`` bytes from ``f``, fewer at its end. Read in chunks, so what is
    allocated is what the file really yields, never what a header claims."""
    out = bytearray()
    while len(out) < n:
        chunk = f.read(min(n - len(out), _CHUNK))
        if not chunk:
            break
        out += chunk
    return out


def _skip_upto(f, n: int) -> int:
    """Reads and discards at most ``n`` bytes of ``f``; returns how many there were."""
    count = 0
    while count < n:
        chunk = f.read(min(n - count, _CHUNK))
        if not chunk:
            break
        count += len(chunk)
    return count


def read_idx(path: PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Reads one IDX file (the format of MNIST and its relatives), gzipped or not.

    Layout: two zero bytes; a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64); the number of dimensions n; n big-endian uint32 sizes;
    then the elements, big-endian, in C order. A file that starts with the gzip magic
    bytes 1f 8b is decompressed first, whatever its name.

    The size of the data, prod(sizes) * itemsize, is checked against the header before
    any of it is read: it must equal what an uncompressed file holds after the header,
    fit in what a gzip file can decompress to (deflate expands at most 1032-fold), and
    not exceed ``max_bytes``. Gzip data is decompressed in chunks and never beyond
    ``max_bytes`` (+1, to see that there is more), so a decompression bomb stops there.

    Args:
      path: the file.
      max_bytes: the most bytes of data (after decompression, without the header) the
        file may hold; default 4 GiB (MNIST's training images are 47 MB). Raise it for
        larger files.

    Returns:
      A writable numpy array of the header's shape, in native byte order (uint8 for
      MNIST images (N, 28, 28) and labels (N,)).

    Raises:
      DataFileNotFoundError: no such file (a hint names a gzipped/un-gzipped twin).
      DataError: corrupt or truncated gzip data; a bad magic number; an unknown type
        code; a header or data section shorter or longer than the header declares; data
        larger than ``max_bytes``.
      ArgumentError: ``max_bytes`` is not a positive int.
    """
    path = pathlib.Path(path)
    max_bytes = _check_max_bytes(max_bytes)
    with _open(path, "IDX file") as f:
        gz = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        file_size = os.fstat(f.fileno()).st_size
        if not gz:
            return _read_idx_from(f, path, file_size, False, max_bytes)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                return _read_idx_from(g, path, file_size, True, max_bytes)
        except EOFError:
            raise DataError(
                "the gzip stream ends early: the file is truncated (an interrupted "
                "download or copy?). Fetch it again.",
                path,
            ) from None
        except (OSError, zlib.error) as e:
            raise DataError(
                f"starts like a gzip file but its compressed data is corrupt ({e}). Fetch "
                f"it again, or check that it is the file you meant.",
                path,
            ) from None


def _read_idx_from(f, path: pathlib.Path, file_size: int, gz: bool, max_bytes: int):
    """read_idx's parsing, from ``f`` (the file itself, or a GzipFile over it)."""
    where = " (after gzip decompression)" if gz else ""
    magic = bytes(_read_upto(f, 4))
    if len(magic) < 4:
        raise DataError(
            f"the header is truncated: an IDX file starts with a 4-byte magic number, but "
            f"the file holds only {len(magic)} byte(s){where}. The file is incomplete or "
            f"not an IDX file.",
            path,
        )
    if magic[:2] != b"\x00\x00":
        if magic[:2] == b"PK":
            guess = " It looks like a zip archive (an .npz?); use load_npz for those."
        elif magic[:4] == b"\x93NUM":
            guess = " It looks like a .npy file; use np.load for those."
        else:
            guess = ""
        raise DataError(
            f"bad magic number {magic.hex(' ')}{where}: an IDX file starts with two zero "
            f"bytes, a type code and the number of dimensions.{guess}",
            path,
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} {dt.name}" for c, dt in IDX_DTYPES.items())
        raise DataError(
            f"unknown IDX type code 0x{code:02X} in the magic number {magic.hex(' ')}"
            f"{where}; known codes: {known}. The file is corrupt or not an IDX file.",
            path,
        )
    dtype = IDX_DTYPES[code]
    header_size = 4 + 4 * ndim
    sizes = bytes(_read_upto(f, 4 * ndim))
    if len(sizes) < 4 * ndim:
        raise DataError(
            f"the header is truncated: it declares {ndim} dimension(s), so it is "
            f"{header_size} bytes long, but the file holds only {4 + len(sizes)} byte(s)"
            f"{where}. The file is incomplete; fetch it again.",
            path,
        )
    shape = struct.unpack(f">{ndim}I", sizes)
    expected = math.prod(shape) * dtype.itemsize
    declared = (
        f"the header declares shape {shape} of {dtype.name}, which needs {expected} bytes "
        f"of data"
    )

    def mismatch(got: int, amount: str) -> DataError:
        if got < expected:
            problem = (
                f"the data is truncated: {declared}, but only {amount} follow the "
                f"{header_size}-byte header{where}. The file is incomplete (an "
                f"interrupted download or copy?); fetch it again."
            )
        else:
            problem = (
                f"the data is oversized: {declared}, but {amount} follow the "
                f"{header_size}-byte header{where}. Header and data disagree; the file is "
                f"corrupt or not an IDX file."
            )
        return DataError(problem, path)

    if not gz and file_size - header_size != expected:
        got = file_size - header_size
        extra = f" ({got - expected} extra)" if got > expected else ""
        raise mismatch(got, f"{got} bytes{extra}")
    if gz and header_size + expected > _DEFLATE_MAX_RATIO * file_size:
        raise DataError(
            f"the data is truncated: {declared}, but a gzip file of {file_size} bytes "
            f"decompresses to at most {_DEFLATE_MAX_RATIO * file_size} bytes (deflate "
            f"expands at most {_DEFLATE_MAX_RATIO}-fold). The file is incomplete or "
            f"corrupt; fetch it again.",
            path,
        )
    if expected > max_bytes:
        raise DataError(_too_big(declared, expected, max_bytes), path)
    body = _read_upto(f, expected + 1)  # only gzip data can differ from the header here
    got = len(body)
    if got < expected:
        raise mismatch(got, f"{got} bytes")
    if got > expected:
        got += _skip_upto(f, max_bytes + 1 - got)  # count the excess, up to the limit
        if got > max_bytes:
            raise mismatch(got, f"more than max_bytes={max_bytes} bytes (decompression "
                                f"stopped there)")
        raise mismatch(got, f"{got} bytes ({got - expected} extra)")
    data = np.frombuffer(body, dtype=dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array, *, compress: Optional[bool] = None) -> pathlib.Path:
    """Writes ``array`` as an IDX file, atomically; the inverse of :func:`read_idx`.

    The file is written to a temporary file in the same directory, flushed to disk
    (fsync) and renamed over ``path`` (``os.replace``), so a reader never sees half a
    file and an interrupted write leaves any old file intact. A new file gets mode 0o644;
    a replaced file keeps its mode.

    Args:
      path: where to write.
      array: any array of dtype uint8, int8, int16, int32, float32 or float64 (any byte
        order), at most 255 dimensions, each smaller than 2**32.
      compress: gzip the file; default: exactly when ``path`` ends in ".gz".

    Returns:
      ``path`` as a pathlib.Path.
    """
    path = pathlib.Path(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise TypeError(
            f"write_idx({str(path)!r}): IDX stores uint8, int8, int16, int32, float32 or "
            f"float64, got an array of dtype {array.dtype}. Convert it first, for example "
            f"labels.astype(np.uint8) or x.astype(np.float32)."
        )
    if array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(
            f"write_idx({str(path)!r}): IDX allows at most 255 dimensions, each below "
            f"2**32, got shape {tuple(array.shape)}."
        )
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"

    def write(f):
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
                g.write(header)
                g.write(data)
        else:
            f.write(header)
            f.write(data)

    _atomic_write(path, write)
    return path


def _atomic_write(path: pathlib.Path, write) -> None:
    if not path.parent.is_dir():
        raise _missing(path.parent, "directory to write into")
    atomic_write(path, write)


# --------------------------------------------------------------------------------------
# MNIST-format directories
# --------------------------------------------------------------------------------------


def _mnist_file(directory: pathlib.Path, kind: str, part: str, idx: int) -> pathlib.Path:
    names = [
        f"{kind}-{part}-idx{idx}-ubyte",
        f"{kind}-{part}.idx{idx}-ubyte",
    ]
    candidates = [n + ext for n in names for ext in ("", ".gz")]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
    raise DataFileNotFoundError(
        f"no MNIST {kind} {part} file: looked for {', '.join(candidates)}; the directory "
        f"holds: {shown or 'nothing'}. Put the four files train-images-idx3-ubyte, "
        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        f"(each optionally .gz) in it.",
        directory,
    )


def read_mnist(
    directory: PathLike,
    kind: str = "train",
    *,
    dtype=np.float32,
    n_classes: int = 10,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tuple[np.ndarray, np.ndarray]:
    """Reads one part of an MNIST-format directory: ``kind`` is "train" or "t10k".

    Finds ``{kind}-images-idx3-ubyte`` and ``{kind}-labels-idx1-ubyte`` (also with "."
    for the last "-", and/or ".gz"; the uncompressed file wins when both exist).

    Returns:
      images (N, rows, cols) of ``dtype``, the uint8 pixels divided by 255 (so in
      [0, 1]), rows and cols as the file's header says (28, 28 for MNIST); and labels
      (N,) int32 in [0, n_classes).

    ``max_bytes`` (default 4 GiB) bounds the data of each file, as in :func:`read_idx`.

    Raises:
      DataFileNotFoundError: no such directory, or a file is missing (the message lists
        the names tried and the directory's contents).
      DataError: a bad file (see :func:`read_idx`); images that are not uint8 (N, rows,
        cols); labels that are not integers (N,); image and label counts that differ
        (naming both files); a label outside [0, n_classes).
    """
    if kind not in ("train", "t10k"):
        raise ValueError(f"read_mnist: kind must be 'train' or 't10k', got {kind!r}.")
    dtype = _float_dtype(dtype, "read_mnist")
    max_bytes = _check_max_bytes(max_bytes)
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise _missing(directory, "directory (expected one holding MNIST-format files)")
    if not directory.is_dir():
        raise DataError(
            "is not a directory; pass the directory holding the MNIST files.", directory
        )
    images_path = _mnist_file(directory, kind, "images", 3)
    labels_path = _mnist_file(directory, kind, "labels", 1)
    images = read_idx(images_path, max_bytes=max_bytes)
    labels = read_idx(labels_path, max_bytes=max_bytes)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"MNIST images must be uint8 pixels of shape (N, rows, cols), got "
            f"{_describe(images)}. Is this an image file?",
            images_path,
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(
            f"MNIST labels must be integers of shape (N,), got {_describe(labels)}. Is "
            f"this a label file?",
            labels_path,
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"inconsistent MNIST {kind} files: {images_path} holds {images.shape[0]} "
            f"images but {labels_path} holds {labels.shape[0]} labels; they must hold one "
            f"label per image. Use images and labels from the same release."
        )
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise DataError(
            f"label {int(labels[bad[0]])} at index {int(bad[0])} (and {bad.size - 1} more) "
            f"is outside [0, {n_classes - 1}]. Pass n_classes= to match the data set (for "
            f"example 27 for EMNIST letters), or check that this is a label file.",
            labels_path,
        )
    return images.astype(dtype) / np.asarray(255, dtype), labels.astype(np.int32)


def load_mnist(
    directory: PathLike,
    *,
    dtype=np.float32,
    n_classes: int = 10,
    name: str = "mnist",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Loads an MNIST-format directory (MNIST, Fashion-MNIST, KMNIST, ...) from disk.

    The training part comes from the ``train-*`` files, the test part from the
    ``t10k-*`` files (see :func:`read_mnist` for names, shapes and errors). Returns a
    :class:`Dataset` with task "classification": x (N, rows, cols) of ``dtype`` in
    [0, 1] (not standardised; ``fnet.flatten`` turns it into (N, rows*cols)), labels
    (N,) int32. Nothing is downloaded. ``max_bytes`` (default 4 GiB) bounds the data
    of each of the four files (see :func:`read_idx`); raise it for larger sets.
    """
    kwargs = dict(dtype=dtype, n_classes=n_classes, max_bytes=max_bytes)
    x_train, y_train = read_mnist(directory, "train", **kwargs)
    x_test, y_test = read_mnist(directory, "t10k", **kwargs)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"the train images are {x_train.shape[1:]} but the t10k images are "
            f"{x_test.shape[1:]}; both parts must come from the same data set.",
            directory,
        )
    return Dataset(x_train, y_train, x_test, y_test, name, "classification", n_classes)


# --------------------------------------------------------------------------------------
# .npz archives
# --------------------------------------------------------------------------------------

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


#: What zipfile, zlib and numpy's .npy parser raise for a damaged archive or array.
_CORRUPT = (
    zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
    OverflowError, struct.error, NotImplementedError, RuntimeError,
)


def _kind(e: Exception) -> str:
    """``zlib.error``, ``zipfile.BadZipFile``, ``EOFError``: the exception's type, named
    so that the message says where it came from."""
    module = type(e).__module__
    return type(e).__name__ if module == "builtins" else f"{module}.{type(e).__name__}"


def _npy_header(f) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at ``f``'s position, reading
    no data; a ValueError if the header is bad."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        # 3.0 differs from 2.0 only in the header text's encoding (utf-8, for field
        # names), which leaves the shape and the item size alone.
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unknown .npy format version {version}")
    if any(d < 0 for d in shape):
        raise ValueError(f"the .npy header declares a negative dimension, shape {shape}")
    return shape, fortran, dtype


def _read_npz(path: pathlib.Path, wanted, max_bytes: int) -> dict:
    """Reads the arrays ``wanted(keys_present)`` names; every failure names the file.

    Each array's .npy header is read first, and the array is refused before any of its
    data is read (so before anything is allocated or decompressed) when its dtype holds
    Python objects, when the size it declares differs from what its zip entry holds, or
    when that size exceeds ``max_bytes``."""
    with _open(path, ".npz file") as f:
        if f.read(6) == b"\x93NUMPY":
            f.seek(0)
            try:
                shape, _, dtype = _npy_header(f)
                what = f"a single array {tuple(shape)} {dtype}"
            except _CORRUPT:
                what = "a single array"
            raise DataError(
                f"is a .npy file holding {what}, not an .npz archive of named arrays. "
                f"Save x and y together with np.savez(path, x=..., y=...).",
                path,
            )
        f.seek(0)
        try:
            archive = zipfile.ZipFile(f)
        except _CORRUPT as e:
            raise DataError(
                f"cannot be read as an .npz archive ({_kind(e)}: {e}). The file is "
                f"truncated, corrupt or not an .npz file; re-create it with np.savez(path, "
                f"x=..., y=...).",
                path,
            ) from None
        with archive:
            # np.savez stores array NAME as the entry NAME.npy; np.load's keys drop ".npy".
            members = {n[:-4] if n.endswith(".npy") else n: n for n in archive.namelist()}
            keys = wanted(list(members))
            return {k: _read_npz_array(archive, members[k], k, path, max_bytes) for k in keys}


def _read_npz_array(archive: zipfile.ZipFile, member: str, key: str, path, max_bytes: int):
    if not member.endswith(".npy"):
        raise DataError(
            f"entry {member!r} is not a .npy array (np.savez stores array NAME as "
            f"NAME.npy). Re-create the file with np.savez.",
            path,
        )
    info = archive.getinfo(member)
    try:
        with archive.open(info) as f:
            shape, fortran, dtype = _npy_header(f)
            header_size = f.tell()
            if dtype.hasobject:
                raise DataError(
                    f"array {key!r} is an object array (pickled Python objects), which "
                    f"load_npz refuses to unpickle (allow_pickle=False, for safety). Save "
                    f"numeric arrays instead, e.g. np.asarray(values, dtype=np.float32).",
                    path,
                )
            needed = math.prod(shape) * dtype.itemsize
            declared = (
                f"array {key!r} has shape {tuple(shape)} of {dtype}, which needs {needed} "
                f"bytes"
            )
            held = info.file_size - header_size
            if needed != held:
                raise DataError(
                    f"{declared}, but its zip entry {member!r} holds {held} bytes after the "
                    f"{header_size}-byte .npy header. The file is corrupt; re-create it "
                    f"with np.savez.",
                    path,
                )
            if needed > max_bytes:
                raise DataError(_too_big(declared, needed, max_bytes), path)
            # In chunks: even a zip directory that lies about the entry's size cannot make
            # this allocate more than the entry really holds.
            body = _read_upto(f, needed)
    except DataError:
        raise
    except _CORRUPT as e:
        raise DataError(
            f"array {key!r} cannot be read ({_kind(e)}: {e}). The file is "
            f"truncated or corrupt; re-create it with np.savez.",
            path,
        ) from None
    if len(body) < needed:
        raise DataError(
            f"{declared}, but its zip entry {member!r} ends after {len(body)} of them. The "
            f"file is truncated or corrupt; re-create it with np.savez.",
            path,
        )
    return np.ndarray(shape, dtype, buffer=body, order="F" if fortran else "C")


def _npz_labels(y: np.ndarray, key: str, path, task: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(
            f"{key} has shape {tuple(y.shape)} but {task} labels must be one integer per "
            f"example, shape (N,). Pass task='regression' for real-valued targets.",
            path,
        )
    integral = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
    if not integral:
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
                and np.all(y == np.round(y))):
            raise DataError(
                f"{key} has dtype {y.dtype} with non-integer values, but {task} labels "
                f"must be integers. Pass task='regression' for real-valued targets.",
                path,
            )
    if y.size and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
        raise DataError(
            f"{key} holds label {y.min() if y.min() < 0 else y.max()}; labels must lie in "
            f"[0, n_classes). Re-code the labels as 0, 1, ..., n_classes - 1.",
            path,
        )
    return y.astype(np.int32)


def load_npz(
    path: PathLike,
    *,
    x_key: str = "x",
    y_key: str = "y",
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype=None,
    task: Optional[str] = None,
    n_classes: Optional[int] = None,
    standardize_x: bool = False,
    name: Optional[str] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Loads arrays saved with ``np.savez`` / ``np.savez_compressed`` at a local path.

    Two layouts are understood:

    * the four keys ``x_train``, ``y_train``, ``x_test``, ``y_test``: used as they are
      (``test_fraction`` and ``seed`` are then ignored);
    * otherwise ``x_key`` and ``y_key`` (default "x" and "y"): shuffled with
      ``np.random.default_rng(seed)`` and split, round(test_fraction * N) examples (at
      least 1, at most N - 1) going to the test part. Not stratified.

    Object arrays are refused (nothing is unpickled). Each array's .npy header is read
    before its data: an array whose declared size (shape times item size) differs from
    what its zip entry holds, or exceeds ``max_bytes``, is refused before anything is
    allocated or decompressed.

    Args:
      path: the .npz file.
      x_key, y_key: names of the inputs (N, ...) and targets (N, ...) when the file is
        not already split.
      test_fraction, seed: the split, as above.
      dtype: floating dtype for x (and for regression targets); default keeps x's
        stored dtype (regression targets: their float dtype, float32 if integer).
      task: "classification", "binary" or "regression"; default: "classification" when
        y is 1-D with an integer or bool dtype, else "regression".
      n_classes: for "classification"; default max label + 1 (over both parts). For
        "binary" it is 2.
      standardize_x: standardise x with the training part's statistics
        (:func:`standardize`); default False (x as stored, e.g. image pixels).
      name: the Dataset's name; default the file name without its extension.
      max_bytes: the most bytes of data any one array may hold; default 4 GiB. Raise
        it for larger files.

    Returns:
      a :class:`Dataset`. Labels ("classification", "binary") are int32 (N,);
      regression targets of shape (N,) become (N, 1), to match a one-output network
      under ``fnet.losses.squared_error``.

    Raises:
      DataFileNotFoundError: no such file.
      DataError: not a readable .npz (truncated, corrupt, a .npy, ...); keys missing (the
        message lists the keys present); lengths of x and y that differ; train and test
        inputs of different shapes; labels that are not integers in range; an object
        array; an array larger than ``max_bytes``, or of another size than its header
        declares.
      ArgumentError: ``max_bytes`` is not a positive int.
    """
    path = pathlib.Path(path)
    where = f"load_npz({str(path)!r})"
    if task is not None and task not in TASKS:
        raise ValueError(f"{where}: task must be one of {TASKS} or None, got {task!r}.")
    if dtype is not None:
        dtype = _float_dtype(dtype, where)
    max_bytes = _check_max_bytes(max_bytes)

    split = {}

    def wanted(present):
        found = [k for k in SPLIT_KEYS if k in present]
        if len(found) == len(SPLIT_KEYS):
            split["given"] = True
            return list(SPLIT_KEYS)
        if found:
            missing = [k for k in SPLIT_KEYS if k not in present]
            raise DataError(
                f"has {', '.join(found)} but not {', '.join(missing)}; a pre-split file "
                f"needs all of {', '.join(SPLIT_KEYS)}. Keys present: {present}.",
                path,
            )
        missing = [k for k in (x_key, y_key) if k not in present]
        if missing:
            raise DataError(
                f"has no array named {' or '.join(repr(k) for k in missing)}. Keys "
                f"present: {present}. Pass x_key= and y_key= naming the inputs and "
                f"targets, or save the file with x_train, y_train, x_test, y_test.",
                path,
            )
        split["given"] = False
        return [x_key, y_key]

    arrays = _read_npz(path, wanted, max_bytes)

    def check_pair(xk, yk):
        x, y = arrays[xk], arrays[yk]
        for key, a in ((xk, x), (yk, y)):
            if a.ndim < 1:
                raise DataError(
                    f"{key} is a scalar; it must have a leading batch axis (N, ...).", path
                )
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"inconsistent lengths: {xk} holds {x.shape[0]} examples (shape "
                f"{tuple(x.shape)}) but {yk} holds {y.shape[0]} (shape {tuple(y.shape)}); "
                f"they need one target per input.",
                path,
            )
        return x, y

    if split["given"]:
        x_train, y_train = check_pair("x_train", "y_train")
        x_test, y_test = check_pair("x_test", "y_test")
        if x_train.shape[1:] != x_test.shape[1:] or y_train.shape[1:] != y_test.shape[1:]:
            raise DataError(
                f"train and test parts disagree: x_train {tuple(x_train.shape)}, y_train "
                f"{tuple(y_train.shape)}, x_test {tuple(x_test.shape)}, y_test "
                f"{tuple(y_test.shape)}; all axes but the first must match.",
                path,
            )
    else:
        _check_split_args(where, seed, test_fraction)
        x, y = check_pair(x_key, y_key)
        n = x.shape[0]
        if n < 2:
            raise DataError(
                f"{x_key} holds {n} example(s); a train/test split needs at least 2.", path
            )
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
        order = np.random.default_rng(int(seed)).permutation(n)
        test_idx, train_idx = order[:n_test], order[n_test:]
        x_train, x_test, y_train, y_test = x[train_idx], x[test_idx], y[train_idx], y[test_idx]

    names = SPLIT_KEYS if split["given"] else (x_key, y_key, x_key, y_key)
    for key, a in zip(names, (x_train, y_train, x_test, y_test)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataError(
                f"{key} has non-numeric dtype {a.dtype}; inputs and targets must be "
                f"numbers. Encode them numerically before saving.",
                path,
            )

    if task is None:
        integral = np.issubdtype(y_train.dtype, np.integer) or y_train.dtype == np.bool_
        task = "classification" if integral and y_train.ndim == 1 else "regression"
    ykeys = (names[1], names[3])
    if task == "regression":
        if n_classes is not None:
            raise ValueError(f"{where}: n_classes must be None for task='regression'.")
        ydt = dtype
        if ydt is None:
            ydt = y_train.dtype if np.issubdtype(y_train.dtype, np.floating) else np.float32
        if y_train.ndim == 1:
            y_train, y_test = y_train[:, None], y_test[:, None]
        y_train, y_test = y_train.astype(ydt), y_test.astype(ydt)
    else:
        y_train = _npz_labels(y_train, ykeys[0], path, task)
        y_test = _npz_labels(y_test, ykeys[1], path, task)
        top = max(int(y_train.max(initial=0)), int(y_test.max(initial=0)))
        if task == "binary":
            if n_classes not in (None, 2):
                raise ValueError(f"{where}: task='binary' has n_classes 2, got {n_classes}.")
            n_classes = 2
        elif n_classes is None:
            n_classes = top + 1
        if top >= n_classes:
            raise DataError(
                f"holds label {top}, outside [0, {n_classes - 1}] for a {task} task with "
                f"{n_classes} classes. Pass a larger n_classes, or task='classification' "
                f"for more than two classes.",
                path,
            )
    if standardize_x:
        x_train, x_test, _ = standardize(x_train, x_test, dtype=dtype)
    elif dtype is not None:
        x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    if name is None:
        name = path.name[: -len(".npz")] if path.name.endswith(".npz") else path.stem
    return Dataset(x_train, y_train, x_test, y_test, name, task, n_classes)


__all__ = [
    "DataError", "DataFileNotFoundError", "Dataset", "IDX_DTYPES", "load_breast_cancer",
    "load_diabetes", "load_digits", "load_mnist", "load_npz", "read_idx", "read_mnist",
    "standardize", "write_idx",
]
