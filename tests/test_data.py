"""Tests for funcnet.data: scikit-learn loaders, IDX/MNIST files, .npz archives.

Every file is written by the tests under tmp_path; nothing is downloaded.
"""

import contextlib
import functools
import gzip
import io
import os
import pickle
import re
import struct
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from funcnet import data
from funcnet._errors import ArgumentError
from funcnet.data import DataError, DataFileNotFoundError


@contextlib.contextmanager
def _peak_memory():
    """Yields a list that receives, on exit, the peak bytes allocated inside the block
    (Python objects and numpy arrays: numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    peak = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()

# --------------------------------------------------------------------------------------
# standardize
# --------------------------------------------------------------------------------------


def test_standardize_uses_train_statistics_only():
    rng = np.random.default_rng(0)
    x_train = rng.normal(3.0, 2.0, size=(50, 4))
    x_test = rng.normal(-7.0, 5.0, size=(9, 4))
    xs_train, xs_test, (mean, std) = data.standardize(x_train, x_test)
    np.testing.assert_array_equal(mean, x_train.mean(axis=0))
    np.testing.assert_array_equal(std, x_train.std(axis=0))
    np.testing.assert_array_equal(xs_test, (x_test - mean) / std)
    np.testing.assert_allclose(xs_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(xs_train.std(axis=0), 1.0, rtol=1e-12)
    assert xs_train.dtype == xs_test.dtype == np.float64


def test_standardize_constant_column_divides_by_one_and_dtypes():
    x_train = np.array([[1, 5], [3, 5], [5, 5]], dtype=np.uint8)
    x_test = np.array([[7, 6]], dtype=np.uint8)
    xs_train, xs_test, (mean, std) = data.standardize(x_train, x_test)
    assert xs_train.dtype == np.float32  # integer inputs -> funcnet's default float32
    np.testing.assert_array_equal(std[1], 1.0)
    np.testing.assert_array_equal(xs_train[:, 1], 0.0)
    np.testing.assert_array_equal(xs_test[:, 1], 1.0)  # (6 - 5) / 1
    assert np.isfinite(xs_train).all()
    xs64, none, _ = data.standardize(x_train, dtype=np.float64)
    assert none is None and xs64.dtype == np.float64


def test_standardize_errors():
    with pytest.raises(DataError, match="x_test has shape"):
        data.standardize(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(DataError, match="at least one example"):
        data.standardize(np.zeros((0, 2)))
    with pytest.raises(DataError, match=r"non-finite value nan at index \(1, 0\)"):
        data.standardize(np.array([[1.0], [np.nan]]))
    with pytest.raises(TypeError, match="floating type"):
        data.standardize(np.zeros((3, 2)), dtype=np.int32)


# --------------------------------------------------------------------------------------
# scikit-learn loaders
# --------------------------------------------------------------------------------------

SKLEARN = {
    # name: (loader, sklearn loader kwargs, n_examples, n_features, task, n_classes)
    "digits": (data.load_digits, {}, 1797, 64, "classification", 10),
    "breast_cancer": (data.load_breast_cancer, {}, 569, 30, "binary", 2),
    "diabetes": (data.load_diabetes, {"scaled": False}, 442, 10, "regression", None),
}


@pytest.fixture
def sklearn_datasets():
    """scikit-learn is in the dev extra the suite runs with; no skip if it is missing."""
    import sklearn.datasets

    return sklearn.datasets


@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_loader_shapes_dtypes_labels(name, sklearn_datasets):
    loader, _, n, features, task, n_classes = SKLEARN[name]
    ds = loader()
    assert isinstance(ds, data.Dataset)
    assert (ds.name, ds.task, ds.n_classes) == (name, task, n_classes)
    assert ds.in_shape == (features,)
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == n
    assert ds.x_test.shape[0] == int(np.ceil(0.25 * n))  # test_fraction=0.25
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == (features,)
    if task == "regression":
        assert ds.y_train.shape == (ds.x_train.shape[0], 1)
        assert ds.y_test.shape == (ds.x_test.shape[0], 1)
        assert ds.y_train.dtype == np.float32
        assert 25 <= ds.y_train.min() and ds.y_train.max() <= 346  # left as given
    else:
        assert ds.y_train.shape == (ds.x_train.shape[0],)
        assert ds.y_test.shape == (ds.x_test.shape[0],)
        assert ds.y_train.dtype == ds.y_test.dtype == np.int32
        both = np.concatenate([ds.y_train, ds.y_test])
        assert set(np.unique(both)) == set(range(n_classes))
        # stratified: each class's share is about the same in both parts
        for c in range(n_classes):
            assert abs(np.mean(ds.y_train == c) - np.mean(ds.y_test == c)) < 0.02
    assert name in str(ds) and str(ds.x_train.shape) in ds.summary()
    assert "Dataset(name=" in repr(ds)


@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_loader_is_seeded(name, sklearn_datasets):
    loader = SKLEARN[name][0]
    a, b, c = loader(seed=3), loader(seed=3), loader(seed=4)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.x_test, c.x_test)
    assert not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_loader_standardises_with_train_statistics(name, sklearn_datasets):
    from sklearn.model_selection import train_test_split

    loader, sk_kwargs, n, _, task, _ = SKLEARN[name]
    sk_loader = getattr(sklearn_datasets, f"load_{name}")
    ds = loader(seed=7, test_fraction=0.3, dtype=np.float64)
    # Train part: mean 0 and std 1 on every column that varies; constant columns are 0.
    raw_std = ds.x_train.std(axis=0)
    varies = raw_std > 0
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(ds.x_train.std(axis=0)[varies], 1.0, rtol=1e-10)
    np.testing.assert_array_equal(ds.x_train[:, ~varies], 0.0)
    if name == "digits":
        assert (~varies).any()  # digits has blank pixels: the std == 0 path is exercised
    # Reproduce the split by hand with row indices, and the transformation with the
    # TRAIN mean/std: the test part must equal it exactly (no test statistics used).
    x, y = sk_loader(return_X_y=True, **sk_kwargs)
    idx = np.arange(n)
    train_idx, test_idx = train_test_split(
        idx, test_size=0.3, random_state=7, stratify=None if task == "regression" else y
    )
    assert np.intersect1d(train_idx, test_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), idx)
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std = np.where(std == 0, 1.0, std)
    np.testing.assert_array_equal(ds.x_train, (x[train_idx] - mean) / std)
    np.testing.assert_array_equal(ds.x_test, (x[test_idx] - mean) / std)
    if task == "regression":
        np.testing.assert_array_equal(ds.y_train[:, 0], y[train_idx])
        np.testing.assert_array_equal(ds.y_test[:, 0], y[test_idx])
    else:
        np.testing.assert_array_equal(ds.y_train, y[train_idx])
        np.testing.assert_array_equal(ds.y_test, y[test_idx])
    # The test part is NOT standardised with its own statistics.
    assert not np.allclose(ds.x_test.mean(axis=0), 0.0, atol=1e-6)


def test_sklearn_loader_float32_matches_float64_rounded(sklearn_datasets):
    a = data.load_digits(seed=1, dtype=np.float32)
    b = data.load_digits(seed=1, dtype=np.float64)
    np.testing.assert_array_equal(a.x_test, b.x_test.astype(np.float32))


def test_sklearn_loader_argument_errors():
    with pytest.raises(ValueError, match="test_fraction must be a number strictly between"):
        data.load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_diabetes(test_fraction=0)
    with pytest.raises(TypeError, match="seed must be a non-negative int"):
        data.load_breast_cancer(seed=-1)
    with pytest.raises(TypeError, match="dtype must be a floating type"):
        data.load_digits(dtype=np.int32)


def test_sklearn_missing_gives_install_hint(monkeypatch):
    for mod in list(sys.modules):
        if mod == "sklearn" or mod.startswith("sklearn."):
            monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"pip install 'funcnet\[experiments\]'"):
        data.load_digits()


# --------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(7,), (3, 4), (5, 28, 28), (2, 3, 1, 2), (0, 4)]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        a = rng.normal(size=shape).astype(dtype)
        if a.size >= 3:
            a.flat[0], a.flat[1], a.flat[2] = np.finfo(dtype).max, -np.inf, np.nan
        return a
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if a.size >= 2:
        a.flat[0], a.flat[1] = info.min, info.max
    return a


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", IDX_DTYPES, ids=lambda d: np.dtype(d).name)
def test_idx_round_trip(tmp_path, dtype, shape, gz):
    a = _sample(dtype, shape)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    assert data.write_idx(path, a) == path
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    b = data.read_idx(path)
    assert b.dtype == a.dtype and b.dtype.isnative and b.shape == a.shape
    np.testing.assert_array_equal(b, a)  # NaNs compare equal here
    b[...] = 0  # writable, not a view into the file's bytes


def test_idx_layout_is_big_endian_mnist_header(tmp_path):
    labels = np.array([5, 0, 4], dtype=np.uint8)
    data.write_idx(tmp_path / "l", labels)
    assert (tmp_path / "l").read_bytes() == bytes.fromhex("00000801 00000003 050004")
    ints = np.array([[1, -2]], dtype=np.int32)
    data.write_idx(tmp_path / "i", ints)
    expected = bytes.fromhex("00000C02 00000001 00000002 00000001 FFFFFFFE")
    assert (tmp_path / "i").read_bytes() == expected
    # Non-native byte order in, same file out.
    data.write_idx(tmp_path / "j", ints.astype(">i4"))
    assert (tmp_path / "j").read_bytes() == expected


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    a = _sample(np.int16, (4, 5))
    data.write_idx(tmp_path / "plain.gz", a, compress=False)
    data.write_idx(tmp_path / "zipped.idx", a, compress=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "plain.gz"), a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "zipped.idx"), a)
    # Deterministic gzip output (mtime 0, no embedded temp-file name).
    data.write_idx(tmp_path / "again.idx", a, compress=True)
    assert (tmp_path / "again.idx").read_bytes() == (tmp_path / "zipped.idx").read_bytes()


def test_write_idx_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "x.idx"
    old = np.arange(6, dtype=np.uint8)
    data.write_idx(path, old)
    os.chmod(path, 0o600)

    def fail(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        data.write_idx(path, np.zeros(100, np.uint8))
    monkeypatch.undo()
    np.testing.assert_array_equal(data.read_idx(path), old)  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx"]
    data.write_idx(path, np.ones(3, np.uint8))
    assert (os.stat(path).st_mode & 0o777) == 0o600  # a replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx"]


def test_write_idx_errors(tmp_path):
    with pytest.raises(TypeError, match=r"dtype int64.*astype\(np.uint8\)"):
        data.write_idx(tmp_path / "a.idx", np.arange(3))
    with pytest.raises(TypeError, match="dtype bool"):
        data.write_idx(tmp_path / "a.idx", np.ones(3, bool))
    with pytest.raises(DataFileNotFoundError, match="no-such-dir"):
        data.write_idx(tmp_path / "no-such-dir" / "a.idx", np.ones(3, np.uint8))


def _header(code, dims):
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def _write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(DataFileNotFoundError, match="no such IDX file") as info:
        data.read_idx(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    assert info.value.filename == str(path)
    # A gzipped twin is pointed out.
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz exists"):
        data.read_idx(path)
    with pytest.raises(DataError, match="is a directory"):
        data.read_idx(tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_bad_header(tmp_path, gz):
    after = "after gzip decompression" if gz else ""
    cases = [
        (b"", r"header is truncated.*only 0 byte"),
        (b"\x00\x00\x08", r"header is truncated.*4-byte magic.*only 3 byte"),
        (b"\x01\x02\x08\x01" + bytes(8), r"bad magic number 01 02 08 01"),
        (b"PK\x03\x04" + bytes(30), r"bad magic number.*zip archive.*load_npz"),
        (_header(0x0A, [3]) + bytes(3), r"unknown IDX type code 0x0A.*0x08 uint8"),
        (_header(0x08, [3, 4, 5])[:10], r"header is truncated: it declares 3 dimension"
                                         r"\(s\), so it is 16 bytes long.*only 10 byte"),
    ]
    for i, (payload, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.idx", payload, gz)
        with pytest.raises(DataError, match=message) as info:
            data.read_idx(path)
        assert str(path) in str(info.value)
        assert after in str(info.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_truncated_and_oversized_data(tmp_path, gz):
    full = _header(0x08, [20, 28, 28]) + bytes(20 * 28 * 28)
    path = _write(tmp_path / "short", full[:-100], gz)
    with pytest.raises(DataError, match=r"data is truncated.*shape \(20, 28, 28\) of "
                                        r"uint8, which needs 15680 bytes.*only 15580 bytes "
                                        r"follow the 16-byte header") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)

    ints = _header(0x0C, [3]) + bytes(12)
    path = _write(tmp_path / "long", ints + b"\x00\x01", gz)
    with pytest.raises(DataError, match=r"data is oversized.*of int32, which needs 12 "
                                        r"bytes.*14 bytes \(2 extra\)") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_and_truncated_gzip(tmp_path):
    a = np.arange(3000, dtype=np.int32).reshape(30, 100)
    good = data.write_idx(tmp_path / "good.gz", a).read_bytes()
    path = _write(tmp_path / "cut.gz", good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip stream ends early: the file is truncated") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)

    path = _write(tmp_path / "garbage.gz", b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="starts like a gzip file but its compressed data is "
                                        "corrupt") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF  # compressed payload damaged: zlib or CRC error
    path = _write(tmp_path / "flipped.gz", bytes(flipped))
    with pytest.raises(DataError, match="flipped.gz: starts like a gzip file but its "
                                        "compressed data is corrupt"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_huge_declared_shape_is_refused_unallocated(tmp_path, gz):
    # 2**40 bytes declared, 10 held: refused from the header and the file's size alone.
    path = _write(tmp_path / "huge", _header(0x08, [2**20, 2**20]) + bytes(10), gz)
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: the data is truncated: the header declares shape "
                              f"(1048576, 1048576) of uint8, which needs 1099511627776 bytes")
    if gz:
        size = path.stat().st_size
        assert f"a gzip file of {size} bytes decompresses to at most {1032 * size} bytes" in message
    else:
        assert "but only 10 bytes follow the 12-byte header" in message
    assert peak[0] < 2**20


def test_read_idx_max_bytes_is_inclusive_and_checked_before_reading(tmp_path):
    a = np.arange(10_000, dtype=np.int32)  # 40000 bytes of data
    for name in ("a.idx", "a.idx.gz"):
        path = data.write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(data.read_idx(path, max_bytes=40_000), a)
        np.testing.assert_array_equal(data.read_idx(path, max_bytes=np.int64(40_000)), a)
        with pytest.raises(DataError, match=re.escape(
            f"{path}: the header declares shape (10000,) of int32, which needs 40000 bytes of "
            f"data, more than max_bytes=39999 allows; refused before reading it. If the file "
            f"is what you expect, pass max_bytes=40000 (or more)"
        )):
            data.read_idx(path, max_bytes=39_999)


def test_read_idx_gzip_refused_from_its_header_before_decompressing(tmp_path):
    # A header declaring 10**7 bytes, those bytes (zeros: about 10 KB compressed), then a
    # damaged tail: decompressing the data would run into the tail and report it.
    member = gzip.compress(_header(0x08, [10**7]) + bytes(10**7))
    path = _write(tmp_path / "bomb.gz", member + b"not gzip")
    assert path.stat().st_size < 50_000
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.read_idx(path, max_bytes=10**6)
    assert str(info.value).startswith(
        f"{path}: the header declares shape (10000000,) of uint8, which needs 10000000 "
        f"bytes of data, more than max_bytes=1000000 allows; refused before reading it."
    )
    assert peak[0] < 2**20
    with pytest.raises(DataError, match="bomb.gz: starts like a gzip file but its "
                                        "compressed data is corrupt"):
        data.read_idx(path, max_bytes=10**7)  # the tail is there to be found


def test_read_idx_gzip_bomb_stops_at_max_bytes(tmp_path):
    # A header and data for 10 bytes, then 5 members of 10 MB of zeros each (50 MB from
    # about 50 KB), then a damaged tail that only full decompression would reach.
    zeros = gzip.compress(bytes(10**7))
    payload = gzip.compress(_header(0x08, [10]) + bytes(10)) + zeros * 5 + b"not gzip"
    path = _write(tmp_path / "bomb.gz", payload)
    assert path.stat().st_size < 100_000
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.read_idx(path, max_bytes=10**6)
    assert str(info.value).startswith(
        f"{path}: the data is oversized: the header declares shape (10,) of uint8, which "
        f"needs 10 bytes of data, but more than max_bytes=1000000 bytes (decompression "
        f"stopped there) follow the 8-byte header (after gzip decompression)."
    )
    assert peak[0] < 8 * 2**20  # chunks of 1 MiB, not the 50 MB
    with pytest.raises(DataError, match="bomb.gz: starts like a gzip file but its "
                                        "compressed data is corrupt"):
        data.read_idx(path, max_bytes=10**8)  # with room, decompression reaches the tail


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "1", None], ids=repr)
def test_max_bytes_must_be_a_positive_int(tmp_path, bad):
    loaders = [data.read_idx, data.load_npz, data.load_mnist,
               functools.partial(data.read_mnist, kind="t10k")]
    for load in loaders:
        # checked before the (missing) file is looked at
        with pytest.raises(ArgumentError, match=r"^max_bytes: must be") as info:
            load(tmp_path / "missing", max_bytes=bad)
        assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_data_error_pickles():
    e = DataError("what is wrong", "/some/file")
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is DataError and str(f) == str(e) == "/some/file: what is wrong"
    g = pickle.loads(pickle.dumps(DataFileNotFoundError("gone", "/x")))
    assert isinstance(g, FileNotFoundError) and str(g) == "/x: gone"


# --------------------------------------------------------------------------------------
# MNIST-format directories
# --------------------------------------------------------------------------------------


def _fake_mnist(directory, gz=False, n_train=20, n_test=7, rows=28, cols=28, dot=False):
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    sep = "." if dot else "-"
    out = {}
    for kind, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        data.write_idx(directory / f"{kind}-images{sep}idx3-ubyte{ext}", images)
        data.write_idx(directory / f"{kind}-labels{sep}idx1-ubyte{ext}", labels)
        out[kind] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist(tmp_path, gz):
    raw = _fake_mnist(tmp_path / "mnist", gz=gz)
    ds = data.load_mnist(tmp_path / "mnist")
    assert (ds.name, ds.task, ds.n_classes) == ("mnist", "classification", 10)
    assert ds.x_train.shape == (20, 28, 28) and ds.x_test.shape == (7, 28, 28)
    assert ds.in_shape == (28, 28)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.y_train.shape == (20,) and ds.y_test.shape == (7,)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(ds.x_train, raw["train"][0].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.x_test, raw["t10k"][0].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, raw["train"][1])
    np.testing.assert_array_equal(ds.y_test, raw["t10k"][1])


def test_load_mnist_other_shapes_names_and_dtype(tmp_path):
    raw = _fake_mnist(tmp_path, n_train=3, n_test=2, rows=5, cols=4, dot=True)
    ds = data.load_mnist(tmp_path, dtype=np.float64, name="tiny")
    assert ds.name == "tiny" and ds.x_train.shape == (3, 5, 4) and ds.x_test.shape == (2, 5, 4)
    assert ds.x_train.dtype == np.float64
    np.testing.assert_array_equal(ds.x_test, raw["t10k"][0] / 255.0)
    x, y = data.read_mnist(tmp_path, "t10k")
    assert x.shape == (2, 5, 4) and y.dtype == np.int32
    with pytest.raises(ValueError, match="kind must be 'train' or 't10k'"):
        data.read_mnist(tmp_path, "test")


def test_load_mnist_mismatched_counts_names_both_files(tmp_path):
    _fake_mnist(tmp_path)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    data.write_idx(labels_path, np.zeros(6, np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds 7 images but "
                                        r".*t10k-labels-idx1-ubyte holds 6 labels") as info:
        data.load_mnist(tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)
    assert str(labels_path) in str(info.value)


def test_load_mnist_label_out_of_range(tmp_path):
    _fake_mnist(tmp_path, gz=True)
    labels = np.zeros(20, np.uint8)
    labels[13] = 10
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 10 at index 13 "
                                        r"\(and 0 more\) is outside \[0, 9\]"):
        data.load_mnist(tmp_path)
    ds = data.load_mnist(tmp_path, n_classes=11)  # e.g. a data set with more classes
    assert ds.y_train[13] == 10 and ds.n_classes == 11


def test_load_mnist_missing_and_wrong_files(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="no such directory"):
        data.load_mnist(tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match="is not a directory"):
        data.load_mnist(tmp_path / "file")
    _fake_mnist(tmp_path / "d")
    os.remove(tmp_path / "d" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"no MNIST t10k labels file: looked for "
                                                r"t10k-labels-idx1-ubyte, "
                                                r"t10k-labels-idx1-ubyte.gz.*holds: "
                                                r"t10k-images-idx3-ubyte") as info:
        data.load_mnist(tmp_path / "d")
    assert str(tmp_path / "d") in str(info.value)
    # images and labels swapped / wrong kind of content
    data.write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.zeros((7, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: MNIST labels must be "
                                        r"integers of shape \(N,\), got \(7, 2, 2\) uint8"):
        data.load_mnist(tmp_path / "d")
    data.write_idx(tmp_path / "d" / "t10k-images-idx3-ubyte", np.zeros((7, 784), np.float32))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: MNIST images must be uint8"):
        data.load_mnist(tmp_path / "d")


def test_load_mnist_truncated_file_is_named(tmp_path):
    _fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: the data is truncated"):
        data.load_mnist(tmp_path)


def test_load_mnist_max_bytes_bounds_each_file(tmp_path):
    _fake_mnist(tmp_path, gz=True)  # the largest file: 20 train images, 15680 bytes
    ds = data.load_mnist(tmp_path, max_bytes=20 * 28 * 28)
    assert ds.x_train.shape == (20, 28, 28) and ds.x_test.shape == (7, 28, 28)
    with pytest.raises(DataError, match=re.escape(
        f"{tmp_path / 'train-images-idx3-ubyte.gz'}: the header declares shape (20, 28, 28) "
        f"of uint8, which needs 15680 bytes of data, more than max_bytes=15679 allows"
    )):
        data.load_mnist(tmp_path, max_bytes=15679)
    x, _ = data.read_mnist(tmp_path, "t10k", max_bytes=7 * 28 * 28)
    assert x.shape == (7, 28, 28)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: .* which needs 5488 "
                                        r"bytes of data, more than max_bytes=5487 allows"):
        data.read_mnist(tmp_path, "t10k", max_bytes=5487)


# --------------------------------------------------------------------------------------
# .npz archives
# --------------------------------------------------------------------------------------


def test_load_npz_splits_x_y(tmp_path):
    x = np.arange(50 * 3, dtype=np.float64).reshape(50, 3)
    y = (np.arange(50) % 4).astype(np.int64)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    ds = data.load_npz(tmp_path / "set.npz", seed=5)
    assert (ds.name, ds.task, ds.n_classes) == ("set", "classification", 4)
    assert ds.x_train.shape == (40, 3) and ds.x_test.shape == (10, 3)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int32
    # a partition of the rows, labels kept with their rows
    rows = np.concatenate([ds.x_train[:, 0], ds.x_test[:, 0]]) // 3
    np.testing.assert_array_equal(np.sort(rows), np.arange(50))
    np.testing.assert_array_equal(ds.y_train, (ds.x_train[:, 0] // 3) % 4)
    np.testing.assert_array_equal(ds.y_test, (ds.x_test[:, 0] // 3) % 4)
    again = data.load_npz(tmp_path / "set.npz", seed=5)
    other = data.load_npz(tmp_path / "set.npz", seed=6)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    assert not np.array_equal(ds.x_test, other.x_test)


def test_load_npz_pre_split_regression_dtype_and_standardisation(tmp_path):
    rng = np.random.default_rng(0)
    parts = dict(
        x_train=rng.normal(size=(30, 2, 2)), y_train=rng.normal(size=30),
        x_test=rng.normal(size=(8, 2, 2)), y_test=rng.normal(size=8),
    )
    np.savez_compressed(tmp_path / "reg.npz", **parts)
    ds = data.load_npz(tmp_path / "reg.npz", dtype=np.float32, standardize_x=True, name="r")
    assert (ds.name, ds.task, ds.n_classes) == ("r", "regression", None)
    assert ds.y_train.shape == (30, 1) and ds.y_test.shape == (8, 1)
    assert ds.x_train.dtype == ds.y_train.dtype == np.float32
    xs_train, xs_test, _ = data.standardize(parts["x_train"], parts["x_test"], dtype=np.float32)
    np.testing.assert_array_equal(ds.x_train, xs_train)
    np.testing.assert_array_equal(ds.x_test, xs_test)
    np.testing.assert_array_equal(ds.y_test[:, 0], parts["y_test"].astype(np.float32))


def test_load_npz_binary_task(tmp_path):
    np.savez(tmp_path / "b.npz", x=np.ones((10, 2)), y=np.array([0.0, 1.0] * 5))
    ds = data.load_npz(tmp_path / "b.npz", task="binary")
    assert ds.task == "binary" and ds.n_classes == 2 and ds.y_train.dtype == np.int32
    np.savez(tmp_path / "b3.npz", x=np.ones((10, 2)), y=np.arange(10) % 3)
    with pytest.raises(DataError, match=r"b3.npz: holds label 2, outside \[0, 1\]"):
        data.load_npz(tmp_path / "b3.npz", task="binary")
    np.savez(tmp_path / "f.npz", x=np.ones((10, 2)), y=np.linspace(0, 1, 10))
    with pytest.raises(DataError, match="non-integer values.*task='regression'"):
        data.load_npz(tmp_path / "f.npz", task="classification")
    np.savez(tmp_path / "neg.npz", x=np.ones((10, 2)), y=np.arange(10) - 1)
    with pytest.raises(DataError, match=r"neg.npz: y holds label -1"):
        data.load_npz(tmp_path / "neg.npz")


def test_load_npz_missing_keys_lists_keys_present(tmp_path):
    path = tmp_path / "k.npz"
    np.savez(path, inputs=np.ones((4, 2)), targets=np.ones(4))
    with pytest.raises(DataError, match=r"k.npz: has no array named 'x' or 'y'. Keys "
                                        r"present: \['inputs', 'targets'\]"):
        data.load_npz(path)
    ds = data.load_npz(path, x_key="inputs", y_key="targets", test_fraction=0.5)
    assert ds.x_train.shape == (2, 2) and ds.task == "regression"
    np.savez(path, x_train=np.ones((4, 2)), y_train=np.ones(4), x_test=np.ones((2, 2)))
    with pytest.raises(DataError, match=r"has x_train, y_train, x_test but not y_test.*Keys "
                                        r"present"):
        data.load_npz(path)


def test_load_npz_inconsistent_lengths(tmp_path):
    path = tmp_path / "len.npz"
    np.savez(path, x=np.ones((10, 3)), y=np.ones(9, dtype=np.int32))
    with pytest.raises(DataError, match=r"len.npz: inconsistent lengths: x holds 10 examples "
                                        r"\(shape \(10, 3\)\) but y holds 9"):
        data.load_npz(path)
    np.savez(path, x_train=np.ones((4, 2)), y_train=np.ones(4),
             x_test=np.ones((3, 2)), y_test=np.ones(2))
    with pytest.raises(DataError, match=r"x_test holds 3 examples .* y_test holds 2"):
        data.load_npz(path)
    np.savez(path, x_train=np.ones((4, 2)), y_train=np.ones(4),
             x_test=np.ones((2, 5)), y_test=np.ones(2))
    with pytest.raises(DataError, match=r"train and test parts disagree"):
        data.load_npz(path)


def test_load_npz_bad_files(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"nothing.npz: no such .npz file"):
        data.load_npz(tmp_path / "nothing.npz")

    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match=r"random.npz: cannot be read as an .npz archive"):
        data.load_npz(path)

    good = tmp_path / "good.npz"
    np.savez(good, x=np.arange(400.0).reshape(100, 4), y=np.arange(100) % 2)
    raw = good.read_bytes()
    for i, cut in enumerate([len(raw) // 2, len(raw) - 10, 30]):
        path = tmp_path / f"cut{i}.npz"
        path.write_bytes(raw[:cut])
        with pytest.raises(DataError, match=rf"cut{i}.npz: .*(truncated|corrupt)"):
            data.load_npz(path)

    # Damage inside an array's stored bytes, directory intact: found when read.
    damaged = bytearray(raw)
    start = raw.index(b"\x93NUMPY")
    damaged[start + 200] ^= 0xFF
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged.npz: array 'x' cannot be read.*corrupt"):
        data.load_npz(path)

    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(DataError, match=r"single.npy: is a .npy file holding a single array"):
        data.load_npz(tmp_path / "single.npy")

    np.savez(tmp_path / "obj.npz", x=np.array([{}, {}], dtype=object), y=np.ones(2))
    with pytest.raises(DataError, match=r"obj.npz: array 'x' is an object array.*"
                                        r"allow_pickle=False"):
        data.load_npz(tmp_path / "obj.npz")


def test_load_npz_argument_errors(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.ones((1, 2)), y=np.ones(1))
    with pytest.raises(DataError, match="a train/test split needs at least 2"):
        data.load_npz(path)
    with pytest.raises(ValueError, match="task must be one of"):
        data.load_npz(path, task="ranking")
    with pytest.raises(ValueError, match="test_fraction"):
        np.savez(path, x=np.ones((5, 2)), y=np.ones(5))
        data.load_npz(path, test_fraction=1.5)


def _npy(shape, descr, body, fortran_order=False):
    """A .npy file's bytes: a version 1.0 header declaring shape and descr, then body."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran_order, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + body


def _zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


def _patch_first_entry(path, offset, fmt, value):
    """Overwrites a field of the first entry's record in the zip's central directory
    (8: flags, 10: compression method, 16: CRC-32, 24: uncompressed size)."""
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, raw.index(b"PK\x01\x02") + offset, value)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflated"])
def test_load_npz_huge_declared_shape_is_refused_unallocated(tmp_path, compression):
    header = _npy((2**40,), "<f8", b"")
    y = _npy((2,), "<f8", bytes(16))
    path = _zip(tmp_path / "huge.npz", {"x.npy": header + bytes(16), "y.npy": y}, compression)
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.load_npz(path)
    assert str(info.value) == (
        f"{path}: array 'x' has shape (1099511627776,) of float64, which needs "
        f"8796093022208 bytes, but its zip entry 'x.npy' holds 16 bytes after the "
        f"{len(header)}-byte .npy header. The file is corrupt; re-create it with np.savez."
    )
    assert peak[0] < 2**20


def test_load_npz_max_bytes_is_checked_before_decompressing(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros(10**7, np.uint8), y=np.zeros(10**7, np.uint8))
    assert path.stat().st_size < 100_000
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.load_npz(path, max_bytes=10**6)
    assert str(info.value).startswith(
        f"{path}: array 'x' has shape (10000000,) of uint8, which needs 10000000 bytes, "
        f"more than max_bytes=1000000 allows; refused before reading it. If the file is "
        f"what you expect, pass max_bytes=10000000 (or more)"
    )
    assert peak[0] < 2**20  # the array would take 10 MB

    small = tmp_path / "small.npz"
    np.savez_compressed(small, x=np.ones((100, 10)), y=np.arange(100) % 2)
    assert data.load_npz(small, max_bytes=8000).x_train.shape == (80, 10)  # inclusive
    with pytest.raises(DataError, match=r"small.npz: array 'x' has shape \(100, 10\) of "
                                        r"float64, which needs 8000 bytes, more than "
                                        r"max_bytes=7999 allows"):
        data.load_npz(small, max_bytes=7999)


def test_load_npz_lying_zip_directory_allocates_only_what_is_there(tmp_path):
    # The directory says x.npy is 4 GiB - 1 KiB after its header, the header agrees, and
    # the default max_bytes (4 GiB) lets that through; the entry holds 16 bytes.
    n = 2**32 - 2**10
    header = _npy((n,), "|u1", b"")
    y = _npy((2,), "<f8", bytes(16))
    path = _zip(tmp_path / "lie.npz", {"x.npy": header + bytes(16), "y.npy": y})
    _patch_first_entry(path, 24, "<I", len(header) + n)
    with _peak_memory() as peak, pytest.raises(DataError) as info:
        data.load_npz(path)
    assert str(info.value).startswith(
        f"{path}: array 'x' has shape ({n},) of uint8, which needs {n} bytes, but its zip "
        f"entry 'x.npy' ends after 16 of them. The file is truncated or corrupt"
    )
    assert peak[0] < 2**20


def test_load_npz_zip_failures_name_the_file(tmp_path):
    arrays = dict(x=np.arange(100.0), y=np.arange(100) % 2)
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    raw = good.read_bytes()

    def damaged(name, offset, fmt, value):
        path = tmp_path / name
        path.write_bytes(raw)
        return _patch_first_entry(path, offset, fmt, value)

    crc = zipfile.ZipFile(good).getinfo("x.npy").CRC
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    bad_deflate = bytearray(compressed.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", bad_deflate, 26)  # x.npy's local header
    bad_deflate[30 + name_len + extra_len] = 0x07  # a deflate block of the reserved type 3
    (tmp_path / "deflate.npz").write_bytes(bytes(bad_deflate))
    (tmp_path / "cut.npz").write_bytes(raw[:-30])  # the end of the central directory lost
    _zip(tmp_path / "header.npz", {"x.npy": b"\x93NUMPY\x01\x00\xff\xff{'descr'", "y.npy": b""})
    _zip(tmp_path / "negative.npz", {"x.npy": _npy((-5,), "<f8", b""), "y.npy": b""})
    _zip(tmp_path / "raw.npz", {"x": b"not an array", "y.npy": _npy((0,), "<f8", b"")})
    cases = [
        (damaged("crc.npz", 16, "<I", crc ^ 1),
         r"array 'x' cannot be read \(zipfile.BadZipFile: Bad CRC-32 for file 'x.npy'\)"),
        (tmp_path / "deflate.npz",
         r"array 'x' cannot be read \(zlib.error: Error -3 while decompressing data: "
         r"invalid block type\)"),
        (tmp_path / "cut.npz",
         r"cannot be read as an .npz archive \(zipfile.BadZipFile: File is not a zip file\)"),
        (damaged("encrypted.npz", 8, "<H", 1),
         r"array 'x' cannot be read \(RuntimeError: .*is encrypted, password required"),
        (damaged("method.npz", 10, "<H", 99),
         r"array 'x' cannot be read \(NotImplementedError: That compression method is "
         r"not supported\)"),
        (tmp_path / "header.npz", r"array 'x' cannot be read \(ValueError: EOF"),
        (tmp_path / "negative.npz",
         r"array 'x' cannot be read \(ValueError: the .npy header declares a negative "
         r"dimension, shape \(-5,\)\)"),
        (tmp_path / "raw.npz", r"entry 'x' is not a .npy array"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as info:
            data.load_npz(path)
        assert str(info.value).startswith(f"{path}: ")


def test_damaged_files_raise_data_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "good.npz"
    np.savez_compressed(npz, x=np.arange(60.0).reshape(20, 3), y=np.arange(20) % 3)
    idx = data.write_idx(tmp_path / "good.idx.gz", np.arange(60, dtype=np.int16).reshape(20, 3))
    for good, load in ((npz, data.load_npz), (idx, data.read_idx)):
        raw = good.read_bytes()
        for i in range(200):
            bad = bytearray(raw)
            for at in rng.integers(len(raw), size=1 + i % 4):
                bad[at] ^= int(rng.integers(1, 256))
            if i % 5 == 0:
                bad = bad[: rng.integers(len(raw))]
            path = tmp_path / f"bad{i}{good.suffix}"
            path.write_bytes(bytes(bad))
            try:
                load(path)  # a flip in padding or an unread field may do no harm
            except DataError as e:  # anything else fails the test
                assert str(e).startswith(f"{path}: ")
