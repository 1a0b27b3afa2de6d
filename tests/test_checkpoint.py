"""funcnet.checkpoint: exact round trips, clear errors for damaged, forged or mismatched
files, and atomic saves (an interrupted or failed save, even a SIGKILLed process or a full
disk, leaves the old file intact; leftovers of killed saves are removed by the next one)."""

import errno
import functools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet
from funcnet import atomic, checkpoint
from funcnet.checkpoint import CheckpointError

ADAM = optax.adam(1e-2)


def make_net(widths):
    layers = [fnet.dense(widths[0])]
    for width in widths[1:]:
        layers += [fnet.tanh, fnet.dense(width)]
    return fnet.chain(*layers)


@functools.partial(jax.jit, static_argnums=1)
def _init(key, widths):
    """Fresh params, adam state, data and PRNG keys of every kind."""
    k_init, k_x, k_y, k_keys = jax.random.split(key, 4)
    params, _ = make_net(widths).init(k_init, (4,))
    x = jax.random.normal(k_x, (16, 4))
    y = jax.random.normal(k_y, (16, widths[-1]))
    keys = {"key": jax.random.fold_in(key, 7), "keys": jax.random.split(k_keys, 4),
            "rbg_key": jax.random.key(5, impl="rbg"), "legacy_key": jax.random.PRNGKey(3)}
    return params, ADAM.init(params), keys, x, y


@functools.partial(jax.jit, static_argnums=0)
def train_step(widths, params, opt_state, x, y):
    """One adam step on the squared error, with funcnet's hand-written gradient."""
    with jax.numpy_dtype_promotion("standard"):  # optax promotes float against int32
        grads = fnet.grad(make_net(widths), fnet.losses.squared_error)(params, x, y)
        updates, opt_state = ADAM.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def make_state(key, widths=(8, 3)):
    """A training state after one step (so the adam moments are nonzero), with extra
    leaves of every kind a checkpoint stores; and (x, y) to continue training it."""
    with jax.numpy_dtype_promotion("strict"):  # as in the tests: one compilation for all
        params, opt_state, keys, x, y = _init(key, widths)
        params, opt_state = train_step(widths, params, opt_state, x, y)
    rng = np.random.default_rng(0)
    extras = {
        "f32": jnp.asarray(rng.standard_normal((2, 5)).astype(np.float32)),
        "bf16": jnp.asarray(rng.standard_normal(7).astype(jnp.bfloat16)),
        "f16": jnp.asarray(np.linspace(-3, 3, 5).astype(np.float16)),
        "special": jnp.asarray(np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32)),
        "i32": jnp.asarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "u8": jnp.asarray(np.array([0, 255], np.uint8)),
        "bool": jnp.asarray(np.array([True, False])),
        "c64": jnp.asarray(np.array([1 + 2j], np.complex64)),
        "i64_scalar": jnp.asarray(np.int64(-(2**40))),
        "np_f32_scalar": np.float32(2.5),
        "keys": keys["keys"], "rbg_key": keys["rbg_key"], "legacy_key": keys["legacy_key"],
        "lr": 1e-3, "epoch": 3, "done": False, "phase": 1 - 2j,
        "empty": jnp.asarray(np.zeros((0, 3), np.float32)),
    }
    state = {"params": params, "opt_state": opt_state, "key": keys["key"], "extras": extras}
    return state, (x, y)


def abstract_state(widths=(8, 3)):
    """The template jax.eval_shape gives for make_state (nothing is computed)."""
    return jax.eval_shape(lambda: make_state(jax.random.key(0), widths)[0])


def assert_identical(restored, original):
    """Same tree structure, and every leaf equal bit for bit with the same dtype; arrays
    restored as jax arrays, keys as typed keys, Python numbers as the same Python type."""
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(original)
    flat_r = jax.tree_util.tree_flatten_with_path(restored)[0]
    flat_o = jax.tree_util.tree_leaves(original)
    for (path, r), o in zip(flat_r, flat_o):
        where = jax.tree_util.keystr(path)
        if isinstance(o, (bool, int, float, complex)) and not isinstance(o, np.generic):
            assert type(r) is type(o) and r == o, where
            continue
        assert isinstance(r, jax.Array), where
        assert r.dtype == o.dtype and r.shape == o.shape, where
        if jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(r) == jax.random.key_impl(o), where
            r, o = jax.random.key_data(r), jax.random.key_data(o)
        assert np.asarray(r).tobytes() == np.asarray(o).tobytes(), where


@pytest.fixture(scope="module")
def state():
    return make_state(jax.random.key(0))[0]


@pytest.fixture
def saved(tmp_path, state):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, state, step=12, metadata={"run": "a", "lr": 1e-3})
    return path


# ------------------------------------------------------------------------- round trip


def test_round_trip_is_exact_and_resumable(tmp_path):
    state, (x, y) = make_state(jax.random.key(0))
    path = tmp_path / "ckpt.npz"
    assert checkpoint.save(path, state, step=12, metadata={"run": "a", "sizes": (8, 3)}) == path
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind

    like, _ = make_state(jax.random.key(1))  # a fresh state of the same network
    restored, step, metadata = checkpoint.load(path, like)
    assert_identical(restored, state)
    assert step == 12 and type(step) is int
    assert metadata == {"run": "a", "sizes": [8, 3]}  # through JSON: tuples as lists
    assert type(restored["opt_state"][0]) is optax.ScaleByAdamState
    assert int(restored["opt_state"][0].count) == 1

    # Restored keys draw the same numbers.
    draw = jax.jit(lambda k: jax.random.bits(k, (3,)))
    assert jnp.array_equal(draw(restored["key"]), draw(state["key"]))

    # Resuming: the next optimizer step from the restored state equals the step from the
    # original state, bit for bit.
    after_restored = train_step((8, 3), restored["params"], restored["opt_state"], x, y)
    after_original = train_step((8, 3), state["params"], state["opt_state"], x, y)
    assert_identical(after_restored, after_original)


def test_abstract_template_and_defaults(tmp_path, state):
    path = checkpoint.save(tmp_path / "ckpt", state)  # any file name; no step, no metadata
    like = jax.eval_shape(lambda: state)
    restored, step, metadata = checkpoint.load(str(path), like)
    assert_identical(restored, state)
    assert step is None and metadata == {}


def test_step_accepts_integer_scalars(tmp_path):
    tree = {"w": jnp.ones(2)}
    checkpoint.save(tmp_path / "c.npz", tree, step=np.int64(5))
    assert checkpoint.load(tmp_path / "c.npz", tree).step == 5
    checkpoint.save(tmp_path / "c.npz", tree, step=jnp.array(6))
    assert checkpoint.load(tmp_path / "c.npz", tree).step == 6


def test_info_shows_the_header(saved):
    header = checkpoint.info(saved)
    assert header["format"] == "funcnet-checkpoint" and header["format_version"] == 1
    assert header["step"] == 12 and header["metadata"] == {"run": "a", "lr": 1e-3}
    records = {leaf["path"]: leaf for leaf in header["leaves"]}
    assert records["['extras']['bf16']"] == {
        "path": "['extras']['bf16']", "kind": "array", "dtype": "bfloat16", "shape": [7],
        "stored_dtype": "uint16", "stored_shape": [7]}
    assert records["['key']"]["kind"] == "key" and records["['key']"]["impl"] == "threefry2x32"
    assert records["['extras']['epoch']"]["type"] == "int"
    # The file is a plain npz, readable without pickle.
    with np.load(saved, allow_pickle=False) as archive:
        assert set(archive.files) == {"header"} | {f"leaf_{i}" for i in range(len(records))}


def test_save_replaces_and_keeps_permissions(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": jnp.ones(2)}, step=1)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    checkpoint.save(path, {"w": jnp.zeros(2)}, step=2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    restored = checkpoint.load(path, {"w": jnp.ones(2)})
    assert restored.step == 2 and jnp.array_equal(restored.tree["w"], jnp.zeros(2))
    assert os.listdir(tmp_path) == ["c.npz"]


# ---------------------------------------------------------------------- save errors


def test_save_rejects_unsupported_values(tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(CheckpointError, match=r"leaf \['name'\] is a str"):
        checkpoint.save(path, {"w": jnp.ones(2), "name": "run-1"})
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        checkpoint.save(path, {"w": jnp.ones(2)}, metadata={"w": jnp.ones(2)})
    with pytest.raises(CheckpointError, match="step must be a non-negative integer"):
        checkpoint.save(path, {"w": jnp.ones(2)}, step=1.5)
    with pytest.raises(CheckpointError, match="step must be a non-negative integer"):
        checkpoint.save(path, {"w": jnp.ones(2)}, step=-1)
    if np.dtype(np.longdouble).itemsize > 8:  # numpy's float128 (or 96), which jax lacks
        with pytest.raises(CheckpointError, match=r"leaf \['x'\] has dtype float(96|128)"):
            checkpoint.save(path, {"x": np.ones(2, np.longdouble)})
    with pytest.raises(CheckpointError, match="does not exist; create it"):
        checkpoint.save(tmp_path / "missing" / "c.npz", {"w": jnp.ones(2)})
    with pytest.raises(CheckpointError, match="inside jax.jit"):
        jax.jit(lambda w: checkpoint.save(path, {"w": w}) and w)(jnp.ones(2))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- template mismatch


def test_other_network_names_the_first_differing_leaf(saved):
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(saved, abstract_state(widths=(8, 4)))
    message = str(info.value)
    assert str(saved) in message
    assert re.search(r"at leaf \d+, \['opt_state'\]\[0\]\.mu\[2\]\['b'\]: ", message)
    assert "expected float64 array of shape (4,), found float64 array of shape (3,)" in message
    assert "another network or optimizer" in message


def test_other_structure_or_optimizer(saved, state):
    deeper = abstract_state(widths=(8, 8, 3))
    with pytest.raises(CheckpointError, match=r"\['opt_state'\]\[0\]\.mu\[2\]\['b'\]: expected "
                                              r"float64 array of shape \(8,\), found float64 "
                                              r"array of shape \(3,\)"):
        checkpoint.load(saved, deeper)
    # An optimizer without state (sgd) in place of adam.
    sgd_like = dict(state, opt_state=optax.sgd(0.1).init(state["params"]))
    with pytest.raises(CheckpointError, match=r"leaf \d+ of the template is \['params'\]\[0\]"
                                              r"\['b'\], of the checkpoint "
                                              r"\['opt_state'\]\[0\]\.count"):
        checkpoint.load(saved, sgd_like)
    # A missing leaf at the end, and an extra one.
    fewer = dict(state, extras={k: v for k, v in state["extras"].items() if k != "u8"})
    with pytest.raises(CheckpointError, match=r"the checkpoint \['extras'\]\['u8'\]"):
        checkpoint.load(saved, fewer)
    more = dict(state, zz=jnp.ones(1))
    with pytest.raises(CheckpointError, match=r"the template has \d+ leaves, the checkpoint "
                                              r"\d+; the first extra one is the template's "
                                              r"\['zz'\]"):
        checkpoint.load(saved, more)


def test_other_dtypes_kinds_and_containers(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": jnp.ones((2, 3)), "k": jax.random.key(0), "n": 1})
    with pytest.raises(CheckpointError, match=r"\['w'\]: expected float32 array of shape "
                                              r"\(2, 3\), found float64 array"):
        checkpoint.load(path, {"w": jnp.ones((2, 3), jnp.float32), "k": jax.random.key(0),
                               "n": 1})
    with pytest.raises(CheckpointError, match=r"\['k'\]: expected uint32 array of shape "
                                              r"\(2,\), found key<fry> PRNG key array"):
        checkpoint.load(path, {"w": jnp.ones((2, 3)), "k": jax.random.PRNGKey(0), "n": 1})
    with pytest.raises(CheckpointError, match=r"\['n'\]: expected int64 array of shape \(\), "
                                              r"found Python int"):
        checkpoint.load(path, {"w": jnp.ones((2, 3)), "k": jax.random.key(0),
                               "n": jnp.array(1)})
    # Same leaves, other containers: only the structure string differs.
    checkpoint.save(path, {"p": [jnp.ones(2)]})
    with pytest.raises(CheckpointError, match="tree structures differ"):
        checkpoint.load(path, {"p": (jnp.ones(2),)})
    with pytest.raises(CheckpointError, match="needs a template"):
        checkpoint.load(path, None)


# ------------------------------------------------------------ damaged or foreign files


def rewrite(path, header_change=None, leaf_change=None):
    """Rewrite the archive by hand, changing its header or leaf_0 (a hand-made file)."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    header = json.loads(entries["header"].tobytes())
    if header_change:
        header_change(header)
    if leaf_change:
        entries["leaf_0"] = leaf_change(entries["leaf_0"])
    entries["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)


def expect_error(path, like, *fragments):
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, like)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file(tmp_path, state):
    expect_error(tmp_path / "nope.npz", state, "no such file", "directory")
    expect_error(tmp_path / "sub" / "nope.npz", state, "does not exist either")
    (tmp_path / ".nope.npz.x1y2.tmp").write_bytes(b"PK\x03\x04")  # a killed first save
    expect_error(tmp_path / "nope.npz", state, "no such file",
                 "temporary files of interrupted saves", ".nope.npz.x1y2.tmp")


def test_flipped_bytes_in_the_middle(tmp_path):
    tree = {"w": jnp.asarray(np.linspace(0, 1, 10_000, dtype=np.float32)), "n": 1}
    path = checkpoint.save(tmp_path / "c.npz", tree)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside w's data
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    expect_error(path, tree, "is corrupt")


def test_every_single_byte_flip_is_caught_or_harmless(tmp_path):
    """Flip one byte at a time across a whole (small) file: load either raises
    CheckpointError or returns exactly the saved tree (zip fields such as timestamps are
    not load-bearing), never anything else."""
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16),
            "k": jax.random.key(1), "n": 4}
    path = tmp_path / "c.npz"
    checkpoint.save(path, tree, step=3, metadata={"a": 1})
    good = path.read_bytes()
    caught = 0
    positions = range(0, len(good), max(1, len(good) // 400))
    for position in positions:
        data = bytearray(good)
        data[position] ^= 0x5A
        path.write_bytes(bytes(data))
        try:
            restored = checkpoint.load(path, tree)
        except CheckpointError as e:
            assert str(path) in str(e)
            caught += 1
        else:
            assert_identical(restored.tree, tree)
            assert restored.step == 3 and restored.metadata == {"a": 1}
    assert caught > 0.8 * len(positions)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 0.001])
def test_truncated_file(saved, state, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: max(4, int(len(data) * keep))])
    expect_error(saved, state, "corrupt or truncated")


def test_empty_file(saved, state):
    saved.write_bytes(b"")
    expect_error(saved, state, "is empty")


def test_random_bytes(saved, state):
    saved.write_bytes(np.random.default_rng(0).bytes(5000))
    expect_error(saved, state, "not a funcnet checkpoint", "not an .npz (zip) archive")


def test_other_npz_file(tmp_path, state):
    path = tmp_path / "weights.npz"
    np.savez(path, w=np.ones(3))
    expect_error(path, state, "not a funcnet checkpoint", "without a 'header' entry", "w")


def test_other_format_name(saved, state):
    rewrite(saved, header_change=lambda h: h.update(format="someone-elses-format"))
    expect_error(saved, state, "not a funcnet checkpoint", "'someone-elses-format'")


def test_newer_format_version(saved, state):
    rewrite(saved, header_change=lambda h: h.update(format_version=2))
    expect_error(saved, state, "format version 2, newer than this funcnet reads (up to 1)",
                 "Upgrade funcnet")


def test_checksum_covers_leaves_and_header(saved, state):
    good = saved.read_bytes()
    # A consistent archive whose leaf bytes were changed: only the checksum can tell.
    rewrite(saved, leaf_change=lambda leaf: leaf ^ leaf.dtype.type(1))
    expect_error(saved, state, "corrupt", "checksum mismatch")
    saved.write_bytes(good)
    rewrite(saved, header_change=lambda h: h.update(step=13))
    expect_error(saved, state, "corrupt", "checksum mismatch")
    saved.write_bytes(good)
    rewrite(saved, header_change=lambda h: h.pop("structure"))
    expect_error(saved, state, "corrupt", "'structure' is missing or malformed")


# ------------------------------------------------- forged files (with a valid checksum)


FORGED = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),  # leaf 0
          "b": np.ones(4, jnp.bfloat16),                      # leaf 1
          "f": 1.5,                                           # leaf 2
          "k": jax.random.key(1),                             # leaf 3
          "n": 3}                                             # leaf 4


def forge(path, change):
    """Rewrite a checkpoint as a forger would: ``change(header, entries)`` edits the
    header and the leaf arrays, then the checksum is recomputed with the module's own
    function, so that only the consistency checks of load can reject the file."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    header = json.loads(entries.pop("header").tobytes())
    change(header, entries)
    stored = [entries[f"leaf_{i}"] for i in range(len(header["leaves"]))]
    header["checksum"] = checkpoint._checksum(header, stored)
    entries["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)


def leaf(i, convert=None, **fields):
    """A forgery of leaf i: its record's ``fields`` set and, with ``convert``, its stored
    array replaced by ``convert(array)`` and recorded as stored_dtype and stored_shape
    (so that the archive agrees with the header)."""
    def change(header, entries):
        record = header["leaves"][i]
        record.update(fields)
        if convert is not None:
            array = entries[f"leaf_{i}"] = np.asarray(convert(entries[f"leaf_{i}"]))
            record.update(stored_dtype=array.dtype.name, stored_shape=list(array.shape))
    return change


def header_field(**fields):
    return lambda header, entries: header.update(fields)


def duplicate_path(header, entries):
    header["leaves"][1]["path"] = header["leaves"][0]["path"]


def extra_entry(header, entries):
    entries["leaf_5"] = np.ones(2)


FORGERIES = {
    # Array dtypes that are no dtype of jax arrays.
    "dtype-unknown": (leaf(0, dtype="float99"), "the dtype 'float99', which is not a dtype"),
    "dtype-object": (leaf(0, dtype="object"), "the dtype 'object', which is not a dtype"),
    "dtype-structured": (leaf(0, dtype="[('x', '<f4')]"), "which is not a dtype of jax"),
    "dtype-float128": (leaf(0, lambda a: a.astype(np.longdouble), dtype="float128"),
                       "the dtype 'float128', which is not a dtype of jax arrays"),
    # Stored dtype or shape that do not follow from dtype and shape.
    "stored-narrower": (leaf(0, lambda a: a.view(np.uint16)),
                        "stores a float32 array of shape (2, 3) as uint16 of shape (2, 6), "
                        "where save stores it as float32 of shape (2, 3)"),
    "stored-odd-bytes": (leaf(0, lambda a: a.view(np.uint8)[:, :5]),
                         "as uint8 of shape (2, 5), where save stores it as float32"),
    "stored-other-kind": (leaf(0, lambda a: a.view(np.int32)), "as int32 of shape (2, 3)"),
    "stored-reshaped": (leaf(0, lambda a: a.reshape(3, 2)), "as float32 of shape (3, 2)"),
    "shape-not-stored-shape": (leaf(0, shape=[3, 2]),
                               "stores a float32 array of shape (3, 2) as float32 of shape "
                               "(2, 3)"),
    "bfloat16-wider": (leaf(1, lambda a: a.view(np.uint32)),
                       "bfloat16 array of shape (4,) as uint32 of shape (2,)"),
    "bfloat16-as-float16": (leaf(1, lambda a: a.view(np.float16)),
                            "as float16 of shape (4,), where save stores it as uint16"),
    "huge-shape": (leaf(0, shape=[2**62, 2**62], stored_shape=[2**62, 2**62]),
                   "larger than any array can be"),
    # PRNG keys.
    "key-unknown-impl": (leaf(3, impl="nope"), "'nope', which jax does not know"),
    "key-other-impl": (leaf(3, impl="rbg"), "the dtype 'key<fry>', not 'key<rbg>'"),
    "key-data-for-other-impl": (leaf(3, impl="rbg", dtype="key<rbg>"),
                                "as uint32 of shape (2,), where save stores it as uint32 "
                                "of shape (4,)"),
    "key-data-trailing-shape": (leaf(3, lambda a: np.concatenate([a, a])),
                                "key<fry> PRNG key array of shape () as uint32 of shape (4,)"),
    "key-data-0d": (leaf(3, lambda a: a[0]), "as uint32 of shape ()"),
    "key-data-dtype": (leaf(3, lambda a: a.astype(np.float32)), "as float32 of shape (2,)"),
    # Python numbers.
    "python-not-0d": (leaf(4, lambda a: np.array([1, 2])), "stores a Python int as int64 "
                                                           "of shape (2,)"),
    "python-float-for-int": (leaf(4, lambda a: np.array(1.5)), "Python int as float64"),
    "python-bool-for-int": (leaf(4, lambda a: np.array(True)), "Python int as bool"),
    "python-string": (leaf(2, lambda a: np.array("ab")), "stores a Python float as str"),
    "python-dtype": (leaf(4, dtype="float"), "gives a Python int the dtype 'float'"),
    "python-shape": (leaf(4, shape=[1]), "gives a Python int the dtype 'int' and shape (1,)"),
    # Header fields and the archive.
    "negative-step": (header_field(step=-5), "field 'step' is missing or malformed (-5)"),
    "bool-step": (header_field(step=True), "field 'step' is missing or malformed (True)"),
    "metadata-list": (header_field(metadata=[1]), "field 'metadata' is missing or malformed"),
    "structure-int": (header_field(structure=3), "field 'structure' is missing or malformed"),
    "duplicate-paths": (duplicate_path, "leaves name the key path ['a'] twice"),
    "unknown-kind": (leaf(0, kind="weird"), "record of leaf 0 is malformed"),
    "extra-entry": (extra_entry, "entries that its header does not list (leaf_5)"),
}


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_forged_file_with_valid_checksum(tmp_path, forgery):
    """An inconsistent file whose checksum is right (recomputed by the forger) is
    refused as corrupt by the validation of load, never with numpy's or jax's own error
    and never with a changed shape or value; the template is the tree that was saved."""
    change, fragment = forgery
    path = checkpoint.save(tmp_path / "c.npz", FORGED, step=1)
    forge(path, change)
    for like in (FORGED, jax.eval_shape(lambda: FORGED)):
        expect_error(path, like, "is corrupt: ", fragment)
    if change is not extra_entry:  # info reads the header only, but checks all of it
        with pytest.raises(CheckpointError, match=re.escape(fragment)):
            checkpoint.info(path)


def test_forge_helper_keeps_a_consistent_file_loadable(tmp_path):
    """The forgery helper itself breaks nothing: a rewrite that changes a field to
    another valid value (so with the checksum recomputed) loads."""
    path = checkpoint.save(tmp_path / "c.npz", FORGED, step=1)
    forge(path, header_field(step=7, metadata={"forged": True}))
    restored = checkpoint.load(path, FORGED)
    assert restored.step == 7 and restored.metadata == {"forged": True}
    assert_identical(restored.tree, FORGED)


# ---------------------------------------------------------------------- crash safety


def _fail_mid_write(exception):
    original = checkpoint._write_archive

    def write(file, entries):
        original(file, entries)
        file.truncate(file.tell() // 2)  # half a file on disk, then the failure
        raise exception

    return write


def _os_error(code):
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize("where, error, fix", [
    ("write", _os_error(errno.ENOSPC), "Free space on that disk"),
    ("write", _os_error(errno.EFBIG), "raise the limit or save to another file system"),
    ("write", _os_error(errno.EIO), "Check the disk and the directory"),
    ("fsync", _os_error(errno.ENOSPC), "Free space on that disk"),
    ("replace", PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
     "Check the permissions of the directory"),
    ("ctrl-c", KeyboardInterrupt(), None),
], ids=["write-ENOSPC", "write-EFBIG", "write-EIO", "fsync-ENOSPC", "replace-EACCES", "ctrl-c"])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, where, error, fix):
    """An OSError while saving is a CheckpointError naming the path, with the system's
    reason and a fix; Ctrl-C stays a KeyboardInterrupt. Either way the previous file is
    intact and the temporary file gone."""
    old = {"w": jnp.arange(4.0), "k": jax.random.key(1)}
    new = {"w": jnp.arange(4.0) + 1, "k": jax.random.key(2)}
    path = tmp_path / "c.npz"
    checkpoint.save(path, old, step=1)
    good = path.read_bytes()

    def fail(*args, **kwargs):
        raise error

    if where in ("write", "ctrl-c"):
        monkeypatch.setattr(checkpoint, "_write_archive", _fail_mid_write(error))
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(type(error) if where == "ctrl-c" else CheckpointError) as info:
        checkpoint.save(path, new, step=2)
    monkeypatch.undo()
    if fix is not None:
        message = str(info.value)
        assert message.startswith(f"checkpoint {path}: could not be written: ")
        assert os.strerror(error.errno) in message and fix in message
        assert info.value.__cause__ is error

    assert os.listdir(tmp_path) == ["c.npz"]  # the temporary file was removed
    assert path.read_bytes() == good
    restored = checkpoint.load(path, new)
    assert restored.step == 1
    assert_identical(restored.tree, old)


FILE_SIZE_LIMITED_SAVE = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from funcnet import checkpoint

    # Writing past the limit then fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        checkpoint.save(sys.argv[1], {"w": np.full(2**20, 2.0, np.float32)}, step=2)
    except checkpoint.CheckpointError as e:
        print(e)
    else:
        print("saved")
""")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_during_save(tmp_path):
    """A real failing write: a save of 4 MiB under a 1 MiB file size limit (in a
    subprocess, so the limit stays there) is a CheckpointError naming the path, the
    system's reason and the fix; the previous checkpoint is intact, no temporary file is
    left."""
    path = tmp_path / "c.npz"
    old = {"w": np.full(2**10, 1.0, np.float32)}
    checkpoint.save(path, old, step=1)
    good = path.read_bytes()
    assert len(good) < 2**20

    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED_SAVE, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert message.startswith(f"checkpoint {path}: could not be written: "), message
    assert os.strerror(errno.EFBIG) in message and "ulimit -f" in message, message

    assert os.listdir(tmp_path) == ["c.npz"]
    assert path.read_bytes() == good
    restored = checkpoint.load(path, old)
    assert restored.step == 1 and np.array_equal(restored.tree["w"], old["w"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="POSIX permissions, which root bypasses")
def test_save_into_read_only_directory(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": jnp.ones(2)}, step=1)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(CheckpointError) as info:
            checkpoint.save(path, {"w": jnp.zeros(2)}, step=2)
    finally:
        os.chmod(tmp_path, 0o700)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: could not be written: ")
    assert os.strerror(errno.EACCES) in message
    assert f"Check the permissions of the directory {tmp_path}" in message
    assert os.listdir(tmp_path) == ["c.npz"]
    assert checkpoint.load(path, {"w": jnp.ones(2)}).step == 1


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from funcnet import checkpoint

    original = checkpoint._write_archive

    class SlowFile:
        # Forwards to the real temporary file; stalls after the first MiB.
        def __init__(self, file):
            self._file, self._written = file, 0
        def write(self, data):
            data = memoryview(data).cast("B")
            for start in range(0, len(data), 2**16):
                self._written += self._file.write(data[start:start + 2**16])
                if self._written > 2**20:
                    self._file.flush()
                    print("started", flush=True)
                    time.sleep(60)
            return len(data)
        def __getattr__(self, name):
            return getattr(self._file, name)

    checkpoint._write_archive = lambda file, entries: original(SlowFile(file), entries)
    checkpoint.save(sys.argv[1], {"w": np.full(2**20, 2.0, np.float32)}, step=2)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_save_leaves_previous_checkpoint(tmp_path):
    """A real interruption: a process killed with SIGKILL while writing (1 of 4 MiB on
    disk) cannot clean up, yet the checkpoint at the path is the previous one, whole."""
    path = tmp_path / "c.npz"
    old = {"w": np.full(2**20, 1.0, np.float32)}
    checkpoint.save(path, old, step=1)
    good = path.read_bytes()

    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    assert line == "started\n", proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL

    leftovers = [name for name in os.listdir(tmp_path) if name != "c.npz"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".c.npz.")  # the partial file
    assert 2**20 < os.path.getsize(tmp_path / leftovers[0]) < 4 * 2**20
    assert path.read_bytes() == good
    restored = checkpoint.load(path, {"w": np.zeros(2**20, np.float32)})
    assert restored.step == 1 and np.array_equal(restored.tree["w"], old["w"])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / leftovers[0], {"w": np.zeros(2**20, np.float32)})


def test_next_save_removes_leftovers_of_killed_saves_only(tmp_path):
    """Temporary files of this target that no process is writing (as a killed save leaves
    them) are removed by the next save; files of other targets and other names stay."""
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": jnp.ones(2)}, step=1)
    stale = [".c.npz.k2x9_q0a.tmp", ".c.npz.abc.tmp"]
    kept = [".other.npz.k2x9_q0a.tmp",  # another target's
            ".c.npz.x.k2x9_q0a.tmp",    # the target c.npz.x's, not c.npz's
            "c.npz.k2x9_q0a.tmp", ".c.npz.bak", ".c.npz.K2X9.tmp", ".c.npz..tmp", "x.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"PK\x03\x04 partial")
    (tmp_path / ".c.npz.subdir.tmp").mkdir()  # not a regular file
    (tmp_path / ".c.npz.symlink.tmp").symlink_to(tmp_path / "x.tmp")
    kept += [".c.npz.subdir.tmp", ".c.npz.symlink.tmp"]

    checkpoint.save(path, {"w": jnp.zeros(2)}, step=2)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["c.npz"])
    assert (tmp_path / "x.tmp").read_bytes() == b"PK\x03\x04 partial"
    assert checkpoint.load(path, {"w": jnp.ones(2)}).step == 2


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_next_save_keeps_the_file_of_a_running_save(tmp_path):
    """The temporary file of a save still running in another process is left alone by a
    save to the same path; once that process is killed, the next save removes it."""
    path = tmp_path / "c.npz"
    like = {"w": np.zeros(2**20, np.float32)}
    checkpoint.save(path, {"w": np.full(2**20, 1.0, np.float32)}, step=1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line == "started\n", proc.stderr.read()
        (running,) = [name for name in os.listdir(tmp_path) if name != "c.npz"]
        size = os.path.getsize(tmp_path / running)
        checkpoint.save(path, like, step=2)  # while the other save stalls mid-write
        assert sorted(os.listdir(tmp_path)) == sorted(["c.npz", running])
        assert os.path.getsize(tmp_path / running) == size
        assert checkpoint.load(path, like).step == 2
    finally:
        proc.kill()
        proc.wait()
        watchdog.cancel()
    checkpoint.save(path, like, step=3)
    assert os.listdir(tmp_path) == ["c.npz"]
    assert checkpoint.load(path, like).step == 3


@pytest.mark.skipif(atomic.fcntl is None, reason="needs flock")
def test_temporary_file_removed_before_it_is_locked(tmp_path, monkeypatch):
    """A concurrent save's clean-up can remove a temporary file in the instant between its
    creation and its lock; the writer notices and writes another."""
    path = tmp_path / "c.npz"
    real_flock, removed = atomic.fcntl.flock, []

    def flock(fd, operation):
        if operation == atomic.fcntl.LOCK_EX and not removed:  # the writer's, the first time
            removed.extend(atomic.remove_stale_temporaries(path))
        return real_flock(fd, operation)

    monkeypatch.setattr(atomic.fcntl, "flock", flock)
    checkpoint.save(path, {"w": jnp.ones(2)}, step=1)
    monkeypatch.undo()
    assert len(removed) == 1 and removed[0].name.startswith(".c.npz.")
    assert os.listdir(tmp_path) == ["c.npz"]
    assert checkpoint.load(path, {"w": jnp.ones(2)}).step == 1


SAVING_LOOP = textwrap.dedent("""
    import sys
    import numpy as np
    from funcnet import checkpoint

    for step in range(1, 10**6):
        checkpoint.save(sys.argv[1], {"w": np.full(2**22, step, np.float32)}, step=step)
        print(step, flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    """A process that saves 16 MiB checkpoints in a loop is killed at an arbitrary moment:
    the file at the path is always one whole checkpoint, the last or the one before."""
    path = tmp_path / "c.npz"
    proc = subprocess.Popen([sys.executable, "-c", SAVING_LOOP, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        lines, times = [], []
        for _ in range(3):
            lines.append(proc.stdout.readline())
            times.append(time.monotonic())
        time.sleep((times[2] - times[1]) / 2)  # about halfway through the fourth save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    assert lines == ["1\n", "2\n", "3\n"], proc.stderr.read()
    restored = checkpoint.load(path, {"w": np.zeros(2**22, np.float32)})
    assert restored.step >= 3
    assert np.array_equal(restored.tree["w"], np.full(2**22, restored.step, np.float32))
