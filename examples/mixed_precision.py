"""Mixed precision, measured: one NumPy MLP trained with AdamW in five storage modes.

The same network (sklearn's digits, 64 -> 32 -> 10, ReLU, softmax cross-entropy), the same
initial weights and the same full-batch AdamW steps, in five storage/compute modes:

- ``fp32``: float32 params, grads and AdamW states; the model computes in float32 (the
  reference the others are measured against).
- ``bf16``: naive bfloat16. Params, grads and states are all ``ml_dtypes.bfloat16``, every
  store rounds to nearest even (torch fused's all-bf16 behaviour). An update smaller than half
  a bf16 ulp of its weight is lost.
- ``bf16_sr``: the same arrays, params stored with stochastic rounding
  (``stochastic_rounding=(seed, step)``): a small update lands with the probability of its
  size in ulps, so it survives on average.
- ``bf16_kahan``: the same arrays plus a bfloat16 compensation array per param
  (``compensation=``), which keeps the rounding error of each store and adds it back next step.
- ``master``: fp32 master weights. float32 params and states, bfloat16 grads; the model
  computes with the bfloat16 copy that the update writes in the same pass (``param_copies=``).

In every bf16 mode the forward and backward passes really compute in bfloat16, as autocast
does on a bf16 model: the weights and the layer inputs are bfloat16, each matrix product
accumulates in float32 and rounds its output to bfloat16 (activations, the gradient flowing
back, the weight and bias gradients), and only the softmax cross-entropy runs in float32.
The float32 mode computes everything in float32.

The learning rate is small against the weights, which is where naive bf16 stalls: Adam moves
a weight by at most about ``lr = 3e-4`` per step, and every weight of magnitude 0.125 or more
(about half of them, He-initialised with standard deviation 0.18 and 0.25) has a bfloat16
half-ulp of 4.9e-4 or more, so round to nearest never moves it.

A sixth mode, not one of the issue's, keeps AdamW's states in float32 with stochastic
rounding of bf16 params, to tell the rounding of the params from that of the states. A
bfloat16 ``exp_avg_sq`` stops following the squared gradients after a few hundred steps: a
step changes it by ``(1 - beta2) * (grad**2 - exp_avg_sq)``, 0.1% of its size, under its
half-ulp (0.2-0.4%) unless ``grad**2`` is several times ``exp_avg_sq``. So it never decays, and
its growth from zero stalls near step 2**8 while the bias correction keeps growing.

The study runs three seeds (``--seeds``); each seed has its own train/test split, initial
weights and stochastic-rounding keys. Outputs: on stdout, a table for the first seed (final
training loss, % gap to fp32's, the step at which fp32 had that loss, train and test accuracy,
the share of weights that moved) and the gap to fp32 seed by seed; ``mixed_precision.png`` in
``--out`` (the first seed's loss curves, log scale, and each mode's gap to fp32 along the
way). ``main(argv)`` returns the results as a dict (``--json FILE`` writes it too).

    python examples/mixed_precision.py --out docs/img     # 15 s on an idle 2-core machine
    python examples/mixed_precision.py --quick --out /tmp  # 200 steps, one seed: ~2 s
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

BF16 = np.dtype(ml_dtypes.bfloat16)

# ---------------------------------------------------------------------------------------------
# Data: examples are COLUMNS (X.shape == (n_features, m)), as in train_mlp.py.


def load_digits(seed: int):
    """X_train, Y_train, X_test, Y_test (float32; Y one-hot (10, m)); an 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    X, y = digits.data / 16.0, digits.target  # multiples of 1/16: exact in bfloat16
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    X = np.ascontiguousarray(X.T, dtype=np.float32)
    Y = np.eye(10, dtype=np.float32)[:, y]
    return X[:, train], Y[:, train], X[:, test], Y[:, test]


# ---------------------------------------------------------------------------------------------
# The network: params [W1, b1, W2, b2]; W_l is (n_l, n_{l-1}), b_l (n_l, 1).


def init_params(layer_dims: list[int], seed: int) -> list[np.ndarray]:
    """He initialisation (W ~ N(0, 2 / fan_in), b = 0), in float32."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(layer_dims[:-1], layer_dims[1:]):
        params.append((rng.standard_normal((fan_out, fan_in)) * math.sqrt(2.0 / fan_in))
                      .astype(np.float32))
        params.append(np.zeros((fan_out, 1), np.float32))
    return params


def _keep(x: np.ndarray) -> np.ndarray:
    return x


def _bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (nearest even), kept as float32 values for the arithmetic."""
    return x.astype(BF16).astype(np.float32)


def forward(weights: list[np.ndarray], X: np.ndarray, low: bool):
    """Softmax probabilities (float32) and the cache for backward. ``weights`` are float32
    arrays; with ``low`` they hold bfloat16 values and every layer output is rounded to
    bfloat16 after its float32 accumulation."""
    rnd = _bf16 if low else _keep
    A, cache = rnd(X), []
    n_layers = len(weights) // 2
    for l in range(n_layers):
        W, b = weights[2 * l], weights[2 * l + 1]
        Z = rnd(W @ A + b)
        cache.append((A, Z))
        A = np.maximum(Z, 0) if l < n_layers - 1 else Z
    E = np.exp(A - A.max(axis=0, keepdims=True))  # softmax in float32 (autocast does too)
    return E / E.sum(axis=0, keepdims=True), cache


def cross_entropy(P: np.ndarray, Y: np.ndarray) -> float:
    return float(-(Y * np.log(np.maximum(P, 1e-30))).sum(dtype=np.float64) / Y.shape[1])


def backward(weights, cache, P, Y, low: bool) -> list[np.ndarray]:
    """Gradients of the mean cross-entropy, in the order of the weights. With ``low`` each
    gradient (flowing back, and of every weight) is rounded to bfloat16 as it is produced."""
    rnd = _bf16 if low else _keep
    m = Y.shape[1]
    grads: list[np.ndarray] = [None] * len(weights)  # type: ignore[list-item]
    dZ = rnd((P - Y) / np.float32(m))
    for l in reversed(range(len(weights) // 2)):
        A_prev, _ = cache[l]
        grads[2 * l] = rnd(dZ @ A_prev.T)
        grads[2 * l + 1] = rnd(dZ.sum(axis=1, keepdims=True))
        if l > 0:
            dZ = rnd(weights[2 * l].T @ dZ) * (cache[l - 1][1] > 0)
    return grads


def accuracy(P: np.ndarray, Y: np.ndarray) -> float:
    return float((P.argmax(axis=0) == Y.argmax(axis=0)).mean())


# ---------------------------------------------------------------------------------------------
# The modes


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    params: np.dtype        # storage of params
    grads: np.dtype         # storage of grads; bfloat16 means the model computes in bfloat16
    states: np.dtype        # storage of AdamW's exp_avg and exp_avg_sq
    option: str | None      # None, "stochastic_rounding", "compensation" or "param_copies"


FP32 = np.dtype(np.float32)
MODES = [
    Mode("fp32", "fp32", FP32, FP32, FP32, None),
    Mode("bf16", "bf16, round to nearest", BF16, BF16, BF16, None),
    Mode("bf16_sr", "bf16 + stochastic rounding", BF16, BF16, BF16, "stochastic_rounding"),
    Mode("bf16_kahan", "bf16 + Kahan compensation", BF16, BF16, BF16, "compensation"),
    Mode("master", "fp32 master weights, bf16 model", FP32, BF16, FP32, "param_copies"),
    # Not one of the four: stochastic rounding with float32 states, to tell the
    # rounding of the params from that of the states.
    Mode("bf16_sr_fp32_states", "bf16 + SR, fp32 states", BF16, BF16, FP32,
         "stochastic_rounding"),
]


class Model:
    """One mode's arrays: params, AdamW states, and the option's arrays."""

    def __init__(self, mode: Mode, init: list[np.ndarray], seed: int) -> None:
        self.mode, self.seed = mode, seed
        self.low = mode.grads == BF16
        self.params = [p.astype(mode.params) for p in init]
        self.exp_avgs = [np.zeros(p.shape, mode.states) for p in self.params]
        self.exp_avg_sqs = [np.zeros(p.shape, mode.states) for p in self.params]
        self.extra = None
        if mode.option == "compensation":
            self.extra = [np.zeros(p.shape, BF16) for p in self.params]
        elif mode.option == "param_copies":
            self.extra = [p.astype(BF16) for p in self.params]

    def weights(self) -> list[np.ndarray]:
        """What the model computes with, as float32 arrays: the params, or their bf16 copy."""
        source = self.extra if self.mode.option == "param_copies" else self.params
        return [w.astype(np.float32) for w in source]

    def step(self, grads: list[np.ndarray], step: int, lr: float, weight_decay: float) -> None:
        options = {}
        if self.mode.option == "stochastic_rounding":
            options["stochastic_rounding"] = (self.seed, step)
        elif self.mode.option is not None:
            options[self.mode.option] = self.extra
        fastoptim.adamw_(self.params, [g.astype(self.mode.grads) for g in grads],
                         self.exp_avgs, self.exp_avg_sqs, step=step, lr=lr,
                         weight_decay=weight_decay, **options)


def train(mode: Mode, data, layer_dims, steps: int, lr: float, weight_decay: float,
          seed: int) -> dict:
    X, Y, X_test, Y_test = data
    model = Model(mode, init_params(layer_dims, seed), seed)
    initial = model.weights()
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        weights = model.weights()
        P, cache = forward(weights, X, model.low)
        losses.append(cross_entropy(P, Y))  # the loss of the weights before this step
        model.step(backward(weights, cache, P, Y, model.low), step, lr, weight_decay)
    seconds = time.perf_counter() - t0
    weights = model.weights()
    P = forward(weights, X, model.low)[0]
    losses.append(cross_entropy(P, Y))
    changed = sum(int((w != w0).sum()) for w, w0 in zip(weights, initial))
    return {
        "label": mode.label,
        "loss": losses[-1],
        "train_accuracy": accuracy(P, Y),
        "test_accuracy": accuracy(forward(weights, X_test, model.low)[0], Y_test),
        "weights_changed": changed / sum(w.size for w in weights),
        "seconds": seconds,
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# The picture


def save_png(fig, path: Path, dpi: int) -> None:
    """Saves ``fig`` as a 256-colour PNG (an octree palette keeps every line colour)."""
    from PIL import Image  # a matplotlib dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True)


# fp32 is a wide grey band under the others: a mode that tracks it is drawn on top of it.
STYLES = {"fp32": dict(color="0.6", lw=4.5, zorder=1), "bf16": dict(color="C3", lw=1.6),
          "bf16_sr": dict(color="C0", lw=1.6), "bf16_kahan": dict(color="C2", lw=1.6, ls="--"),
          "master": dict(color="C1", lw=1.6),
          "bf16_sr_fp32_states": dict(color="C4", lw=1.2, ls="-.")}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(13, 6), layout="constrained")
    reference = np.asarray(results["fp32"]["losses"])
    for key, r in results.items():
        losses = np.asarray(r["losses"])
        steps = np.arange(len(losses))
        ax_loss.plot(steps, losses, label=f"{r['label']}: {r['loss']:.4f}", **STYLES[key])
        if key != "fp32":
            ax_gap.plot(steps, 100 * (losses / reference - 1), **STYLES[key])
    ax_loss.set(xlabel="AdamW step (full batch)", ylabel="training loss (cross-entropy)",
                yscale="log", title="Training loss")
    # One legend for both panels, below them: it covers no curve.
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=10, frameon=False, title="mode: final training loss",
               title_fontsize=10)
    ax_gap.axhspan(-1, 1, color="0.85", zorder=0, label="within 1% of fp32")
    ax_gap.axhline(0, color="black", lw=1.2)
    ax_gap.set_yscale("symlog", linthresh=1)  # linear within +-1%, logarithmic outside
    ax_gap.set(xlabel="AdamW step (full batch)", ylabel="loss / fp32's loss - 1 (%)",
               title="Gap to fp32's loss at the same step")
    ax_gap.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax_gap.legend(loc="upper left", fontsize=10)
    for ax in (ax_loss, ax_gap):
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=12)
    save_png(fig, path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def one_blas_thread():
    """The products here are small (64 x 1437): BLAS threads only add synchronisation, which
    costs several times the work on a busy machine. threadpoolctl comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="full-batch AdamW steps per mode (default 1500; --quick: 200)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay (default 0)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed of the split, the initial weights and stochastic rounding")
    p.add_argument("--seeds", type=int, default=None,
                   help="how many seeds (--seed, --seed + 1, ...; default 3, --quick: 1); the "
                        "picture and the first table show the first")
    p.add_argument("--quick", action="store_true", help="a short run (for tests and CI)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the results (what main() returns) to this JSON file")
    return p.parse_args(argv)


def study(seed: int, steps: int, hidden: int, lr: float, weight_decay: float) -> dict:
    """Every mode trained on the split, initial weights and rounding keys of ``seed``."""
    X, Y, X_test, Y_test = load_digits(seed)
    layer_dims = [X.shape[0], hidden, 10]
    with one_blas_thread():
        results = {mode.key: train(mode, (X, Y, X_test, Y_test), layer_dims, steps, lr,
                                   weight_decay, seed) for mode in MODES}
    reference = results["fp32"]["losses"]
    for r in results.values():
        r["gap_percent"] = 100 * (r["loss"] / reference[-1] - 1)
        # The first step at which fp32 had this loss: how far behind fp32 the mode ended.
        reached = np.flatnonzero(np.asarray(reference) <= r["loss"])
        r["fp32_step_with_this_loss"] = int(reached[0]) if len(reached) else None
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (200 if args.quick else 1500)
    n_seeds = args.seeds or (1 if args.quick else 3)
    if (steps < 1 or args.hidden < 1 or n_seeds < 1 or not args.lr > 0
            or not args.weight_decay >= 0):
        raise SystemExit("--steps, --hidden and --seeds must be >= 1, --lr > 0, "
                         "--weight-decay >= 0")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + n_seeds))
    layer_dims = [64, args.hidden, 10]
    setup = (f"digits, layers {layer_dims}, {steps} full-batch AdamW steps, lr {args.lr:g}, "
             f"weight decay {args.weight_decay:g}")
    print(f"fastoptim {fastoptim.__version__} ({fastoptim.backend_info()['isa']}): {setup}, "
          f"seeds {seeds}", file=sys.stderr)
    per_seed = [study(seed, steps, args.hidden, args.lr, args.weight_decay) for seed in seeds]
    results = per_seed[0]  # the table's and the picture's run
    for key, r in results.items():
        r["seeds"] = {name: [other[key][name] for other in per_seed]
                      for name in ("loss", "gap_percent", "test_accuracy")}
        r["gap_percent_mean"] = float(np.mean(r["seeds"]["gap_percent"]))

    print(f"seed {seeds[0]}:")
    header = (f"{'mode':<34}{'final loss':>11}{'vs fp32':>10}{'fp32 step':>11}"
              f"{'train acc':>11}{'test acc':>10}{'moved':>8}{'time':>8}")
    print(header)
    print("-" * len(header))
    for r in results.values():
        at = r["fp32_step_with_this_loss"]
        print(f"{r['label']:<34}{r['loss']:>11.5f}{r['gap_percent']:>+9.2f}%"
              f"{'(below)' if at is None else at:>11}"
              f"{100 * r['train_accuracy']:>10.1f}%{100 * r['test_accuracy']:>9.1f}%"
              f"{100 * r['weights_changed']:>7.0f}%{r['seconds']:>6.1f} s")
    print(f"fp32 step: the first of fp32's {steps} steps after which its loss was as low "
          "('(below)': none)\nmoved: the share of the weights the model computes with that "
          "differ from their initial values")
    if len(seeds) > 1:
        print(f"\nfinal loss vs fp32's, seed by seed (each seed: its own split, initial "
              "weights and rounding keys):")
        header = f"{'mode':<34}" + "".join(f"{f'seed {s}':>10}" for s in seeds) + f"{'mean':>10}"
        print(header)
        print("-" * len(header))
        for r in results.values():
            print(f"{r['label']:<34}" + "".join(f"{g:>+9.2f}%" for g in r["seeds"]["gap_percent"])
                  + f"{r['gap_percent_mean']:>+9.2f}%")

    figure = args.out / "mixed_precision.png"
    plot(results, figure, f"AdamW on {setup}, seed {seeds[0]}")
    summary = {"steps": steps, "lr": args.lr, "weight_decay": args.weight_decay,
               "seeds": seeds, "layer_dims": layer_dims, "figure": str(figure),
               "runs": results}
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"wrote {figure}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
