#!/usr/bin/env python3
"""Two builds of fastoptim A/B on the SAME arrays in ONE process: AdamW with fp32, bf16, int8 or
int4 states, on float32 or bfloat16 params and grads (bfloat16: also with stochastic rounding
or Kahan compensation), on 2^log2 elements of torch-allocated memory, the two builds' steps
interleaved round by round (the order flipped every round), the median per build and thread
count, and new / old.

Where the big arrays sit relative to each other moves every implementation's speed by up to
about 30% on this VM, and its memory speed moves between runs, so two builds timed in two
processes mix both into their ratio. Here both builds update the same memory in turns. OLD is
the directory of a built fastoptim package (the package directory itself, e.g. a copy of
python/fastoptim taken before a rebuild); it is copied under another name, fastoptim_ab_old,
so that both import side by side. The new build is the fastoptim on sys.path. Each build has
its own thread pool; the flipped order gives each the same neighbours.

    cp -r python/fastoptim /tmp/old_fastoptim      # before the rebuild
    PYTHONPATH=python python3 bench/ab_builds.py /tmp/old_fastoptim --log2 26 --states int8
    # all-bf16 AdamW, then with stochastic rounding, then bf16 params with int8 states:
    PYTHONPATH=python python3 bench/ab_builds.py /tmp/old_fastoptim --params bf16 --states bf16
    PYTHONPATH=python python3 bench/ab_builds.py /tmp/old_fastoptim --params bf16 --states bf16 --sr
    PYTHONPATH=python python3 bench/ab_builds.py /tmp/old_fastoptim --params bf16 --states int8
"""
import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

import fastoptim

HYPER = dict(lr=1e-4, weight_decay=1e-2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="directory of the old build's fastoptim package")
    ap.add_argument("--log2", type=int, default=24, help="2^log2 elements (default 24)")
    ap.add_argument("--states", choices=("fp32", "bf16", "int8", "int4"), default="int8",
                    help="AdamW's state format (default int8)")
    ap.add_argument("--params", choices=("fp32", "bf16"), default="fp32",
                    help="the params' and grads' dtype (default fp32)")
    ap.add_argument("--sr", action="store_true",
                    help="bf16 params stored with stochastic rounding (seed 11, counter = step)")
    ap.add_argument("--kahan", action="store_true",
                    help="bf16 params with a Kahan compensation array (bf16 states only)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts (default: 1 2)")
    ap.add_argument("--reps", type=int, default=11,
                    help="interleaved rounds of 3 steps per build; medians (default 11)")
    args = ap.parse_args(argv)
    if (args.sr or args.kahan) and args.params != "bf16":
        ap.error("--sr and --kahan need --params bf16")
    if args.sr and args.kahan:
        ap.error("--sr and --kahan exclude each other")
    if args.kahan and args.states != "bf16":
        ap.error("--kahan needs --states bf16")
    if args.states == "bf16" and args.params == "fp32":
        ap.error("--states bf16 needs --params bf16 (all-bf16 AdamW)")
    return args


def import_old(old: Path, where: Path):
    """The old build, imported as fastoptim_ab_old from a copy of its package directory."""
    if not (old / "__init__.py").is_file():
        raise SystemExit(f"ab_builds.py: {old} is not a fastoptim package directory "
                         f"(no __init__.py)")
    shutil.copytree(old, where / "fastoptim_ab_old",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(where))
    return importlib.import_module("fastoptim_ab_old")


def states_for(mod, kind: str, arrays: list[np.ndarray], n: int):
    """AdamW's two states over the shared arrays, as module mod's types."""
    if kind in ("fp32", "bf16"):
        return tuple(arrays)
    bits = 8 if kind == "int8" else 4
    Q = mod.quant.QuantizedState
    return (Q(arrays[0], arrays[1], bits, (n,), False), Q(arrays[2], arrays[3], bits, (n,), True))


def bf16_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy ml_dtypes.bfloat16 view of a torch bfloat16 tensor's memory."""
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def main(argv=None) -> None:
    args = parse_args(argv)
    n = 2**args.log2
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(args.old.resolve(), Path(tmp))
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-2
        if args.params == "bf16":
            p, g = bf16_numpy(p.bfloat16()), bf16_numpy(g.bfloat16())
        else:
            p, g = p.numpy(), g.numpy()
        options = {}
        if args.kahan:
            options["compensation"] = bf16_numpy(torch.zeros(n, dtype=torch.bfloat16))
        if args.states == "fp32":
            arrays = [torch.zeros(n).numpy(), torch.zeros(n).numpy()]
        elif args.states == "bf16":
            arrays = [bf16_numpy(torch.zeros(n, dtype=torch.bfloat16)) for _ in range(2)]
        else:
            block, codes = (256, n) if args.states == "int8" else (128, (n + 1) // 2)
            arrays = []  # codes and absmax of exp_avg, then of exp_avg_sq
            for _ in range(2):
                arrays += [torch.zeros(codes, dtype=torch.uint8).numpy(),
                           torch.zeros(-(-n // block)).numpy()]
        builds = {"old": (old, states_for(old, args.states, arrays, n)),
                  "new": (fastoptim, states_for(fastoptim, args.states, arrays, n))}
        def step(mod, st, k):
            sr = {"stochastic_rounding": (11, k)} if args.sr else {}
            mod.adamw_(p, g, *st, step=k, **HYPER, **options, **sr)

        for mod, st in builds.values():  # the first steps: states with nonzero absmax and codes
            step(mod, st, 1)
        what = {"fp32": "float32", "bf16": "bfloat16"}[args.params] + " params" + (
            ", stochastic rounding" if args.sr else ", Kahan compensation" if args.kahan else "")
        print(f"AdamW, {args.states} states, {what}, 2^{args.log2} elements; median ms of "
              f"{args.reps} interleaved rounds of 3 steps")
        print(f"  old: {Path(old.__file__).parent} (copied from {args.old})")
        print(f"  new: {Path(fastoptim.__file__).parent}")
        for threads in args.threads:
            times: dict[str, list[float]] = {name: [] for name in builds}
            order = list(builds.items())
            for r in range(args.reps):
                for name, (mod, st) in (order if r % 2 == 0 else order[::-1]):
                    mod.set_num_threads(threads)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        step(mod, st, 5)
                    times[name].append((time.perf_counter() - t0) / 3 * 1e3)
            mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"threads {threads}  old {mo:9.4g} ms  new {mn:9.4g} ms  new/old {mn / mo:.3f}")
        sys.path.remove(tmp)


if __name__ == "__main__":
    main()
