"""The training run that tests/train/test_processes.py starts twice: as 2 processes x 2
host devices (``python -m funcnet.launch --processes 2 --devices-per-process 2``) and as
1 process x 4 devices. Each process writes ``process_<i>.json`` into the folder given.

    python tests/train/distributed_fit.py FOLDER

Runs, on a data-parallel mesh over every device: an uninterrupted 4-epoch fit with a
checkpoint; the same run stopped by an exception after epoch 1's checkpoint and resumed
by a second call; a fit on a mesh
whose "model" axis spans both processes (weights split across processes, so checkpoints
and evaluation gather them); and, with several processes, what must be refused on every
process: x that differs on process 1, no mesh, a mesh of one process's devices, a
checkpoint that process 0 cannot write. Process 0 counts the checkpoint files it writes,
the others too (they must write none).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _as_lists(tree):
    import jax
    import numpy as np

    return [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(tree)]


def main(folder: Path) -> None:
    import funcnet as fnet
    import funcnet.launch

    if funcnet.launch.COORDINATOR in os.environ:
        funcnet.launch.initialize(timeout_seconds=120)
    import jax
    import numpy as np
    import optax

    from funcnet import checkpoint
    from funcnet._processes import host_copy

    writes = []
    write = checkpoint._write

    def counting_write(path, *args):
        writes.append(Path(path).name)
        return write(path, *args)

    checkpoint._write = counting_write  # count the files this process writes

    net = fnet.chain(fnet.dense(32), fnet.relu, fnet.dense(16), fnet.tanh, fnet.dense(4))
    params, _ = net.init(jax.random.key(0), (12,))
    x = np.asarray(jax.random.normal(jax.random.key(1), (96, 12)), np.float32)
    y = np.asarray(np.argmax(x[:, :4], axis=1), np.int32)
    loss = fnet.losses.softmax_cross_entropy
    mesh = fnet.data_parallel_mesh()

    class Crash(Exception):
        pass

    def crash_after_epoch_1(epoch, state):
        if epoch == 1:
            raise Crash

    def run(epochs, path, mesh=mesh, x=x, on_epoch_end=None):
        return fnet.fit(net, loss, optax.adam(1e-2), params, x, y, key=jax.random.key(2),
                        epochs=epochs, batch_size=32, mesh=mesh, progress=False,
                        eval_data=(x[:16], y[:16]), checkpoint_path=str(folder / path),
                        on_epoch_end=on_epoch_end)

    full = run(4, "full.npz")
    try:
        run(4, "resumed.npz", on_epoch_end=crash_after_epoch_1)
    except Crash:
        pass  # after the checkpoint of epoch 1
    resumed = run(4, "resumed.npz")
    devices = jax.devices()
    across = fnet.model_parallel_mesh(2, devices[0::2] + devices[1::2])
    split = run(2, "split.npz", mesh=across)
    split_w = split.params[0]["w"]
    restored = checkpoint.load(folder / "split.npz", {"state": split.state,
                                                      "key": jax.random.key(2)}).tree
    refused = {}
    if jax.process_count() > 1:
        attempts = {"x": lambda: run(1, "refused.npz", x=x + jax.process_index()),
                    "no mesh": lambda: run(1, "refused.npz", mesh=None),
                    "local mesh": lambda: run(1, "refused.npz",
                                              mesh=fnet.data_parallel_mesh(jax.local_devices())),
                    "unwritable": lambda: checkpoint.save(folder / "missing" / "c.npz",
                                                          {"w": np.ones(3)})}
        for name, attempt in attempts.items():
            try:
                attempt()
            except (fnet.ArgumentError, checkpoint.CheckpointError) as error:
                refused[name] = str(error)

    index = jax.process_index()
    (folder / f"process_{index}.json").write_text(json.dumps({
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "full_loss": full.history.step_loss.tolist(),
        "full_eval": [row["eval_loss"] for row in full.history.epochs],
        "full_params": _as_lists(host_copy(full.params)),
        "resumed_epochs": [row["epoch"] for row in resumed.history.epochs],
        "resumed_loss": resumed.history.step_loss.tolist(),
        "resumed_params": _as_lists(host_copy(resumed.params)),
        "split_loss": split.history.step_loss.tolist(),
        "split_w_spec": str(split_w.sharding.spec),
        "split_w_shard": list(split_w.addressable_shards[0].data.shape),
        "split_restored_equal": bool(all(
            np.array_equal(a, b) for a, b in zip(
                jax.tree.leaves(host_copy(restored["state"])),
                jax.tree.leaves(host_copy(split.state))))),
        "refused": refused,
        "writes": writes,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
