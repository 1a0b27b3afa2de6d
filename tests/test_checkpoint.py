"""funcnet.checkpoint: exact round trips, clear errors for damaged or mismatched files, and
atomic saves (an interrupted save, even a SIGKILLed process, leaves the old file intact)."""

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
from funcnet import checkpoint
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
    with pytest.raises(CheckpointError, match="step must be an integer"):
        checkpoint.save(path, {"w": jnp.ones(2)}, step=1.5)
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


# ---------------------------------------------------------------------- crash safety


def _fail_mid_write(exception):
    original = checkpoint._write_archive

    def write(file, entries):
        original(file, entries)
        file.truncate(file.tell() // 2)  # half a file on disk, then the failure
        raise exception

    return write


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "ctrl-c"])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, where):
    old = {"w": jnp.arange(4.0), "k": jax.random.key(1)}
    new = {"w": jnp.arange(4.0) + 1, "k": jax.random.key(2)}
    path = tmp_path / "c.npz"
    checkpoint.save(path, old, step=1)
    good = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "write":
        monkeypatch.setattr(checkpoint, "_write_archive", _fail_mid_write(OSError("disk full")))
    elif where == "ctrl-c":
        monkeypatch.setattr(checkpoint, "_write_archive", _fail_mid_write(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(KeyboardInterrupt if where == "ctrl-c" else OSError):
        checkpoint.save(path, new, step=2)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["c.npz"]  # the temporary file was removed
    assert path.read_bytes() == good
    restored = checkpoint.load(path, new)
    assert restored.step == 1
    assert_identical(restored.tree, old)


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
