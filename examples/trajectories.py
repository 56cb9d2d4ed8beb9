"""Optimizer paths on classic 2-D test surfaces, drawn over their contour plots.

Each optimizer starts from the same point and takes the same number of steps on the exact
gradient of the surface. The updates are fastoptim's fused functional kernels
(``fastoptim.sgd_``, ``adam_``, ...) called on a 2-element float64 array, with the optimizer
states kept by hand as 2-element arrays (torch's state names), which is all the stateful
classes of ``fastoptim.optim`` do for you.

Surfaces (x, y):
    saddle       x**2 + (y**2 - 1)**2 / 4          saddle point at (0, 0), minima (0, +-1)
    rosenbrock   (1 - x)**2 + 100 * (y - x**2)**2  long curved valley, minimum (1, 1)
    beale        (1.5 - x + x*y)**2 + (2.25 - x + x*y**2)**2 + (2.625 - x + x*y**3)**2,
                 minimum (3, 0.5)
    local_min    (x**2 - 1)**2 + 0.3*x + y**2      a local minimum near (0.96, 0) and the
                                                   global one near (-1.04, 0)

Output (in ``--out``): ``trajectories.png``. ``main(argv)`` returns, per surface and optimizer,
the final point, its value and whether the path stayed finite.

    python examples/trajectories.py --out docs/img
    python examples/trajectories.py --quick --out /tmp/traj
"""
from __future__ import annotations

import argparse
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

# ---------------------------------------------------------------------------------------------
# Surfaces: value and exact gradient.


@dataclass
class Surface:
    key: str
    title: str
    f: Callable[[np.ndarray, np.ndarray], np.ndarray]
    grad: Callable[[float, float], tuple[float, float]]
    start: tuple[float, float]
    minima: list[tuple[float, float]]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_levels: bool
    lr: dict[str, float]  # per optimizer


def _saddle(x, y):
    return x**2 + (y**2 - 1) ** 2 / 4


def _saddle_grad(x, y):
    return 2 * x, y * (y**2 - 1)


def _rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _rosenbrock_grad(x, y):
    return -2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)


def _beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _beale_grad(x, y):
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return (2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1),
            2 * a * x + 4 * b * x * y + 6 * c * x * y**2)


def _local(x, y):
    return (x**2 - 1) ** 2 + 0.3 * x + y**2


def _local_grad(x, y):
    return 4 * x * (x**2 - 1) + 0.3, 2 * y


OPTIMIZERS = ["GD", "momentum", "Nesterov", "RMSprop", "Adam", "Adagrad", "Adadelta"]

SURFACES = [
    Surface("saddle", "saddle point: $x^2 + (y^2-1)^2/4$", _saddle, _saddle_grad,
            start=(-1.8, 1e-3), minima=[(0.0, 1.0), (0.0, -1.0)], xlim=(-2.0, 2.0),
            ylim=(-1.5, 1.5), log_levels=False,
            lr=dict(GD=0.05, momentum=0.02, Nesterov=0.02, RMSprop=0.02, Adam=0.05,
                    Adagrad=0.3, Adadelta=1.0)),
    Surface("rosenbrock", "Rosenbrock", _rosenbrock, _rosenbrock_grad,
            start=(-1.5, 2.0), minima=[(1.0, 1.0)], xlim=(-2.0, 2.0), ylim=(-1.0, 3.0),
            log_levels=True,
            lr=dict(GD=1e-3, momentum=3e-4, Nesterov=3e-4, RMSprop=0.01, Adam=0.05,
                    Adagrad=0.2, Adadelta=1.0)),
    Surface("beale", "Beale", _beale, _beale_grad,
            start=(1.0, 1.5), minima=[(3.0, 0.5)], xlim=(-1.0, 4.5), ylim=(-1.5, 2.0),
            log_levels=True,
            lr=dict(GD=1e-3, momentum=2e-4, Nesterov=2e-4, RMSprop=0.01, Adam=0.05,
                    Adagrad=0.5, Adadelta=1.0)),
    Surface("local_min", "local minimum: $(x^2-1)^2 + 0.3x + y^2$", _local, _local_grad,
            start=(2.0, 1.0), minima=[(-1.04, 0.0)], xlim=(-2.0, 2.3), ylim=(-1.3, 1.3),
            log_levels=False,
            lr=dict(GD=0.01, momentum=0.01, Nesterov=0.01, RMSprop=0.01, Adam=0.05,
                    Adagrad=0.5, Adadelta=1.0)),
]


# ---------------------------------------------------------------------------------------------
# One path: the functional kernels with hand-kept states.


def make_update(name: str, lr: float) -> Callable[[np.ndarray, np.ndarray, int], None]:
    """Returns ``update(p, g, step)`` (``step`` 1-based) for optimizer ``name``."""
    zeros = lambda: np.zeros(2)  # noqa: E731
    if name == "GD":
        return lambda p, g, step: fastoptim.sgd_(p, g, lr=lr)
    if name in ("momentum", "Nesterov"):
        momentum_buffer = zeros()
        return lambda p, g, step: fastoptim.sgd_(p, g, momentum_buffer, step=step, lr=lr,
                                                 momentum=0.9, nesterov=name == "Nesterov")
    if name == "RMSprop":
        square_avg = zeros()
        return lambda p, g, step: fastoptim.rmsprop_(p, g, square_avg, lr=lr, alpha=0.9)
    if name == "Adam":
        exp_avg, exp_avg_sq = zeros(), zeros()
        return lambda p, g, step: fastoptim.adam_(p, g, exp_avg, exp_avg_sq, step=step, lr=lr)
    if name == "Adagrad":
        state_sum = zeros()
        return lambda p, g, step: fastoptim.adagrad_(p, g, state_sum, step=step, lr=lr)
    if name == "Adadelta":
        square_avg, acc_delta = zeros(), zeros()
        return lambda p, g, step: fastoptim.adadelta_(p, g, square_avg, acc_delta, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def run_path(surface: Surface, name: str, steps: int) -> np.ndarray:
    """The points visited, shape (k + 1, 2); stops early if the path leaves far away."""
    p = np.array(surface.start, dtype=np.float64)
    update = make_update(name, surface.lr[name])
    path = [p.copy()]
    span = max(surface.xlim[1] - surface.xlim[0], surface.ylim[1] - surface.ylim[0])
    for step in range(1, steps + 1):
        g = np.array(surface.grad(p[0], p[1]), dtype=np.float64)
        update(p, g, step)
        path.append(p.copy())
        if not np.isfinite(p).all() or np.abs(p).max() > 100 * span:
            break
    return np.array(path)


# ---------------------------------------------------------------------------------------------


def plot(surfaces, paths, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    colors = {name: f"C{i}" for i, name in enumerate(OPTIMIZERS)}
    for ax, s in zip(axes.ravel(), surfaces):
        xs = np.linspace(*s.xlim, 200)
        ys = np.linspace(*s.ylim, 200)
        gx, gy = np.meshgrid(xs, ys)
        z = s.f(gx, gy)
        if s.log_levels:
            levels = np.logspace(np.log10(max(z.min(), 1e-3)), np.log10(z.max()), 20)
        else:
            levels = np.linspace(z.min(), np.percentile(z, 95), 20)
        ax.contour(gx, gy, z, levels=levels, cmap="Greys_r", linewidths=0.6, alpha=0.8)
        for name in OPTIMIZERS:
            pts = paths[s.key][name]
            ax.plot(pts[:, 0], pts[:, 1], color=colors[name], lw=1.5, label=name)
            ax.plot(pts[-1, 0], pts[-1, 1], "o", color=colors[name], ms=4)
        ax.plot(*s.start, "ks", ms=6)
        for m in s.minima:
            ax.plot(*m, "*", color="gold", mec="k", ms=13)
        ax.set(xlim=s.xlim, ylim=s.ylim, title=s.title)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="steps per path (default 800; --quick: 150)")
    p.add_argument("--quick", action="store_true", help="a short run (for tests and CI)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (150 if args.quick else 800)
    if steps < 1:
        raise SystemExit("--steps must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = {s.key: {name: run_path(s, name, steps) for name in OPTIMIZERS} for s in SURFACES}
    seconds = time.perf_counter() - t0

    results = {}
    print(f"{'surface':<12}{'optimizer':<10}{'lr':>8}{'final x':>10}{'final y':>10}{'f':>12}")
    for s in SURFACES:
        results[s.key] = {}
        for name in OPTIMIZERS:
            pts = paths[s.key][name]
            x, y = (float(v) for v in pts[-1])
            finite = bool(np.isfinite(pts).all())
            value = float(s.f(x, y)) if finite else float("nan")
            results[s.key][name] = {"lr": s.lr[name], "steps": len(pts) - 1, "final": [x, y],
                                    "start_value": float(s.f(*s.start)), "value": value,
                                    "finite": finite}
            print(f"{s.key:<12}{name:<10}{s.lr[name]:>8g}{x:>10.4f}{y:>10.4f}{value:>12.4g}")
    figure = args.out / "trajectories.png"
    plot(SURFACES, paths, figure)
    print(f"{len(SURFACES) * len(OPTIMIZERS)} paths of {steps} steps in {seconds:.2f} s; "
          f"wrote {figure}", file=sys.stderr)
    return {"steps": steps, "seconds": seconds, "figures": {"trajectories": str(figure)},
            "surfaces": results}


if __name__ == "__main__":
    main()
