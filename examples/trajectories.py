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

Outputs (in ``--out``): ``trajectories.png`` (per surface: the paths over the contours, and
``f - f*`` per step on a log scale) and ``race.gif`` (the saddle and local-minimum surfaces,
animated; ``--no-gif`` skips it). ``main(argv)`` returns, per surface and optimizer, the final
point, its value and whether the path stayed finite, and the number of GIF frames.

    python examples/trajectories.py --out docs/img
    python examples/trajectories.py --quick --out /tmp/traj
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass, field
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
    local_minima: list[tuple[float, float]] = field(default_factory=list)
    saddles: list[tuple[float, float]] = field(default_factory=list)

    @property
    def f_min(self) -> float:
        """The global minimum value (the value at ``minima[0]``)."""
        return float(self.f(*self.minima[0]))


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


# The critical points of the local-minimum surface lie on y = 0 where 4x^3 - 4x + 0.3 = 0.
_LOCAL_X = sorted(float(r.real) for r in np.roots([4.0, 0.0, -4.0, 0.3]))


OPTIMIZERS = ["GD", "momentum", "Nesterov", "RMSprop", "Adam", "Adagrad", "Adadelta"]

SURFACES = [
    Surface("saddle", "saddle point: $x^2 + (y^2-1)^2/4$", _saddle, _saddle_grad,
            start=(-1.8, 1e-3), minima=[(0.0, 1.0), (0.0, -1.0)], xlim=(-2.0, 2.0),
            ylim=(-1.5, 1.5), log_levels=False,
            lr=dict(GD=0.05, momentum=0.02, Nesterov=0.02, RMSprop=0.02, Adam=0.05,
                    Adagrad=0.3, Adadelta=1.0),
            saddles=[(0.0, 0.0)]),
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
            start=(2.0, 1.0), minima=[(_LOCAL_X[0], 0.0)], xlim=(-2.0, 2.3), ylim=(-1.3, 1.3),
            log_levels=False,
            lr=dict(GD=0.01, momentum=0.01, Nesterov=0.01, RMSprop=0.01, Adam=0.05,
                    Adagrad=0.5, Adadelta=1.0),
            local_minima=[(_LOCAL_X[2], 0.0)], saddles=[(_LOCAL_X[1], 0.0)]),
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


# Figures. One colour per optimizer everywhere; markers say what each point is.

COLORS = {name: f"C{i}" for i, name in enumerate(OPTIMIZERS)}
FLOOR = 1e-12  # the loss panels are log-scaled; values below this are drawn on it


def _marker_styles():
    return {
        "start": dict(marker="s", color="black", ms=8, ls="none"),
        "global minimum": dict(marker="*", color="gold", mec="black", ms=17, ls="none"),
        "local minimum": dict(marker="*", color="white", mec="black", ms=15, ls="none"),
        "saddle point": dict(marker="X", color="white", mec="black", ms=10, ls="none"),
        "end of a path": dict(marker="o", color="0.6", mec="black", ms=8, ls="none"),
    }


def _draw_surface(ax, s: Surface, n_levels: int = 20) -> None:
    xs = np.linspace(*s.xlim, 240)
    ys = np.linspace(*s.ylim, 240)
    gx, gy = np.meshgrid(xs, ys)
    z = s.f(gx, gy)
    if s.log_levels:
        levels = np.logspace(np.log10(max(z.min(), 1e-3)), np.log10(z.max()), n_levels)
    else:
        levels = np.linspace(z.min(), np.percentile(z, 95), n_levels)
    ax.contour(gx, gy, z, levels=levels, colors="0.55", linewidths=0.6, zorder=0)
    ax.set(xlim=s.xlim, ylim=s.ylim, xlabel="x", ylabel="y")


def _draw_points(ax, s: Surface) -> None:
    """The start and the critical points (drawn above the paths)."""
    style = _marker_styles()
    ax.plot(*s.start, **style["start"], zorder=5)
    for m in s.minima:
        ax.plot(*m, **style["global minimum"], zorder=4)
    for m in s.local_minima:
        ax.plot(*m, **style["local minimum"], zorder=4)
    for m in s.saddles:
        ax.plot(*m, **style["saddle point"], zorder=4)


def _label(s: Surface, name: str, pts: np.ndarray, steps: int) -> str:
    text = f"{name}, lr={s.lr[name]:g}"
    if len(pts) - 1 < steps:
        text += f" (left the plot at step {len(pts) - 1})"
    return text


def _shared_ends(s: Surface, ends: dict[str, np.ndarray]) -> list[tuple[np.ndarray, list[str]]]:
    """Groups of optimizers whose end points coincide on the plot (one dot hides the others)."""
    tol = 0.012 * max(s.xlim[1] - s.xlim[0], s.ylim[1] - s.ylim[0])
    groups: list[tuple[np.ndarray, list[str]]] = []
    for name, end in ends.items():
        for point, names in groups:
            if np.abs(end - point).max() < tol:
                names.append(name)
                break
        else:
            groups.append((end, [name]))
    return [(point, names) for point, names in groups if len(names) > 1]


def _group_note(s: Surface, point: np.ndarray, names: list[str]) -> str:
    tol = 0.02 * max(s.xlim[1] - s.xlim[0], s.ylim[1] - s.ylim[0])
    where = ""
    for kind, points in (("global minimum", s.minima), ("local minimum", s.local_minima)):
        if any(np.abs(point - np.asarray(m)).max() < tol for m in points):
            where = kind
    if len(names) == len(OPTIMIZERS):
        who = f"all {len(names)}"
    else:
        rows = [", ".join(names[i:i + 3]) for i in range(0, len(names), 3)]
        who = ",\n".join(rows)
    if not where:
        return f"{who}\nend here"
    article = "a" if where == "global minimum" and len(s.minima) > 1 else "the"
    return f"{who}\nend in {article} {where}"


# Where each surface's notes go (points of offset from the end point they name), in the order
# of the groups; the rest go below and to the right.
NOTE_OFFSETS = {"saddle": [(75, -12)], "rosenbrock": [(25, -30)],
                "beale": [(-20, 38), (-10, -40)], "local_min": [(-5, -60), (20, -65)]}


def plot(surfaces, paths, path: Path, steps: int) -> None:
    """One row per surface: the paths over the contours, f - f* per step, and the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    style = _marker_styles()
    fig, axes = plt.subplots(len(surfaces), 3, figsize=(14, 4.4 * len(surfaces)),
                             width_ratios=[1.0, 1.0, 0.5], layout="constrained")
    fig.suptitle(f"{len(OPTIMIZERS)} optimizers, {steps} steps each from the same start, "
                 "on the exact gradient", fontsize=15)
    for (ax, ax_loss, ax_legend), s in zip(axes, surfaces):
        _draw_surface(ax, s)
        # Paths that share a valley overlap: the longest is drawn first, so each one shows
        # where it goes beyond the shorter ones, and its end dot marks where it stops.
        length = {name: np.linalg.norm(np.diff(paths[s.key][name], axis=0), axis=1).sum()
                  for name in OPTIMIZERS}
        for name in sorted(OPTIMIZERS, key=lambda n: -length[n]):
            pts = paths[s.key][name]
            ax.plot(pts[:, 0], pts[:, 1], color=COLORS[name], lw=2.0, zorder=2)
        _draw_points(ax, s)
        for name in OPTIMIZERS:
            pts = paths[s.key][name]
            ax.plot(pts[-1, 0], pts[-1, 1], "o", color=COLORS[name], mec="black", ms=8,
                    zorder=6)
        ends = {name: paths[s.key][name][-1] for name in OPTIMIZERS}
        offsets = NOTE_OFFSETS.get(s.key, [])
        for i, (point, names) in enumerate(_shared_ends(s, ends)):
            ax.annotate(_group_note(s, point, names), point,
                        xytext=offsets[i] if i < len(offsets) else (15, -25),
                        textcoords="offset points", fontsize=9.5, ha="center", va="center",
                        zorder=7, arrowprops=dict(arrowstyle="-", color="0.3", lw=0.8,
                                                  shrinkB=5),
                        bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.6", alpha=0.92))
        ax.set_title(s.title, fontsize=12)

        # The same paths as f(x, y) - f* against the step, log scale: where each one stops.
        for name in OPTIMIZERS:
            pts = paths[s.key][name]
            gap = np.maximum(s.f(pts[:, 0], pts[:, 1]) - s.f_min, FLOOR)
            ax_loss.plot(np.arange(len(pts)), gap, color=COLORS[name], lw=1.6,
                         label=_label(s, name, pts, steps))
            ax_loss.plot(len(pts) - 1, gap[-1], "o", color=COLORS[name], mec="black", ms=7,
                         clip_on=False, zorder=3)
        # Levels of the other critical points: a curve that flattens on one is stuck there.
        for kind, points, dy in (("local minimum", s.local_minima, -4),
                                 ("saddle point", s.saddles, 3)):
            for m in points:
                level = s.f(*m) - s.f_min
                ax_loss.axhline(level, color="black", ls=":", lw=1.2, zorder=0)
                ax_loss.annotate(f"{kind} ({level:.3g})", (0.98, level), ha="right",
                                 va="bottom" if dy > 0 else "top",
                                 xycoords=("axes fraction", "data"), xytext=(0, dy),
                                 textcoords="offset points", fontsize=9.5,
                                 bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none"))
        lowest = min(max(float(s.f(*paths[s.key][n][-1]) - s.f_min), FLOOR)
                     for n in OPTIMIZERS)
        highest = max([float(s.f(*s.start)) - s.f_min,
                       *(s.f(*m) - s.f_min for m in s.saddles)])
        ax_loss.set(yscale="log", xlim=(0, steps), ylim=(lowest / 5, highest * 8),
                    xlabel="step", ylabel="f(x, y) - f*  (log scale)")
        floor_note = f", floored at {FLOOR:g}" if lowest <= FLOOR else ""
        ax_loss.set_title(f"distance to the minimum value f* = {s.f_min:.3g}{floor_note}",
                          fontsize=11)
        ax_loss.grid(True, which="major", alpha=0.3)

        handles, labels = ax_loss.get_legend_handles_labels()
        for kind, present in (("start", True), ("end of a path", True),
                              ("global minimum", True), ("local minimum", s.local_minima),
                              ("saddle point", s.saddles)):
            if present:
                handles.append(Line2D([], [], **style[kind]))
                labels.append(kind)
        ax_legend.axis("off")
        ax_legend.legend(handles, labels, loc="upper left", fontsize=10, frameon=False,
                         borderaxespad=0, title=f"optimizer, learning rate\n({steps} steps)",
                         title_fontsize=10, alignment="left")
    save_png(fig, path, dpi=100)
    plt.close(fig)


def save_png(fig, path: Path, dpi: int) -> None:
    """Saves ``fig`` as a 256-colour PNG (an octree palette keeps every line colour): a third
    of the bytes of a full-colour one, no visible difference for line art."""
    from PIL import Image  # a matplotlib dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True)


def race_steps(steps: int, frames: int) -> np.ndarray:
    """The step shown in each frame of the race, from 0 to ``steps``: one step per frame at
    first, while the paths move fast, then a clock that speeds up (cubically)."""
    i = np.arange(frames)
    return np.maximum(np.minimum(i, steps),
                      np.round(steps * (i / max(frames - 1, 1)) ** 3)).astype(int)


def _gif_writer(fps: int, pause_s: float):
    """matplotlib's PillowWriter with one palette for every frame and a pause on the last.

    Pillow's default (a median-cut palette per frame) merges a small area of colour into a
    larger one nearby, so the gold star turned orange in some frames; an octree palette of
    the last frame (which holds every path) keeps each colour in every frame.
    """
    from matplotlib.animation import PillowWriter
    from PIL import Image

    class GifWriter(PillowWriter):
        def finish(self):
            palette = self._frames[-1].convert("RGB").quantize(
                256, method=Image.Quantize.FASTOCTREE)
            frames = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
                      for f in self._frames]
            durations = [round(1000 / self.fps)] * (len(frames) - 1) + [round(1000 * pause_s)]
            frames[0].save(self.outfile, save_all=True, append_images=frames[1:],
                           duration=durations, loop=0, optimize=True)

    return GifWriter(fps=fps)


def animate(surfaces, paths, path: Path, steps: int, frames: int) -> None:
    """The optimizers racing on ``surfaces`` side by side, as an animated GIF of ``frames``
    frames (the last one held for 2 s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(surfaces), figsize=(5.2 * len(surfaces), 5.9),
                             layout="constrained")
    clock = fig.suptitle("", fontsize=13)
    style = _marker_styles()
    kinds = ["start", "global minimum", "local minimum", "saddle point"]
    fig.legend([Line2D([], [], **{**style[k], "ms": 0.8 * style[k]["ms"]}) for k in kinds],
               kinds, loc="outside lower center", ncol=len(kinds), fontsize=9, frameon=False)
    moving = []
    for ax, s in zip(axes, surfaces):
        _draw_surface(ax, s, n_levels=14)
        _draw_points(ax, s)
        ax.set_title(s.title, fontsize=11)
        for name in OPTIMIZERS:
            (trail,) = ax.plot([], [], color=COLORS[name], lw=2.0, zorder=2,
                               label=f"{name}, lr={s.lr[name]:g}")
            (head,) = ax.plot([], [], "o", color=COLORS[name], mec="black", ms=8, zorder=6)
            moving.append((trail, head, paths[s.key][name]))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8.5,
                  frameon=False, handlelength=1.5, columnspacing=1.0)
    shown = race_steps(steps, frames)

    def draw(frame: int):
        k = shown[frame]
        for trail, head, pts in moving:
            j = min(k, len(pts) - 1)
            trail.set_data(pts[:j + 1, 0], pts[:j + 1, 1])
            head.set_data(pts[j:j + 1, 0], pts[j:j + 1, 1])
        clock.set_text(f"step {k} of {steps}" + ("  (the clock speeds up)" if k > frame else ""))
        return []

    FuncAnimation(fig, draw, frames=frames, blit=False).save(
        path, writer=_gif_writer(fps=12, pause_s=2.0), dpi=72)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="steps per path (default 800; --quick: 150)")
    p.add_argument("--quick", action="store_true", help="a short run (for tests and CI)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames of the race GIF before its final pause (default 100; "
                        "--quick: 15)")
    p.add_argument("--no-gif", action="store_true", help="skip the race GIF (the slow part)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (150 if args.quick else 800)
    frames = args.frames or (15 if args.quick else 100)
    if steps < 1 or frames < 2:
        raise SystemExit("--steps must be >= 1 and --frames >= 2")
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
    figures = {"trajectories": str(args.out / "trajectories.png")}
    plot(SURFACES, paths, Path(figures["trajectories"]), steps)
    summary = {"steps": steps, "seconds": seconds, "figures": figures, "surfaces": results}
    if not args.no_gif:
        figures["race"] = str(args.out / "race.gif")
        race = [s for s in SURFACES if s.key in ("saddle", "local_min")]
        animate(race, paths, Path(figures["race"]), steps, frames)
        summary["race_frames"] = frames
    print(f"{len(SURFACES) * len(OPTIMIZERS)} paths of {steps} steps in {seconds:.2f} s; "
          f"wrote " + ", ".join(figures.values()), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
