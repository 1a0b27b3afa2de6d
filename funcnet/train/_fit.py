"""fit: epochs of shuffled mini-batches through one compiled step, reused across calls.

Full-batch gradient descent, SGD with batch size 1, mini-batch SGD and Adam are all just
settings (``batch_size`` and the optax optimizer). The compiled step is cached on the
(net, loss, optimizer, remat) it was built for, so a second ``fit`` of the same network
with the same loss and optimizer object compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from funcnet import checkpoint as _checkpoint
from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError
from funcnet._processes import check_same_everywhere, digest, host_copy, several
from funcnet.ad._reverse import Loss
from funcnet.nn._layer import Layer
from funcnet.train._metrics import measure
from funcnet.train._fingerprint import differences, fingerprint
from funcnet.train._fit_checks import check_fit
from funcnet.train._parallel import global_batch
from funcnet.train._privacy import (DPSGD, chunk_size, noise_std, poisson_masks,
                                    poisson_sample, private_step, privacy_spent,
                                    zeros_like_tree)
from funcnet.train._sharding import state_shardings
from funcnet.train._state import TrainState, init_train_state, owned_copy
from funcnet.train._step import step_fn, train_step


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step.

    Attributes:
      state: the last :class:`TrainState` verified finite (its params finite and every
        loss up to it finite), to inspect or continue from; the caller's own arrays are
        never consumed, so nothing before it is lost either.
      step: the steps that state has taken.
      checkpoint_path: where the last checkpoint of this run is, or None when none was
        written.
    """

    def __init__(self, message: str, state: Optional["TrainState"] = None,
                 step: Optional[int] = None, checkpoint_path: Optional[str] = None):
        super().__init__(message)
        self.state = state
        self.step = step
        self.checkpoint_path = checkpoint_path


@dataclasses.dataclass(frozen=True)
class History:
    """What :func:`fit` saw.

    step_loss: (steps,) numpy array, the mini-batch loss of every step, in order.
    epochs: one dict per epoch: ``epoch``, ``step`` (steps done so far), ``train_loss``
      (mean of the epoch's step losses), ``time`` (seconds since fit started, compile
      included), and ``eval_loss`` / ``eval_accuracy`` when ``eval_data`` was given.
    """

    step_loss: np.ndarray
    epochs: List[Dict[str, float]]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns: the final :class:`TrainState` and the :class:`History`."""

    state: TrainState
    history: History

    @property
    def params(self):
        return self.state.params


def _indexed_step(net, loss, optimizer, remat, count: int):
    """The compiled step fit runs, from the cache when the same (net, loss, optimizer,
    remat) was trained before; compiled afresh when one of them is unhashable."""
    try:
        return _compiled_indexed_step(net, loss, optimizer, remat, count)
    except TypeError:
        return _compiled_indexed_step.__wrapped__(net, loss, optimizer, remat, count)


@bounded_cache(maxsize=32)
def _compiled_indexed_step(net, loss, optimizer, remat, count: int):
    """``run(state, x, y, batches, start, dropout_key)``: one jitted call that takes
    ``count`` steps on the mini-batches ``batches[start:start + count]`` (an epoch's
    (steps, batch) index array), gathering each on the device; more than one step is a
    ``lax.scan``. Indexing inside the call keeps the per-step loop free of small eager
    programs. A step draws its dropout masks from :func:`step_key` (no key when
    ``dropout_key`` is None)."""
    step = step_fn(net, loss, optimizer, remat)

    def indexed(state, x, y, indices, dropout_key):
        return step(state, x[indices], jax.tree.map(lambda t: t[indices], y),
                    step_key(dropout_key, state.step))

    def run(state, x, y, batches, start, dropout_key):
        if count == 1:
            return indexed(state, x, y, batches[start], dropout_key)
        block = jax.lax.dynamic_slice_in_dim(batches, start, count)
        return jax.lax.scan(lambda s, indices: indexed(s, x, y, indices, dropout_key), state,
                            block)

    return jax.jit(run, donate_argnums=0)


#: fold_in data that separates fit's dropout keys from its shuffling keys (fold_in(key, e))
_DROPOUT_STREAM = 0x64726F70


def dropout_root(net: Layer, key):
    """The key fit's dropout keys derive from, ``fold_in(key, _DROPOUT_STREAM)``, or None
    for a net without stochastic layers (whose step then takes no key at all)."""
    return jax.random.fold_in(key, _DROPOUT_STREAM) if net.stochastic else None


def step_key(dropout_key, step):
    """Global step ``step``'s dropout key, ``fold_in(dropout_key, step)``: a function of
    fit's key and the step count alone, so a resumed run draws the same masks."""
    return None if dropout_key is None else jax.random.fold_in(dropout_key, step)


def _on_device(array):
    """``array`` as a device array (moved once; no program compiled for it)."""
    return array if isinstance(array, jax.Array) else jax.device_put(np.asarray(array))


def fit(net: Layer, loss: Loss, optimizer: optax.GradientTransformation, params, x, y, *,
        key: jax.Array, epochs: int = 1, batch_size: Optional[int] = None,
        eval_data: Optional[Tuple[Any, Any]] = None, state: Optional[TrainState] = None,
        first_epoch: int = 0, progress: Optional[bool] = None, mesh: Optional[Mesh] = None,
        checkpoint_path: Optional[str] = None, remat: str = "keep",
        steps_per_call: Union[int, str] = 1,
        on_epoch_end: Optional[Callable[[int, TrainState], None]] = None,
        privacy: Optional[DPSGD] = None) -> FitResult:
    """Trains ``net`` on (x, y) for ``epochs`` epochs of shuffled mini-batches.

    Every argument is checked before the first step (:mod:`funcnet.train._fit_checks`):
    x and y lengths, eval_data, label ranges, integer settings, the state against the
    optimizer, the mesh against the batch, the checkpoint directory.

    Args:
      net, loss: the network and ``loss(out, y) -> scalar``.
      optimizer: any ``optax.GradientTransformation``.
      params: initial params (ignored when ``state`` is given). Never consumed: fit
        trains a copy.
      x, y: the training set, batch first (moved to the device once).
      key: PRNG key for shuffling; epoch e uses ``jax.random.fold_in(key, e)``, so a run
        resumed at ``first_epoch=e`` with the same key sees the same batches. A net with
        stochastic layers (dropout) draws global step s's masks from
        ``fold_in(fold_in(key, 0x64726F70), s)``: one key per step, the same on resume.
      batch_size: examples per step; ``None`` is full-batch gradient descent, 1 is plain
        SGD. The last ``n % batch_size`` examples of each shuffled epoch are left out, so
        every step has the same shape (one compilation).
      eval_data: optional (x_eval, y_eval), evaluated after every epoch.
      state: a :class:`TrainState` to continue from (e.g. a FitResult's ``.state``). Never
        consumed: fit trains a copy, so the caller's state stays valid.
      first_epoch: the index of the first epoch to run (for resuming).
      progress: show a tqdm progress bar with the running loss. ``None`` (default): a bar
        when tqdm is installed (it comes with the ``experiments`` extra), none otherwise;
        ``True`` insists on one (an error without tqdm); ``False``: no bar.
      mesh: train data-parallel over this device mesh (:func:`funcnet.data_parallel_mesh`):
        state replicated, each mini-batch split over the devices (batch_size must be a
        multiple of the device count). On a mesh with a "model" axis
        (:func:`funcnet.model_parallel_mesh`) each mini-batch is split over the first axis
        and the weights of dense and conv layers, with their optimizer moments, over
        "model" (:func:`funcnet.param_shardings`). The batches and the result are those
        of the single-device run, up to floating-point reassociation. In a run of
        several processes (``jax.distributed``) a mesh over every process's devices is
        required, and every process calls fit with the same arguments, the same full
        (x, y) included (checked before the first step): each process's devices take
        their rows of every global batch, process 0 alone writes the checkpoint, every
        process resumes from it, and every process ends with the same state.
      checkpoint_path: save the state (params, optimizer state, step, shuffling key and
        epoch) there atomically after every epoch (:mod:`funcnet.checkpoint`), with a
        fingerprint of the run's settings (examples, batch size, key, optimizer, last
        epoch). If the file exists when fit starts, training resumes from it: the epochs
        it already holds are skipped and the run continues bit-identically to an
        uninterrupted one, up to the same last epoch ``first_epoch + epochs - 1``. A
        checkpoint of a run with other settings, or one past this call's last epoch, is
        refused (:class:`funcnet.checkpoint.CheckpointError` saying what differs). The
        returned history covers the epochs run by this call.
      remat: the backward pass's memory policy, "keep" (default), "sqrt" or "recompute"
        (see :func:`funcnet.value_and_grad`).
      steps_per_call: how many steps one jitted call runs: 1 (a Python loop over the
        jitted step), an int k (a ``lax.scan`` over k device-resident mini-batches per
        call) or ``"epoch"`` (the whole epoch in one call). Larger calls take Python and
        host transfers out of the loop, which is what bounds small networks; the
        numbers are the same steps. Not combined with ``mesh``.
      on_epoch_end: called as ``on_epoch_end(epoch, state)`` after each epoch.
      privacy: DP-SGD (:func:`funcnet.dp_sgd`): every step takes a Poisson sample (each
        example in with probability q = batch_size / n, independently, drawn from
        ``key``), clips each sampled example's gradient to ``max_norm``, adds Gaussian
        noise of standard deviation ``noise_multiplier * max_norm`` to the clipped sum
        and divides by the expected batch size ``batch_size``; an epoch is n //
        batch_size such steps. The sample runs in chunks of batch_size + 2 sqrt(batch_size)
        examples (padding masked out, nothing truncated; a second chunk about 2% of the
        time), so every step compiles to the same shapes. Each epoch's history row gains ``epsilon`` and ``delta``: the privacy
        spent so far, by dp-accounting's RDP accountant for Poisson sampling. Not
        combined with ``mesh`` or ``steps_per_call > 1``.

    Returns:
      :class:`FitResult` with the final state and the :class:`History`.

    Raises:
      ArgumentError, LayerError: a bad argument, before any step.
      CheckpointError: a checkpoint at ``checkpoint_path`` of another run.
      TrainingError: when a loss is NaN or infinite, naming the step and the last finite
        loss (checked once per progress update, so a few more steps may have run); it
        carries the last state verified finite and the last checkpoint's path.
    """
    plan = check_fit(net, loss, optimizer, params, x, y, key=key, epochs=epochs,
                     batch_size=batch_size, eval_data=eval_data, state=state,
                     first_epoch=first_epoch, progress=progress, mesh=mesh,
                     checkpoint_path=checkpoint_path, remat=remat,
                     steps_per_call=steps_per_call, on_epoch_end=on_epoch_end,
                     privacy=privacy)
    n, batch_size, steps_per_epoch = plan.examples, plan.batch_size, plan.steps_per_epoch
    first_epoch, last_epoch = plan.first_epoch, plan.first_epoch + plan.epochs - 1
    bar = _progress_bar(progress)  # (checked now; shown from the first step)
    run = fingerprint(optimizer=optimizer, key=key, batch_size=batch_size, examples=n,
                      last_epoch=last_epoch, privacy=privacy)
    # the state fit owns: a copy, so that donating it never consumes the caller's arrays
    state = init_train_state(params, optimizer) if state is None else owned_copy(state)
    if several():
        _check_same_run(state, x, y, run, (first_epoch, epochs, remat, plan.steps_per_call),
                        checkpoint_path)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        state, key, first_epoch = _resume(checkpoint_path, state, key, run, last_epoch)
    epochs = max(0, last_epoch - first_epoch + 1)
    dropout_key = dropout_root(net, key)
    if privacy is not None:
        x, y = _on_device(x), jax.tree.map(_on_device, y)
        step = _private_fit_step(net, loss, optimizer, privacy, remat, x, y, batch_size,
                                 dropout_key)
    elif mesh is None:
        x, y = _on_device(x), jax.tree.map(_on_device, y)

        def step(state, batches, start, count):
            return _indexed_step(net, loss, optimizer, remat, count)(
                state, x, y, batches, start, dropout_key)
    else:
        x, y = np.asarray(x), jax.tree.map(np.asarray, y)
        state = jax.device_put(state, state_shardings(net, state, mesh))
        sharded_step = train_step(net, loss, optimizer, mesh, remat)

        def step(state, batches, start, count):
            indices = batches[start]  # count is 1: steps_per_call > 1 is refused with a mesh
            batch_x, batch_y = global_batch(mesh, (x[indices],
                                                   jax.tree.map(lambda t: t[indices], y)))
            return sharded_step(state, batch_x, batch_y, step_key(dropout_key, state.step))
    # how often losses come back to the host (a device sync): about 20 times an epoch,
    # but never more often than every 50 steps, so small steps are not held up by it
    log_every = max(50, steps_per_epoch // 20)
    bar = bar(epochs * steps_per_epoch, getattr(net, "name", "fit"))
    step_losses: List[np.ndarray] = []
    epoch_rows: List[Dict[str, float]] = []
    done = int(state.step)  # steps done, counted globally
    last_finite = (None, None)
    # the last state verified finite, kept apart from the donated one being trained
    verified = _Verified(state, done, checkpoint_path if os.path.exists(
        checkpoint_path or "") else None)
    state = owned_copy(state)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for epoch in range(first_epoch, first_epoch + epochs):
            if privacy is not None:  # (Poisson samples on the host, the epoch's noise key)
                masks, noise_key = poisson_masks(key, epoch, steps_per_epoch, n, batch_size / n)
                batches = (np.asarray(masks), noise_key)
            else:
                batches = _epoch_batches(key, epoch, n, steps_per_epoch, batch_size)
            if mesh is not None:
                batches = np.asarray(batches)  # gathered on the host, then split over the mesh
            pending: List[jax.Array] = []
            epoch_sum, waiting = 0.0, 0
            for start_index in range(0, steps_per_epoch, plan.steps_per_call):
                # one step (a scalar loss) or a scanned block of steps (a vector of losses)
                count = min(plan.steps_per_call, steps_per_epoch - start_index)
                state, value = step(state, batches, start_index, count)
                pending.append(value)
                waiting += count
                if waiting >= log_every or start_index + count >= steps_per_epoch:
                    values = np.concatenate([np.atleast_1d(v) for v in jax.device_get(pending)])
                    values = values.astype(np.float64)
                    last_finite = _check_finite(values, done, last_finite, verified)
                    done += len(values)
                    verified.update(state, done)
                    step_losses.append(values)
                    epoch_sum += float(values.sum())
                    bar.update(len(values))
                    bar.set_postfix(epoch=epoch, loss=f"{values[-1]:.4g}", refresh=False)
                    pending, waiting = [], 0
            row = {"epoch": epoch, "step": done, "train_loss": epoch_sum / steps_per_epoch,
                   "time": time.perf_counter() - start}
            if privacy is not None:
                row["epsilon"] = privacy_spent(privacy, batch_size / n, done)
                row["delta"] = privacy.delta
            if eval_data is not None:
                metrics = measure(net, loss, host_copy(state.params) if mesh else state.params,
                                  *eval_data)  # (eval_data was checked before the first step)
                row.update({f"eval_{name}": value for name, value in metrics.items()})
            epoch_rows.append(row)
            if checkpoint_path is not None:
                _checkpoint.save(checkpoint_path, {"state": state, "key": key}, step=done,
                                 metadata={"epoch": epoch, "fingerprint": run})
                verified.checkpoint = checkpoint_path
            if on_epoch_end is not None:
                on_epoch_end(epoch, state)
    bar.close()
    history = History(np.concatenate(step_losses) if step_losses else np.zeros((0,)), epoch_rows)
    return FitResult(state, history)


def _private_fit_step(net, loss, optimizer, privacy: DPSGD, remat, x, y, batch_size: int,
                      dropout_key):
    """fit's ``step(state, (masks, noise_key), t, 1)`` for DP-SGD: step t's Poisson sample
    (row t of the masks) in chunks (:func:`chunk_size`) through the compiled accumulate,
    then the noised update (denominator: the expected batch size ``batch_size``). The
    chunk starting at example c of global step s draws its dropout masks from
    ``fold_in(fold_in(dropout_key, s), c)`` (no key when ``dropout_key`` is None)."""
    accumulate, update = private_step(net, loss, optimizer, remat)
    chunk = chunk_size(batch_size, int(jnp.shape(x)[0]))

    def step(state, batches, start, count):
        masks, noise_key = batches
        indices, weights, sampled = poisson_sample(masks[start], chunk)
        total, loss_total = zeros_like_tree(state.params), jnp.zeros((), jnp.float32)
        this_step = step_key(dropout_key, state.step)
        for begin in range(0, len(indices), chunk):
            chunk_key = None if this_step is None else jax.random.fold_in(this_step, begin)
            total, loss_total = accumulate(state.params, x, y, indices[begin:begin + chunk],
                                           weights[begin:begin + chunk], total, loss_total,
                                           privacy.max_norm, chunk_key)
        return update(state, total, loss_total, sampled, jax.random.fold_in(noise_key, start),
                      batch_size, noise_std(privacy))

    return step


class _Verified:
    """The last state verified finite (a copy the training loop does not donate), the
    steps it has taken, and the path of the last checkpoint written."""

    def __init__(self, state, step: int, checkpoint: Optional[str]):
        self.state, self.step, self.checkpoint = state, step, checkpoint

    def update(self, state, step: int) -> None:
        """Keeps a copy of ``state`` when its params are all finite (one compiled call)."""
        copy, finite = _snapshot(state)
        if bool(finite):
            self.state, self.step = copy, step


@jax.jit
def _snapshot(state):
    """(a copy of ``state`` in new buffers, whether its params are all finite)."""
    finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state.params)]
    return jax.tree.map(jnp.copy, state), jnp.all(jnp.asarray(finite or [True]))


class _NoBar:
    """Stands in for a tqdm bar when there is none."""

    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(progress: Optional[bool]):
    """``make(total, description)`` for the bar ``progress`` asks for (checked now)."""
    have_tqdm = importlib.util.find_spec("tqdm") is not None
    if progress and not have_tqdm:
        raise ArgumentError(
            "progress", "fit(progress=True) needs tqdm, which is not installed: pip install "
                        "tqdm (or funcnet[experiments]), or pass progress=False.")
    if progress is False or not have_tqdm:
        return lambda total, description: _NoBar()

    def make(total, description):
        from tqdm.auto import tqdm  # optional dependency, imported only when a bar is shown

        return tqdm(total=total, unit="step", desc=description)

    return make


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _epoch_batches(key, epoch, n, steps, batch_size):
    """Epoch ``epoch``'s shuffled example indices, (steps, batch_size)."""
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return order[: steps * batch_size].reshape(steps, batch_size)


def _resume(path, state: TrainState, key, run: Dict[str, Any], last_epoch: int):
    """(state, key, first epoch to run) from the checkpoint at ``path``, after checking
    that it was written by this run (the same fingerprint) and not past its last epoch."""
    saved = _checkpoint.info(path)
    saved_epoch = saved["metadata"].get("epoch")
    if isinstance(saved_epoch, int) and saved_epoch > last_epoch:
        raise _checkpoint.CheckpointError(
            path, f"holds a run trained up to epoch {saved_epoch} (step {saved['step']}), past "
                  f"this call's last epoch {last_epoch} (first_epoch + epochs - 1): resuming "
                  f"would return the later model with no history. Load that model with "
                  f"fnet.checkpoint.load, or ask for the run's epochs, or use another "
                  f"checkpoint_path for a new run.")
    differing = differences(saved["metadata"].get("fingerprint", {}), run)
    if differing:
        raise _checkpoint.CheckpointError(
            path, "was written by a run with other settings, so resuming it would not continue "
                  "that run: " + "; ".join(differing) + ". Resume with the settings it was "
                  "written with, or use another checkpoint_path for a new run (to train a "
                  "finished run further, load it with fnet.checkpoint.load and pass its state "
                  "with first_epoch and a new checkpoint_path).")
    template = jax.eval_shape(lambda: {"state": state, "key": key})
    restored = _checkpoint.load(path, template)
    return (restored.tree["state"], restored.tree["key"],
            int(restored.metadata["epoch"]) + 1)


def _check_same_run(state: TrainState, x, y, run: Dict[str, Any], settings: Tuple,
                    checkpoint_path: Optional[str]) -> None:
    """In a run of several processes: refuses to start unless every process was given the
    same starting state, data, settings and checkpoint (digests compared across the
    processes), since each process computes only its share of every step."""
    found = None
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        found = _checkpoint.info(checkpoint_path)
    check_same_everywhere(
        {"params and optimizer state": digest(*jax.tree.leaves(host_copy(state))),
         "x": digest(np.asarray(x)),
         "y": digest(*[np.asarray(leaf) for leaf in jax.tree.leaves(y)]),
         "settings": digest(run, settings),
         "checkpoint": digest(checkpoint_path, found)},
        {"params and optimizer state": "initialise them from the same key on every process "
                                       "(or pass the same state)",
         "x": "pass every process the same full training set (each computes its share of "
              "every batch)",
         "y": "pass every process the same full training set",
         "settings": "pass the same key, batch_size, epochs, first_epoch, optimizer and "
                     "the other settings on every process",
         "checkpoint": "checkpoint_path must name the same file on a file system every "
                       "process sees (process 0 writes it, every process reads it)"})


def _check_finite(values: np.ndarray, done: int, last_finite, verified: _Verified):
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        first = int(bad[0])
        if first > 0:
            last_finite = (done + first, float(values[first - 1]))
        last = (
            "no finite loss was seen" if last_finite[0] is None
            else f"the last finite loss was {last_finite[1]:.6g} at step {last_finite[0]}"
        )
        where = (f"the last checkpoint is at {verified.checkpoint}" if verified.checkpoint
                 else "no checkpoint was written (pass checkpoint_path= to keep one per epoch)")
        raise TrainingError(
            f"the loss became {values[first]} at step {done + first + 1}; {last}. The error's "
            f".state holds the state after step {verified.step}, the last verified finite; "
            f"{where}. Lower the learning rate, check the inputs for NaN/inf, or use a "
            f"numerically stable loss.", verified.state, verified.step, verified.checkpoint)
    return (done + len(values), float(values[-1]))
