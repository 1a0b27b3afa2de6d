"""Training over 8 host CPU devices equals the single-device run: data-parallel, and with
the weights split over a model axis (with less memory per device).

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
    assert "batch_size: 12 cannot be split evenly over the mesh's 8 batch shards" in result["indivisible"]


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import funcnet as fnet

    assert jax.device_count() == 8, jax.devices()
    mesh = fnet.model_parallel_mesh(4)  # 2 batch shards x 4 model shards
    loss = fnet.losses.softmax_cross_entropy
    nets = {
        "mlp": (fnet.chain(fnet.dense(64), fnet.relu,
                           fnet.repeat(fnet.residual(fnet.chain(fnet.dense(64), fnet.tanh)), 2),
                           fnet.dense(3)), (12,)),
        "cnn": (fnet.chain(fnet.conv(8, 3), fnet.relu, fnet.max_pool(2), fnet.flatten,
                           fnet.dense(4)), (6, 6, 2)),
    }
    result = {"mesh": dict(mesh.shape)}
    for name, (net, in_shape) in nets.items():
        params, _ = net.init(jax.random.key(0), in_shape)
        x = np.asarray(jax.random.normal(jax.random.key(1), (64,) + in_shape), np.float32)
        y = np.asarray(np.argmax(x.reshape(64, -1)[:, :3], axis=1), np.int32)
        kwargs = dict(key=jax.random.key(2), epochs=2, batch_size=16, progress=False)
        single = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, **kwargs)
        split = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, mesh=mesh, **kwargs)
        # per leaf: the largest difference relative to the leaf's largest entry
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(single.params))]
        result[name] = {
            "specs": jax.tree.map(lambda a: str(a.sharding.spec), split.params),
            "moment_specs": [str(a.sharding.spec) for a in jax.tree.leaves(split.state.opt_state)],
            "single_loss": single.history.step_loss.tolist(),
            "split_loss": split.history.step_loss.tolist(),
            "max_param_rel_diff": max(diffs),
        }
    # compiled memory per device: the same step on a data-parallel mesh (params replicated)
    net, optimizer = nets["mlp"][0], optax.adam(1e-2)
    params, _ = net.init(jax.random.key(0), (12,))
    state = fnet.init_train_state(params, optimizer)
    x, y = np.ones((64, 12), np.float32), np.zeros((64,), np.int32)
    memory = {}
    for label, on in (("replicated", fnet.data_parallel_mesh()), ("split", mesh)):
        placed = jax.device_put(state, fnet.state_shardings(net, state, on))
        step = fnet.train_step(net, loss, optimizer, on)
        stats = step.lower(placed, *fnet.shard_batch(on, (x, y)), None).compile().memory_analysis()
        memory[label] = {"arguments": stats.argument_size_in_bytes,
                         "temporaries": stats.temp_size_in_bytes}
    result["memory"] = memory
    try:
        fnet.model_parallel_mesh(3)
        result["bad_model"] = "no error"
    except fnet.ArgumentError as error:
        result["bad_model"] = str(error)
    print(json.dumps(result))
    """
)


def test_weights_split_over_the_model_axis_match_single_device_with_less_memory():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mesh"] == {"batch": 2, "model": 4}
    split, kept = "P(None, 'model')", "P()"
    mlp = result["mlp"]["specs"]
    assert mlp[0] == {"w": split, "b": "P('model',)"}
    # the repeat's stacked weights: the copy axis in front is never split
    assert mlp[2] == [{"w": "P(None, None, 'model')", "b": "P(None, 'model')"}, []]
    assert mlp[3] == {"w": kept, "b": kept}  # 3 outputs do not split 4 ways: replicated
    assert result["cnn"]["specs"][0] == {"w": "P(None, None, None, 'model')", "b": "P('model',)"}
    for name in ("mlp", "cnn"):
        run = result[name]
        assert split in run["moment_specs"]  # Adam's moments follow the weights
        assert run["split_loss"] == pytest.approx(run["single_loss"], rel=1e-5, abs=1e-6)
        assert run["max_param_rel_diff"] < 1e-5
    memory = result["memory"]
    assert memory["split"]["arguments"] < 0.4 * memory["replicated"]["arguments"]
    assert memory["split"]["temporaries"] < memory["replicated"]["temporaries"]
    assert "3 does not divide the 8 devices" in result["bad_model"]
