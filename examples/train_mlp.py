"""Train a small NumPy MLP with every fastoptim optimizer and compare them.

The network is written out by hand: ReLU hidden layers, a sigmoid (2 classes) or softmax output,
cross-entropy loss, and backpropagation in a dozen lines of NumPy. Examples are COLUMNS
(``X.shape == (n_features, m)``), the deeplearning.ai course's layout, so mini-batches are cut
along ``axis=1`` with :func:`fastoptim.data.iter_mini_batches`.

Every run starts from the same initial weights and (for the same batch size) sees the same
sequence of mini-batches; only the update rule changes. The updates are fastoptim's stateful
classes (``fastoptim.optim.SGD``, ``Adam``, ...), whose ``step`` makes one fused in-place call
for all the weight arrays; learning-rate decay comes from :mod:`fastoptim.schedules`, passed as
the optimizer's ``lr``. The progress bar shows the running mean of the noisy per-batch loss,
a bias-corrected :class:`fastoptim.ema.EMA`.

Outputs (in ``--out``): ``mlp_loss_curves.png`` and ``mlp_decision_boundaries.png`` (2-D data
only). ``main(argv)`` returns the results as a dict (``--json FILE`` also writes it): per run
the final training loss, accuracies, steps, seconds and the loss after every epoch. A table
goes to stdout and a progress bar to stderr.

    python examples/train_mlp.py --out docs/img              # make_moons, ~10 s
    python examples/train_mlp.py --quick --out /tmp/mlp      # a few seconds
    python examples/train_mlp.py --dataset digits --out /tmp/mlp
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

from fastoptim import optim
from fastoptim import schedules as S
from fastoptim.data import iter_mini_batches
from fastoptim.ema import EMA

# ---------------------------------------------------------------------------------------------
# Data


def load_dataset(name: str, seed: int):
    """Returns X_train, Y_train, X_test, Y_test with examples as columns, and n_classes.

    Y is (1, m) of 0/1 for two classes, (n_classes, m) one-hot otherwise.
    """
    if name == "moons":
        from sklearn.datasets import make_moons
        X, y = make_moons(n_samples=400, noise=0.2, random_state=seed)
        n_classes = 2
    elif name == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        X, y = digits.data / 16.0, digits.target
        n_classes = 10
    else:
        raise ValueError(f"unknown dataset {name!r}")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    X = np.ascontiguousarray(X.T, dtype=np.float64)
    if n_classes == 2:
        Y = y[None, :].astype(np.float64)
    else:
        Y = np.eye(n_classes)[:, y]
    return X[:, train], Y[:, train], X[:, test], Y[:, test], n_classes


# ---------------------------------------------------------------------------------------------
# The network: parameters are the list [W1, b1, W2, b2, ...]; W_l is (n_l, n_{l-1}), b_l (n_l, 1).


def init_params(layer_dims: list[int], seed: int) -> list[np.ndarray]:
    """He initialisation: W ~ N(0, 2 / fan_in), b = 0."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(layer_dims[:-1], layer_dims[1:]):
        params.append(rng.standard_normal((fan_out, fan_in)) * math.sqrt(2.0 / fan_in))
        params.append(np.zeros((fan_out, 1)))
    return params


def forward(params: list[np.ndarray], X: np.ndarray):
    """Returns the output probabilities and the cache for backward."""
    A, cache = X, []
    n_layers = len(params) // 2
    for l in range(n_layers):
        W, b = params[2 * l], params[2 * l + 1]
        Z = W @ A + b
        cache.append((A, Z))
        if l < n_layers - 1:
            A = np.maximum(Z, 0.0)
        elif W.shape[0] == 1:
            A = 1.0 / (1.0 + np.exp(-Z))
        else:
            E = np.exp(Z - Z.max(axis=0, keepdims=True))
            A = E / E.sum(axis=0, keepdims=True)
    return A, cache


def cross_entropy(P: np.ndarray, Y: np.ndarray) -> float:
    P = np.clip(P, 1e-12, 1 - 1e-12)
    m = Y.shape[1]
    if Y.shape[0] == 1:
        return float(-(Y * np.log(P) + (1 - Y) * np.log(1 - P)).sum() / m)
    return float(-(Y * np.log(P)).sum() / m)


def backward(params: list[np.ndarray], cache, P: np.ndarray, Y: np.ndarray) -> list[np.ndarray]:
    """Gradients of the mean cross-entropy, in the order of ``params``.

    For a sigmoid + binary cross-entropy or softmax + cross-entropy output, dL/dZ = P - Y.
    """
    m = Y.shape[1]
    grads: list[np.ndarray] = [None] * len(params)  # type: ignore[list-item]
    dZ = P - Y
    for l in reversed(range(len(params) // 2)):
        A_prev, _ = cache[l]
        grads[2 * l] = dZ @ A_prev.T / m
        grads[2 * l + 1] = dZ.sum(axis=1, keepdims=True) / m
        if l > 0:
            dZ = (params[2 * l].T @ dZ) * (cache[l - 1][1] > 0)
    return grads


def accuracy(params, X, Y) -> float:
    P, _ = forward(params, X)
    if Y.shape[0] == 1:
        return float(((P > 0.5) == (Y > 0.5)).mean())
    return float((P.argmax(axis=0) == Y.argmax(axis=0)).mean())


# ---------------------------------------------------------------------------------------------
# The runs


@dataclass
class Run:
    key: str
    label: str
    batch_size: int | None  # None: the whole training set (batch gradient descent)
    make: Callable[[list[np.ndarray], int, int], optim.Optimizer]  # (params, steps/epoch, epochs)


def runs_for(batch_size: int) -> list[Run]:
    """The configurations compared. Learning rates were tuned by hand on make_moons."""
    return [
        Run("gd", "batch GD", None, lambda p, n, e: optim.SGD(p, lr=0.5)),
        Run("minibatch_gd", "mini-batch GD", batch_size, lambda p, n, e: optim.SGD(p, lr=0.1)),
        Run("sgd", "SGD (batch 1)", 1, lambda p, n, e: optim.SGD(p, lr=0.01)),
        Run("momentum", "momentum", batch_size,
            lambda p, n, e: optim.SGD(p, lr=0.1, momentum=0.9)),
        Run("rmsprop", "RMSprop", batch_size, lambda p, n, e: optim.RMSprop(p, lr=0.003)),
        Run("adam", "Adam", batch_size, lambda p, n, e: optim.Adam(p, lr=0.01)),
        Run("adagrad", "Adagrad", batch_size, lambda p, n, e: optim.Adagrad(p, lr=0.1)),
        Run("adadelta", "Adadelta", batch_size, lambda p, n, e: optim.Adadelta(p, lr=1.0)),
        # Learning-rate decay: the course's fixed-interval inverse-time decay, once per epoch...
        Run("minibatch_gd_decay", "mini-batch GD + decay", batch_size,
            lambda p, n, e: optim.SGD(p, lr=S.PerEpoch(
                S.InverseTimeDecay(0.3, 1.0, time_interval=max(1, e // 5), staircase=True), n))),
        Run("momentum_decay", "momentum + step decay", batch_size,
            lambda p, n, e: optim.SGD(p, momentum=0.9, lr=S.MultiStepDecay(
                0.2, [n * e // 2, n * e * 3 // 4], gamma=0.3))),
        # ... and a per-update warmup + cosine decay.
        Run("adam_decay", "Adam + warmup/cosine", batch_size,
            lambda p, n, e: optim.Adam(p, lr=S.Warmup(
                S.CosineDecay(0.03, max(1, n * e - n * e // 10), min_lr=1e-4),
                max(1, n * e // 10)))),
    ]


class Progress:
    """A one-line text progress bar on stderr (no dependency). When stderr is not a terminal
    only the finished bar is written, once per run."""

    def __init__(self, label: str, total: int, enabled: bool, width: int = 24) -> None:
        self.label, self.total, self.width = label, total, width
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.every = max(1, total // 50)

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled or done != self.total and (not self.live or done % self.every):
            return
        filled = self.width * done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r  {self.label:<24} [{bar}] {100 * done // self.total:3d}%  {note}")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(run: Run, data, layer_dims, epochs: int, seed: int, progress: bool) -> dict:
    X, Y, X_test, Y_test = data
    m = X.shape[1]
    batch = m if run.batch_size is None else run.batch_size
    steps_per_epoch = -(-m // batch)
    params = init_params(layer_dims, seed)
    opt = run.make(params, steps_per_epoch, epochs)
    rng = np.random.default_rng(seed + 1)  # one generator: a new permutation every epoch
    smooth = EMA(0.9)                        # bias-corrected running mean of the batch loss
    history = {"epoch": [0], "step": [0], "loss": [cross_entropy(forward(params, X)[0], Y)],
               "batch_loss_ema": [float("nan")]}
    bar = Progress(run.label, epochs, progress)
    steps, seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for Xb, Yb in iter_mini_batches(X, Y, batch, seed=rng, axis=1):
            P, cache = forward(params, Xb)
            opt.step(backward(params, cache, P, Yb))
            smooth.update(cross_entropy(P, Yb))
            steps += 1
        seconds += time.perf_counter() - t0
        loss = cross_entropy(forward(params, X)[0], Y)
        history["epoch"].append(epoch)
        history["step"].append(steps)
        history["loss"].append(loss)
        history["batch_loss_ema"].append(smooth.value)
        bar.update(epoch, f"epoch {epoch}/{epochs}  batch loss (EMA) {smooth.value:.4f}")
    lr = opt.param_groups[0]["lr"]
    return {
        "label": run.label,
        "optimizer": repr_optimizer(opt),
        "optimizer_short": repr_optimizer(opt, short=True),
        "batch_size": batch,
        "steps_per_epoch": steps_per_epoch,
        "steps": steps,
        "loss": history["loss"][-1],
        "train_accuracy": accuracy(params, X, Y),
        "test_accuracy": accuracy(params, X_test, Y_test),
        "seconds": seconds,
        "history": history,
        "params": params,
        "lr_trace": [lr(t) for t in range(steps)] if callable(lr) else [lr] * steps,
    }


def repr_optimizer(opt: optim.Optimizer, short: bool = False) -> str:
    """``SGD(lr=0.1, momentum=0.9)``; with ``short``, a schedule by its class names."""
    group = opt.param_groups[0]
    shown = {k: group[k] for k in ("lr", "momentum") if k in group}
    if "momentum" in shown and not shown["momentum"]:
        del shown["momentum"]
    text = {k: repr(v) for k, v in shown.items()}
    if short and callable(shown["lr"]):
        text["lr"] = _schedule_name(shown["lr"])
    return f"{type(opt).__name__}(" + ", ".join(f"{k}={v}" for k, v in text.items()) + ")"


def _schedule_name(lr) -> str:
    inner = getattr(lr, "schedule", None)
    name = type(lr).__name__
    return f"{name}({_schedule_name(inner)})" if inner is not None else name


# ---------------------------------------------------------------------------------------------
# Figures


def save_png(fig, path: Path, dpi: int) -> None:
    """Saves ``fig`` as a 256-colour PNG (an octree palette keeps every line colour): a third
    of the bytes of a full-colour one, no visible difference for line art."""
    from PIL import Image  # a matplotlib dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True)


def plot_losses(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), layout="constrained")
    # A decayed run has the colour of its constant-lr twin, dashed.
    colors = {}
    for key in results:
        colors.setdefault(key.replace("_decay", ""), f"C{len(colors) % 10}")
    for key, r in results.items():
        h = r["history"]
        style = dict(color=colors[key.replace("_decay", "")], lw=1.4,
                     ls="--" if key.endswith("_decay") else "-")
        axes[0].plot(h["epoch"], h["loss"], label=r["label"], **style)
        axes[1].plot(np.maximum(h["step"], 1), h["loss"], **style)
        if key.endswith("_decay"):
            lr = r["lr_trace"]
            axes[2].plot(np.arange(len(lr)) / r["steps_per_epoch"], lr, **style)
    axes[0].set(xlabel="epoch", ylabel="training loss (full training set)", yscale="log",
                title="Loss per epoch")
    axes[1].set(xlabel="update step (log scale)", xscale="log", yscale="log",
                ylabel="training loss (full training set)",
                title="Loss per update step: SGD takes many more")
    axes[2].set(xlabel="epoch", ylabel="learning rate",
                title="The three decay schedules (fastoptim.schedules)")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    # One legend for the three panels, below them: it covers no curve.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=6,
               fontsize=10, frameon=False, title="solid: constant learning rate;  "
               "dashed: the same optimizer with learning-rate decay", title_fontsize=10)
    save_png(fig, path, dpi=150)
    plt.close(fig)


# Class colours: the same hue for a class's points (dark) and the region predicted as that
# class (light), so a point on a region of another colour is a misclassified one.
CLASS_COLORS = {"point": ["#1f5fa8", "#d9541a"], "region": ["#c6dbef", "#fdd9bf"]}


def plot_boundaries(results: dict, data, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    X, Y = data[0], data[1]
    labels = (Y[0] > 0.5).astype(int)
    pad = 0.5
    xs = np.linspace(X[0].min() - pad, X[0].max() + pad, 200)
    ys = np.linspace(X[1].min() - pad, X[1].max() + pad, 200)
    gx, gy = np.meshgrid(xs, ys)
    grid = np.ascontiguousarray(np.stack([gx.ravel(), gy.ravel()]))
    n = len(results)
    cols = 4
    rows = -(-(n + 1) // cols)  # one more cell for the key
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False,
                             layout="constrained")
    fig.suptitle("Decision regions after training, with the training points", fontsize=14)
    for ax, r in zip(axes.ravel(), results.values()):
        P = forward(r["params"], grid)[0].reshape(gx.shape)
        ax.contourf(gx, gy, P, levels=[0, 0.5, 1], colors=CLASS_COLORS["region"])
        ax.contour(gx, gy, P, levels=[0.5], colors="0.25", linewidths=0.8)
        for c in (0, 1):
            ax.scatter(X[0, labels == c], X[1, labels == c], color=CLASS_COLORS["point"][c],
                       s=9, edgecolors="white", linewidths=0.3)
        ax.set_title(f"{r['label']}\ntrain loss {r['loss']:.3f}, "
                     f"train acc {100 * r['train_accuracy']:.1f}%", fontsize=10.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    key = axes.ravel()[n]
    handles = [Line2D([], [], ls="none", marker="o", color=CLASS_COLORS["point"][c], ms=6)
               for c in (0, 1)]
    handles += [Patch(fc=CLASS_COLORS["region"][c], ec="0.6") for c in (0, 1)]
    handles.append(Line2D([], [], color="0.25", lw=0.8))
    key.legend(handles, ["class 0 (training point)", "class 1 (training point)",
                         "predicted class 0", "predicted class 1", "decision boundary (p = 0.5)"],
               loc="center", fontsize=10, frameon=False,
               title="a point on the other colour\nis misclassified", title_fontsize=10)
    save_png(fig, path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["moons", "digits"], default="moons")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: moons 300, digits 20; --quick: 60 / 3)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a short run (for tests and CI)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the results (what main() returns) to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    epochs = args.epochs or {("moons", False): 300, ("moons", True): 60,
                             ("digits", False): 20, ("digits", True): 3}[(args.dataset, args.quick)]
    if epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    X, Y, X_test, Y_test, n_classes = load_dataset(args.dataset, args.seed)
    data = (X, Y, X_test, Y_test)
    layer_dims = [X.shape[0], 16, 8, 1] if n_classes == 2 else [X.shape[0], 32, n_classes]

    print(f"fastoptim {fastoptim.__version__} ({fastoptim.backend_info()['isa']}): "
          f"{args.dataset}, {X.shape[1]} training / {X_test.shape[1]} test examples, "
          f"layers {layer_dims}, {epochs} epochs", file=sys.stderr)
    results = {}
    for run in runs_for(args.batch_size):
        r = train(run, data, layer_dims, epochs, args.seed, not args.no_progress)
        results[run.key] = r

    header = (f"{'run':<24}{'optimizer':<40}{'batch':>6}{'steps':>8}{'loss':>9}"
              f"{'train acc':>11}{'test acc':>10}{'time':>9}")
    print(header)
    print("-" * len(header))
    for r in results.values():
        print(f"{r['label']:<24}{r['optimizer_short'][:39]:<40}{r['batch_size']:>6}{r['steps']:>8}"
              f"{r['loss']:>9.4f}{100 * r['train_accuracy']:>10.1f}%"
              f"{100 * r['test_accuracy']:>9.1f}%{r['seconds']:>7.2f} s")

    figures = {"loss_curves": str(args.out / "mlp_loss_curves.png")}
    plot_losses(results, Path(figures["loss_curves"]))
    if X.shape[0] == 2:
        figures["decision_boundaries"] = str(args.out / "mlp_decision_boundaries.png")
        plot_boundaries(results, data, Path(figures["decision_boundaries"]))

    summary = {
        "dataset": args.dataset, "epochs": epochs, "seed": args.seed,
        "layer_dims": layer_dims, "n_train": int(X.shape[1]), "n_test": int(X_test.shape[1]),
        "figures": figures,
        "runs": {k: {name: v for name, v in r.items() if name not in ("params", "lr_trace")}
                 for k, r in results.items()},
    }
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    for name, path in figures.items():
        print(f"wrote {path}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
