"""Exponentially weighted averages of a noisy daily series, with and without bias correction.

The picture of the deeplearning.ai course ("exponentially weighted averages"): a year of
noisy daily temperatures and their averages

    v_0 = 0,    v_t = beta * v_{t-1} + (1 - beta) * theta_t,

for beta = 0.5, 0.9 and 0.98. A larger beta averages over more days (about 1 / (1 - beta):
2, 10 and 50), so its curve is smoother but lags behind the data. Starting from v_0 = 0 pulls
the first averages towards zero, because the weights (1 - beta) * beta**k of the last values
sum to 1 - beta**t, not 1; dividing by that (bias correction, ``v_t / (1 - beta**t)``) fixes
the start and changes nothing later, once beta**t is small.

Every average is a :class:`fastoptim.ema.EMA`, one with ``bias_correction=True`` and one
without. The temperatures are synthetic (a seasonal cosine plus autocorrelated weather noise,
seeded), so the example needs no download.

Output (in ``--out``): ``ema_bias_correction.png``. ``main(argv)`` returns the series and the
averages as lists.

    python examples/ema_bias_correction.py --out docs/img
    python examples/ema_bias_correction.py --quick --out /tmp/ema
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

try:
    import fastoptim  # noqa: F401
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim  # noqa: F401

from fastoptim.ema import EMA

BETAS = (0.5, 0.9, 0.98)
# The course's colours where they read on white: 0.5 yellow (darkened), 0.9 red, 0.98 green.
COLORS = {0.5: "#d4a000", 0.9: "#d62728", 0.98: "#2ca02c"}


def temperatures(days: int, seed: int) -> np.ndarray:
    """Daily temperatures (deg F, as in the course: far from 0, so the start-up bias shows)
    for ``days`` days from 1 January: a seasonal cosine plus AR(1) weather (a warm spell
    lasts a few days) plus day-to-day noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    season = 52.0 - 14.0 * np.cos(2 * np.pi * (t - 15) / 365.0)
    weather = np.zeros(days)
    for i in range(1, days):
        weather[i] = 0.7 * weather[i - 1] + rng.normal(0.0, 2.8)
    return season + weather + rng.normal(0.0, 2.7, days)


def averages(series, beta: float, bias_correction: bool) -> np.ndarray:
    """The running average after each value of ``series``, from one :class:`EMA`."""
    ema = EMA(beta, bias_correction=bias_correction)
    return np.array([ema.update(x) for x in series])


def plot(days: np.ndarray, series: np.ndarray, corrected: dict, raw: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 9.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
    ax = top.subplots()
    zoom, weights = bottom.subplots(1, 2, width_ratios=[1.25, 1.0])

    # 1. The whole series and the three (bias-corrected) averages.
    ax.plot(days, series, "o", color="0.55", ms=3, label=r"daily temperature $\theta_t$")
    for beta in BETAS:
        ax.plot(days, corrected[beta], color=COLORS[beta], lw=2.2,
                label=rf"$\beta$ = {beta}: averages about {1 / (1 - beta):.0f} days")
    ax.set(xlabel="day t", ylabel="temperature (deg F)", xlim=(0, days[-1] + 1))
    ax.set_title(r"$v_t = \beta\, v_{t-1} + (1-\beta)\, \theta_t$, bias-corrected: a larger "
                 r"$\beta$ is smoother but lags behind (the green curve is shifted right)",
                 fontsize=12)
    ax.legend(loc="upper left", fontsize=10.5, ncol=2, framealpha=0.95)
    ax.grid(True, alpha=0.3)

    # 2. The first weeks: without bias correction every average starts near 0.
    n = min(len(days), 60)
    zoom.plot(days[:n], series[:n], "o", color="0.55", ms=3.5, label=r"$\theta_t$")
    for beta in BETAS:
        zoom.plot(days[:n], corrected[beta][:n], color=COLORS[beta], lw=2.2,
                  label=rf"$\beta$ = {beta}, corrected: $v_t / (1-\beta^t)$")
    for beta in BETAS:
        zoom.plot(days[:n], raw[beta][:n], color=COLORS[beta], lw=1.8, ls="--",
                  label=rf"$\beta$ = {beta}, not corrected: $v_t$")
    zoom.set(xlabel="day t", ylabel="temperature (deg F)", xlim=(0, n + 1),
             ylim=(min(0.0, series[:n].min()) - 0.5, 1.55 * series[:n].max()))
    zoom.set_title(f"The first {n} days: $v_0 = 0$ pulls the uncorrected averages (dashed) "
                   "down\nuntil $\\beta^t$ is small; for $\\beta$ = 0.98 that takes ~100 days",
                   fontsize=11)
    zoom.legend(loc="upper center", fontsize=9, ncol=2, framealpha=0.95)  # above the data
    zoom.grid(True, alpha=0.3)

    # 3. What v_t is: a weighted sum of the past values with exponentially decaying weights.
    lag = np.arange(0, 121)
    for beta in BETAS:
        w = (1 - beta) * beta**lag
        weights.plot(lag, w, color=COLORS[beta], lw=2.2, marker="o" if beta == 0.5 else None,
                     ms=3, label=rf"$\beta$ = {beta}")
        span = 1 / (1 - beta)
        weights.plot(span, (1 - beta) * beta**span, "o", color=COLORS[beta], mec="black",
                     ms=7)
    weights.set(xlabel="k: how many days ago", ylabel=r"weight $(1-\beta)\,\beta^k$ of "
                r"$\theta_{t-k}$ in $v_t$", yscale="log", ylim=(1e-4, 0.7), xlim=(0, 120))
    weights.set_title("The weights decay by $1/e$ after about $1/(1-\\beta)$ days (dots);\n"
                      "they sum to $1-\\beta^t$, which bias correction divides out",
                      fontsize=11)
    weights.legend(loc="upper right", fontsize=10)
    weights.grid(True, alpha=0.3)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    from PIL import Image  # a matplotlib dependency; a 256-colour PNG is a third the size
    Image.open(buffer).convert("RGB").quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=None,
                   help="length of the series (default 365; --quick: 120)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a short series (for tests and CI)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    n_days = args.days or (120 if args.quick else 365)
    if n_days < 2:
        raise SystemExit("--days must be >= 2")
    args.out.mkdir(parents=True, exist_ok=True)
    series = temperatures(n_days, args.seed)
    days = np.arange(1, n_days + 1)
    corrected = {beta: averages(series, beta, bias_correction=True) for beta in BETAS}
    raw = {beta: averages(series, beta, bias_correction=False) for beta in BETAS}
    figure = args.out / "ema_bias_correction.png"
    plot(days, series, corrected, raw, figure)

    print(f"{'beta':>6}{'~days':>7}{'day 1 raw':>11}{'day 1 corr':>12}{'day 30 raw':>12}"
          f"{'day 30 corr':>13}")
    for beta in BETAS:
        d30 = min(30, n_days) - 1
        print(f"{beta:>6}{1 / (1 - beta):>7.0f}{raw[beta][0]:>11.2f}{corrected[beta][0]:>12.2f}"
              f"{raw[beta][d30]:>12.2f}{corrected[beta][d30]:>13.2f}")
    print(f"wrote {figure}", file=sys.stderr)
    return {"days": n_days, "seed": args.seed, "series": series.tolist(),
            "corrected": {beta: v.tolist() for beta, v in corrected.items()},
            "raw": {beta: v.tolist() for beta, v in raw.items()},
            "figures": {"ema_bias_correction": str(figure)}}


if __name__ == "__main__":
    main()
