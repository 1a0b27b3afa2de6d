"""Laplace: a diagonal Laplace approximation of an MLP's posterior on digits, from the
``diag_ggn`` extension, against the MAP network it is built on.

The MAP network is ``_common.mlp(--hidden)`` (digits.py's [256, 256] by default) trained on
digits (``fnet.data.load_digits``; its training part split once more, stratified, into a
fitting part of N = 1078 examples and a validation part of 269) by ``fnet.fit``: Adam,
step size 3e-3 cosine-decayed to 0 over 80 epochs, batch 64, and an L2 penalty that IS the
Gaussian prior N(0, 1 / delta_0) on every weight and bias: the mini-batch objective is
mean cross-entropy + delta_0 / (2 N) ||w||^2 (``optax.add_decayed_weights(delta_0 / N)``
before Adam, added to the gradient, not decoupled), i.e. 1 / N times the negative log
posterior. Two MAP networks per seed: delta_0 = 0.01 (next to no weight decay: trained to
a training loss near 1e-4, the overconfident MAP a Laplace approximation is meant to fix)
and delta_0 = 1 (weight decay 1e-3, a well-regularised MAP).

The Laplace approximation replaces the posterior by N(w*, P^-1), P diagonal:

    P = sum_n diag(J_n^T H_n J_n) + delta = N * diag(G) + delta,

the GGN of the summed log likelihood plus the prior precision. ``diag_ggn`` is the diagonal
of the batch MEAN's GGN, so it is accumulated over mini-batches as sum_k B_k * diag_ggn_k
(``ggn_diagonal_sum``; the result does not depend on the batch size). The prior precision
delta is then tuned post hoc (as in Laplace Redux, Daxberger et al. 2021) on a log grid
(16 values, 1 .. 1e5) by the validation NLL of each predictive, independently for each
variant, with delta = infinity (no spread: the MAP itself) as one more candidate: when the
MAP's validation NLL beats every grid point, the variant IS the MAP (``chose_map`` in the
JSON). The grid's top end is not the MAP: at delta = 1e5 every weight still has a standard
deviation up to 0.003, which moves the logits of an 85k-weight network visibly.

Predictives, each a Monte Carlo average of softmax over ``--samples`` (32) draws
w_s = w* + P^-1/2 eps_s (the same eps_s for every delta of the grid, so the tuning curve
is smooth):

* ``Laplace (GLM)``: the linearised network f(w*, x) + J(x) (w_s - w*) (one ``fnet.jvp``
  per draw): the generalised-linear predictive recommended by Immer et al. (2021) for a
  GGN posterior;
* ``Laplace (sampling)``: the network itself at w_s (the "NN predictive");
* ``last-layer Laplace``: only the output layer's weights and bias drawn (the network is
  linear in them, so both predictives agree), from the same diag(G)'s last-layer block;
* ``MAP + temperature``: the MAP's logits divided by one temperature fitted on the
  validation NLL; not Bayesian, the usual cheap reference for calibration.

Metrics on the test part (450 images): accuracy, NLL (mean -log p(y | x)), expected
calibration error (15 equal-width confidence bins: sum_bins n_bin / n * |acc - conf|), the
Brier score; per seed, their means over ``--runs`` (3) seeds (each seed: its own split,
initialisation, shuffling and draws), and ``ece_pooled``, the ECE of every seed's test
predictions together.

Target: on the delta_0 = 0.01 MAP, the GLM Laplace predictive has lower test NLL AND lower
test ECE than the MAP, with test accuracy within 1 point of the MAP's, means over the seeds.
Why: a MAP network trained to a tiny training loss is overconfident on the examples it gets
wrong; the Laplace predictive adds logit variance along the directions the data does not
pin down, which softens those predictions. The linearised predictive keeps the MAP's mean
logits (to first order), so accuracy should move little (1 point = 4.5 test images), while
NLL and ECE fall (Immer et al. 2021 and Daxberger et al. 2021 report this pattern on
MNIST-like data). NLL is what delta is tuned for, on other data, so its improvement on the
test part is expected but not guaranteed; ECE is not tuned for, so it is the real test.
Caveats, seen in pilot runs (seeds 0-2, which the default run repeats): at 97-98 %
accuracy the 269 validation images hold only 2-8 errors, so the tuned delta (and the
temperature) are noisy, and a 450-image test part resolves ECE only coarsely (one
confidently wrong image moves it by about 0.2 %), so ECE differences of a few 0.1 % are
noise; the pilots also showed the ECE comparison turning on details of the tuning grid
(a 13-point grid from 0.1 gave 0.0212 against the MAP's 0.0211; NLL fell either way). The
delta_0 = 1 MAP is the control: not overconfident, so the tuning should pick the MAP
itself or a delta at the grid's top end (Laplace close to MAP).

Writes ``results.json`` (every number: per-seed metrics, the tuning curves, the
reliability bins), ``reliability.png`` (reliability diagrams and confidence histograms,
the MAP against each Laplace predictive, every seed's test predictions pooled) and
``tuning.png`` (validation NLL against the prior precision) to the results folder, and
prints Markdown tables and the target line.

    python experiments/laplace.py --help
    python experiments/laplace.py --quick     # toy size, a few seconds
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import funcnet as fnet
from _common import (add_compilation_cache_flag, enable_compilation_cache, mlp, pyplot,
                     results_dir, save_figure, table, target_line, write_json)

LOSS = fnet.losses.softmax_cross_entropy
ECE_BINS = 15
ACCURACY_TOLERANCE = 0.01
MAP, GLM, SAMPLING, LAST_LAYER, TEMPERATURE = ("MAP", "Laplace (GLM)", "Laplace (sampling)",
                                               "last-layer Laplace", "MAP + temperature")
LAPLACE_KINDS = {GLM: "glm", SAMPLING: "sample", LAST_LAYER: "glm"}
METHODS = (MAP, GLM, SAMPLING, LAST_LAYER, TEMPERATURE)


# --- the Laplace approximation --------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _add_batch_ggn(net, loss, total, params, x, y):
    """total + B * diag_ggn of the batch (x, y) of B examples."""
    record = fnet.backprop(net, loss, params, x, y, extensions=(fnet.extensions.diag_ggn(),))
    batch = x.shape[0]
    return jax.tree.map(lambda t, mean: t + batch * mean, total, record.extensions["diag_ggn"])


def ggn_diagonal_sum(net, loss, params, x, y, batch_size: int):
    """sum_n diag(J_n^T H_n J_n) over every example of (x, y), leaves like params.

    ``diag_ggn`` is the diagonal of the batch MEAN's GGN, so each batch's result is
    multiplied by its own size before the batches are added (the last, smaller batch
    counts for what it holds)."""
    n = x.shape[0]
    total = jax.tree.map(jnp.zeros_like, params)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        total = _add_batch_ggn(net, loss, total, params, x[start:stop], y[start:stop])
    return total


@functools.partial(jax.jit, static_argnums=(2,))
def posterior_std(ggn_sum, prior_precision, layers=None):
    """The diagonal posterior's standard deviations 1 / sqrt(sum_n diag G_n + delta), per
    leaf; zero (no draw) outside the top-level ``layers`` (a tuple of indices) when given."""
    std = jax.tree.map(lambda g: 1.0 / jnp.sqrt(g + prior_precision), ggn_sum)
    if layers is None:
        return std
    return tuple(s if i in layers else jax.tree.map(jnp.zeros_like, s)
                 for i, s in enumerate(std))


def standard_normal_like(seed: int, params, samples: int):
    """``samples`` independent standard normal draws shaped like params (leading axis S),
    from numpy's seeded generator (no compilation: jax.random would compile one program
    per leaf shape, seconds at this size)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(rng.standard_normal((samples,) + leaf.shape), leaf.dtype),
        params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def log_predictive(net, kind: str, params, std, noise, x):
    """log p(class | x) of the predictive ``kind``, (B, C): "map" (softmax of the MAP
    logits), "glm" (the linearised network at w* + std * eps_s) or "sample" (the network
    at w* + std * eps_s), averaged over the draws eps_s (noise's leading axis) in
    probability space, stably (log-sum-exp of the log-softmaxes minus log S)."""
    if kind == "map":
        return jax.nn.log_softmax(net.apply(params, x), axis=-1)

    def draw(eps):
        delta = jax.tree.map(lambda s, e: s * e, std, eps)
        if kind == "sample":
            return jax.nn.log_softmax(net.apply(jax.tree.map(jnp.add, params, delta), x),
                                      axis=-1)
        out, out_dot = fnet.jvp(net, params, x, delta)
        return jax.nn.log_softmax(out + out_dot, axis=-1)

    logs = jax.lax.map(draw, noise, batch_size=8)  # (S, B, C)
    samples = jax.tree.leaves(noise)[0].shape[0]
    return jax.nn.logsumexp(logs, axis=0) - math.log(samples)


# --- metrics ----------------------------------------------------------------------------------

def log_softmax(logits):
    """log softmax over the last axis, in numpy (float64)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reliability_bins(confidence, correct, bins: int = ECE_BINS):
    """Equal-width confidence bins (lo, hi], the first [0, 1/bins]: per bin the count, the
    mean confidence and the accuracy (None for an empty bin)."""
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(correct[inside].mean()) if count else None})
    return rows


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """sum over bins of n_bin / n * |accuracy_bin - mean confidence_bin|."""
    n = len(confidence)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability_bins(confidence, correct, bins) if r["count"]))


def metrics(log_probs, y, bins: int = ECE_BINS) -> Dict[str, float]:
    """accuracy, NLL, ECE and Brier score of predicted log probabilities (B, C)."""
    log_probs = np.asarray(log_probs, np.float64)
    y = np.asarray(y)
    probs = np.exp(log_probs)
    confidence, prediction = probs.max(axis=1), probs.argmax(axis=1)
    correct = (prediction == y).astype(np.float64)
    onehot = np.eye(probs.shape[1])[y]
    return {"accuracy": float(correct.mean()),
            "nll": float(-log_probs[np.arange(len(y)), y].mean()),
            "ece": expected_calibration_error(confidence, correct, bins),
            "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
            "mean_confidence": float(confidence.mean())}


# --- one seed ---------------------------------------------------------------------------------

def split_validation(x, y, size: int, seed: int):
    """A stratified, seeded split of (x, y) into a fitting part and ``size`` validation
    examples."""
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=size, stratify=y,
                                                  random_state=seed)
    return x_fit, y_fit, x_val, y_val


def train_map(net, params, x, y, train_prior: float, args, seed: int, progress: bool):
    """The MAP network: Adam (cosine decay) on mean cross-entropy + delta_0/(2N) ||w||^2."""
    n = x.shape[0]
    steps = args.epochs * (n // args.batch_size)
    optimizer = optax.chain(optax.add_decayed_weights(train_prior / n),
                            optax.adam(optax.cosine_decay_schedule(args.learning_rate, steps)))
    start = time.perf_counter()
    result = fnet.fit(net, LOSS, optimizer, params, x, y, key=jax.random.key(seed + 1),
                      epochs=args.epochs, batch_size=args.batch_size, progress=progress)
    jax.block_until_ready(result.params)
    return result, time.perf_counter() - start


def run_seed(net, seed: int, train_prior: float, args) -> Dict[str, object]:
    progress = not args.no_progress
    data = fnet.data.load_digits(seed=seed)
    x_fit, y_fit, x_val, y_val = split_validation(data.x_train, data.y_train,
                                                  args.validation, seed)
    n = int(x_fit.shape[0])
    params, _ = net.init(jax.random.key(seed), data.in_shape)
    result, train_seconds = train_map(net, params, x_fit, y_fit, train_prior, args, seed,
                                      progress)
    w_map = result.params
    train = fnet.evaluate(net, LOSS, w_map, x_fit, y_fit)

    start = time.perf_counter()
    ggn_sum = jax.block_until_ready(ggn_diagonal_sum(net, LOSS, w_map, x_fit, y_fit,
                                                     args.ggn_batch_size))
    ggn_seconds = time.perf_counter() - start
    noise = standard_normal_like(seed + 2, w_map, args.samples)
    last = len(w_map) - 1  # the output dense layer's slot in the chain's params

    grid = np.logspace(args.prior_min, args.prior_max, args.grid)
    layers = {GLM: None, SAMPLING: None, LAST_LAYER: (last,)}
    curves: Dict[str, List[float]] = {m: [] for m in LAPLACE_KINDS}
    start = time.perf_counter()
    for prior in tqdm(grid, disable=not progress, unit="prior",
                      desc=f"seed {seed}, delta_0 {train_prior:g}: tuning"):
        for method, kind in LAPLACE_KINDS.items():
            std = posterior_std(ggn_sum, float(prior), layers[method])
            log_p = log_predictive(net, kind, w_map, std, noise, x_val)
            curves[method].append(metrics(log_p, y_val)["nll"])
    tuning_seconds = time.perf_counter() - start

    map_val = metrics(log_predictive(net, "map", w_map, None, None, x_val), y_val)
    test_log_p = {MAP: log_predictive(net, "map", w_map, None, None, data.x_test)}
    chosen = {}
    start = time.perf_counter()
    for method, kind in LAPLACE_KINDS.items():
        best = int(np.argmin(curves[method]))
        if not curves[method][best] < map_val["nll"]:
            # delta = infinity, no posterior spread: the MAP itself won on validation
            chosen[method] = {"prior_precision": None, "chose_map": True,
                              "validation_nll": map_val["nll"], "at_grid_edge": False}
            test_log_p[method] = test_log_p[MAP]
            continue
        chosen[method] = {"prior_precision": float(grid[best]), "chose_map": False,
                          "validation_nll": float(curves[method][best]),
                          "at_grid_edge": best in (0, len(grid) - 1)}
        std = posterior_std(ggn_sum, float(grid[best]), layers[method])
        test_log_p[method] = log_predictive(net, kind, w_map, std, noise, data.x_test)
    jax.block_until_ready(test_log_p)
    predict_seconds = time.perf_counter() - start

    # the reference: one temperature for the MAP's logits, fitted on the validation NLL
    # (the MAP's log-softmax outputs are its logits up to a per-row shift, which the
    # softmax of logits / T ignores)
    val_logits = np.asarray(log_predictive(net, "map", w_map, None, None, x_val), np.float64)
    temperatures = np.logspace(-1, 1, 81)
    temperature_nll = [metrics(log_softmax(val_logits / t), y_val)["nll"]
                       for t in temperatures]
    temperature = float(temperatures[int(np.argmin(temperature_nll))])
    test_logits = np.asarray(test_log_p[MAP], np.float64)
    test_log_p[TEMPERATURE] = log_softmax(test_logits / temperature)
    chosen[TEMPERATURE] = {"temperature": temperature,
                           "validation_nll": float(min(temperature_nll))}

    test = {m: metrics(lp, data.y_test) for m, lp in test_log_p.items()}
    ggn_leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(ggn_sum)]
    probs = {m: np.exp(np.asarray(lp, np.float64)) for m, lp in test_log_p.items()}
    return {
        "seed": seed, "train_prior_precision": train_prior, "n_fit": n,
        "n_validation": int(x_val.shape[0]), "n_test": int(data.x_test.shape[0]),
        "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(w_map))),
        "map_train_loss": train["loss"], "map_train_accuracy": train["accuracy"],
        "map_validation": map_val,
        "ggn_sum_total": float(sum(g.sum() for g in ggn_leaves)),
        "ggn_sum_zero_fraction": float(sum((g == 0).sum() for g in ggn_leaves)
                                       / sum(g.size for g in ggn_leaves)),
        "prior_grid": grid.tolist(), "validation_nll_curves": curves, "chosen": chosen,
        "test": test,
        "seconds": {"train_map": train_seconds, "ggn_diagonal": ggn_seconds,
                    "tuning": tuning_seconds, "test_predictives": predict_seconds},
        # for the pooled reliability diagram; not written to results.json
        "_confidence": {m: p.max(axis=1) for m, p in probs.items()},
        "_correct": {m: (p.argmax(axis=1) == data.y_test).astype(np.float64)
                     for m, p in probs.items()},
    }


# --- the script -------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="first PRNG seed (split, init; seed + 1: shuffling; seed + 2: "
                             "numpy's generator of the posterior draws)")
    parser.add_argument("--runs", type=int, default=3,
                        help="seeds to run, seed .. seed + runs - 1 (targets on the mean)")
    parser.add_argument("--results", default="results/laplace", help="results folder")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256],
                        help="hidden layer widths")
    parser.add_argument("--epochs", type=int, default=80, help="MAP training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="MAP training batch size")
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="Adam's initial step size (cosine-decayed to 0)")
    parser.add_argument("--train-priors", type=float, nargs="+", default=[0.01, 1.0],
                        help="prior precisions delta_0 of the MAP training (weight decay "
                             "delta_0 / N on the gradient), one MAP network each; the "
                             "target is on the first")
    parser.add_argument("--validation", type=int, default=269,
                        help="validation examples split off the training part")
    parser.add_argument("--samples", type=int, default=32,
                        help="Monte Carlo draws of the Laplace predictives")
    parser.add_argument("--grid", type=int, default=16,
                        help="prior precisions tried (log-spaced)")
    parser.add_argument("--prior-min", type=float, default=0.0,
                        help="log10 of the smallest prior precision tried")
    parser.add_argument("--prior-max", type=float, default=5.0,
                        help="log10 of the largest prior precision tried")
    parser.add_argument("--ggn-batch-size", type=int, default=256,
                        help="examples per diag_ggn call when summing over the training set")
    parser.add_argument("--quick", action="store_true",
                        help="toy size for the test suite (1 seed, one MAP, hidden 32, "
                             "3 epochs, 8 draws, 5 priors)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.hidden, args.epochs, args.samples, args.grid = 1, [32], 3, 8, 5
        args.train_priors = args.train_priors[:1]
        args.ggn_batch_size = 539  # the 1078 fitting examples in two batches, one compilation
    for name in ("runs", "epochs", "batch_size", "samples", "grid", "ggn_batch_size",
                 "validation"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.train_priors) <= 0:
        parser.error("--train-priors must be positive")
    enable_compilation_cache(args.compilation_cache)

    folder = results_dir(args.results)
    net = mlp(args.hidden)
    seeds = list(range(args.seed, args.seed + args.runs))
    priors = list(args.train_priors)
    start = time.perf_counter()
    runs = [run_seed(net, seed, prior, args) for prior in priors for seed in seeds]
    seconds = time.perf_counter() - start

    def of(prior):
        return [r for r in runs if r["train_prior_precision"] == prior]

    keys = ("accuracy", "nll", "ece", "brier", "mean_confidence")
    mean = {str(prior): {m: {k: float(np.mean([r["test"][m][k] for r in of(prior)]))
                             for k in keys} for m in METHODS} for prior in priors}
    pooled = {str(prior): {m: reliability_bins(
        np.concatenate([r["_confidence"][m] for r in of(prior)]),
        np.concatenate([r["_correct"][m] for r in of(prior)])) for m in METHODS}
        for prior in priors}

    for prior in priors:  # ECE of every seed's test predictions together (less noisy)
        for m in METHODS:
            bins = pooled[str(prior)][m]
            total = sum(b["count"] for b in bins)
            mean[str(prior)][m]["ece_pooled"] = float(sum(
                b["count"] / total * abs(b["accuracy"] - b["confidence"])
                for b in bins if b["count"]))
    first = mean[str(priors[0])]
    gap = first[GLM]["accuracy"] - first[MAP]["accuracy"]
    checks = {"nll_lower": first[GLM]["nll"] < first[MAP]["nll"],
              "ece_lower": first[GLM]["ece"] < first[MAP]["ece"],
              "accuracy_within_1_point": abs(gap) <= ACCURACY_TOLERANCE}
    met = all(checks.values())
    description = (f"Laplace (GLM) on the delta_0 = {priors[0]:g} MAP: test NLL and ECE "
                   f"below the MAP's, test accuracy within 1 point, mean over seeds")
    detail = (f"NLL {first[GLM]['nll']:.4f} vs {first[MAP]['nll']:.4f}, ECE "
              f"{first[GLM]['ece']:.4f} vs {first[MAP]['ece']:.4f}, accuracy "
              f"{first[GLM]['accuracy']:.4f} vs {first[MAP]['accuracy']:.4f}, "
              f"{len(seeds)} seed(s)")

    def seed_met(r):
        return bool(r["test"][GLM]["nll"] < r["test"][MAP]["nll"]
                    and r["test"][GLM]["ece"] < r["test"][MAP]["ece"]
                    and abs(r["test"][GLM]["accuracy"] - r["test"][MAP]["accuracy"])
                    <= ACCURACY_TOLERANCE)

    per_seed_met = {str(prior): [seed_met(r) for r in of(prior)] for prior in priors}
    public_runs = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    rows = []
    for r in runs:
        for m in METHODS:
            setting = r["chosen"].get(m, {})
            rows.append({"delta_0": r["train_prior_precision"], "seed": r["seed"],
                         "method": m, **r["test"][m],
                         "delta": ("MAP" if setting.get("chose_map") else
                                   setting.get("prior_precision", "")),
                         "T": setting.get("temperature", "")})
    mean_rows = [{"delta_0": prior, "method": m, **mean[str(prior)][m]}
                 for prior in priors for m in METHODS]
    write_json(folder / "results.json", {
        "experiment": "laplace", "seeds": seeds, "train_prior_precisions": priors,
        "hidden": args.hidden, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "samples": args.samples,
        "ece_bins": ECE_BINS, "backend": jax.default_backend(),
        "posterior": "diagonal: precision = sum over the fitting part of diag_ggn (batch "
                     "mean times batch size) + prior precision delta, delta tuned on the "
                     "validation NLL of each predictive",
        "target": {"description": description, "met": met, "checks": checks,
                   "train_prior_precision": priors[0],
                   "accuracy_tolerance": ACCURACY_TOLERANCE, "per_seed_met": per_seed_met},
        "mean": mean, "rows": rows, "runs": public_runs, "reliability_pooled": pooled,
        "seconds_total": seconds,
    })
    save_figure(plot_reliability(pooled, mean, priors), folder / "reliability.png")
    save_figure(plot_tuning(runs, priors), folder / "tuning.png")
    print(table(rows, ["delta_0", "seed", "method", "accuracy", "nll", "ece", "brier",
                       "delta", "T"]))
    print("\nmeans over seeds:")
    print(table(mean_rows, ["delta_0", "method", "accuracy", "nll", "ece", "ece_pooled",
                            "brier", "mean_confidence"]))
    print(f"\n{len(runs)} MAP network(s) and their Laplace approximations in {seconds:.1f} s "
          f"(compilation included)")
    print(target_line(description, met, detail))
    print(f"\nwrote {folder / 'results.json'}, {folder / 'reliability.png'} and "
          f"{folder / 'tuning.png'}")
    return {"mean": mean, "runs": public_runs, "met": met, "checks": checks,
            "seconds": seconds}


def plot_reliability(pooled, mean, priors):
    plt = pyplot()
    methods = [MAP, GLM, SAMPLING, LAST_LAYER]
    figure, axes = plt.subplots(2 * len(priors), len(methods),
                                figsize=(3.4 * len(methods), 4.4 * len(priors)),
                                gridspec_kw={"height_ratios": [3, 1] * len(priors)},
                                sharex=True, squeeze=False)
    width = 1.0 / ECE_BINS
    for row, prior in enumerate(priors):
        for column, method in enumerate(methods):
            top, bottom = axes[2 * row, column], axes[2 * row + 1, column]
            bins = pooled[str(prior)][method]
            full = [b for b in bins if b["count"]]
            top.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width,
                    align="edge", color="tab:blue", edgecolor="k", linewidth=0.5,
                    label="accuracy")
            top.bar([b["lo"] for b in full], [b["confidence"] - b["accuracy"] for b in full],
                    bottom=[b["accuracy"] for b in full], width=width, align="edge",
                    fill=False, hatch="///", edgecolor="tab:red", linewidth=0.5,
                    label="gap to mean confidence")
            top.plot([0, 1], [0, 1], "k--", linewidth=1)
            numbers = mean[str(prior)][method]
            top.set_title(f"{method}, delta_0 = {prior:g}\nECE {numbers['ece']:.4f}, "
                          f"NLL {numbers['nll']:.3f}", fontsize=9)
            top.set_xlim(0, 1)
            top.set_ylim(0, 1)
            total = sum(b["count"] for b in bins)
            bottom.bar([b["lo"] for b in bins], [b["count"] / total for b in bins],
                       width=width, align="edge", color="tab:gray", edgecolor="k",
                       linewidth=0.5)
            bottom.set_yscale("log")
            bottom.set_ylim(0.5 / total, 1.5)
            if row == len(priors) - 1:
                bottom.set_xlabel("confidence (max probability)")
            if column == 0:
                top.set_ylabel("accuracy in bin")
                bottom.set_ylabel("share")
                top.legend(loc="upper left", fontsize=7)
    figure.suptitle("reliability on the test part, 15 bins (every seed's test images pooled; "
                    "ECE and NLL: means over seeds)", fontsize=10)
    figure.tight_layout()
    return figure


def plot_tuning(runs, priors):
    plt = pyplot()
    figure, axes = plt.subplots(1, len(priors), figsize=(6 * len(priors), 4.2), squeeze=False)
    colors = {GLM: "tab:blue", SAMPLING: "tab:orange", LAST_LAYER: "tab:green"}
    for axis, prior in zip(axes[0], priors):
        mine = [r for r in runs if r["train_prior_precision"] == prior]
        for k, r in enumerate(mine):
            for method, curve in r["validation_nll_curves"].items():
                axis.plot(r["prior_grid"], curve, color=colors[method], alpha=0.8,
                          label=method if k == 0 else None)
                best = r["chosen"][method]
                if not best["chose_map"]:  # (the MAP itself: on the dashed line, no dot)
                    axis.plot(best["prior_precision"], best["validation_nll"], "o",
                              color=colors[method])
            axis.axhline(r["map_validation"]["nll"], color="k", linestyle="--", linewidth=1,
                         label="MAP" if k == 0 else None)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("prior precision delta of the Laplace approximation")
        axis.set_ylabel("validation NLL")
        axis.set_title(f"MAP trained with delta_0 = {prior:g} (one line per seed; dots: "
                       f"chosen; none: the MAP won)", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
