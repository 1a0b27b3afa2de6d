"""Data-parallel training over 8 host CPU devices equals the single-device run.

The device count of a JAX process is fixed when the backend starts, so the comparison
runs in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import funcnet as fnet

    assert jax.device_count() == 8, jax.devices()
    net = fnet.chain(fnet.dense(32), fnet.relu, fnet.dense(32), fnet.tanh, fnet.dense(4))
    params, _ = net.init(jax.random.key(0), (12,))
    x = np.asarray(jax.random.normal(jax.random.key(1), (128, 12)), np.float32)
    y = np.asarray(jnp.argmax(x[:, :4], axis=1), np.int32)
    loss = fnet.losses.softmax_cross_entropy
    kwargs = dict(key=jax.random.key(2), epochs=3, batch_size=32, progress=False)
    single = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, **kwargs)
    mesh = fnet.data_parallel_mesh()
    multi = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, mesh=mesh, **kwargs)
    try:
        fnet.fit(net, loss, optax.sgd(0.1), params, x, y, mesh=mesh, key=jax.random.key(0),
                 batch_size=12, progress=False)
        indivisible = "no error"
    except fnet.ArgumentError as error:
        indivisible = str(error)
    leaf = multi.state.params[0]["w"]
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1e-6 + np.abs(np.asarray(b)))))
             for a, b in zip(jax.tree.leaves(multi.params), jax.tree.leaves(single.params))]
    print(json.dumps({
        "devices": len(mesh.devices.flat),
        "param_devices": len(leaf.sharding.device_set),
        "replicated": leaf.sharding.is_fully_replicated,
        "single_loss": single.history.step_loss.tolist(),
        "multi_loss": multi.history.step_loss.tolist(),
        "max_param_rel_diff": max(diffs),
        "indivisible": indivisible,
    }))
    """
)


def test_eight_device_data_parallel_fit_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["param_devices"] == 8 and result["replicated"]
    assert len(result["single_loss"]) == 3 * (128 // 32)
    assert result["multi_loss"] == pytest.approx(result["single_loss"], rel=1e-5, abs=1e-6)
    assert result["max_param_rel_diff"] < 1e-4
    assert "batch_size: 12 cannot be split evenly over the mesh's 8 devices" in result["indivisible"]
