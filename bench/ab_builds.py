#!/usr/bin/env python3
"""Two builds of fastoptim A/B on the SAME arrays in ONE process: AdamW with fp32, int8 or int4
states on 2^log2 elements of torch-allocated memory, the two builds' steps interleaved round by
round (the order flipped every round), the median per build and thread count, and new / old.

Where the big arrays sit relative to each other moves every implementation's speed by up to
about 30% on this VM, and its memory speed moves between runs, so two builds timed in two
processes mix both into their ratio. Here both builds update the same memory in turns. OLD is
the directory of a built fastoptim package (the package directory itself, e.g. a copy of
python/fastoptim taken before a rebuild); it is copied under another name, fastoptim_ab_old,
so that both import side by side. The new build is the fastoptim on sys.path. Each build has
its own thread pool; the flipped order gives each the same neighbours.

    cp -r python/fastoptim /tmp/old_fastoptim      # before the rebuild
    PYTHONPATH=python python3 bench/ab_builds.py /tmp/old_fastoptim --log2 26 --states int8
"""
import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastoptim

HYPER = dict(lr=1e-4, weight_decay=1e-2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="directory of the old build's fastoptim package")
    ap.add_argument("--log2", type=int, default=24, help="2^log2 elements (default 24)")
    ap.add_argument("--states", choices=("fp32", "int8", "int4"), default="int8",
                    help="AdamW's state format (default int8)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts (default: 1 2)")
    ap.add_argument("--reps", type=int, default=11,
                    help="interleaved rounds of 3 steps per build; medians (default 11)")
    return ap.parse_args(argv)


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
    if kind == "fp32":
        return tuple(arrays)
    bits = 8 if kind == "int8" else 4
    Q = mod.quant.QuantizedState
    return (Q(arrays[0], arrays[1], bits, (n,), False), Q(arrays[2], arrays[3], bits, (n,), True))


def main(argv=None) -> None:
    args = parse_args(argv)
    n = 2**args.log2
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(args.old.resolve(), Path(tmp))
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(n, generator=gen).numpy()
        g = (torch.randn(n, generator=gen) * 1e-2).numpy()
        if args.states == "fp32":
            arrays = [torch.zeros(n).numpy(), torch.zeros(n).numpy()]
        else:
            block, codes = (256, n) if args.states == "int8" else (128, (n + 1) // 2)
            arrays = []  # codes and absmax of exp_avg, then of exp_avg_sq
            for _ in range(2):
                arrays += [torch.zeros(codes, dtype=torch.uint8).numpy(),
                           torch.zeros(-(-n // block)).numpy()]
        builds = {"old": (old, states_for(old, args.states, arrays, n)),
                  "new": (fastoptim, states_for(fastoptim, args.states, arrays, n))}
        for mod, st in builds.values():  # the first steps: states with nonzero absmax and codes
            mod.adamw_(p, g, *st, step=1, **HYPER)
        print(f"AdamW, {args.states} states, 2^{args.log2} elements; median ms of {args.reps} "
              f"interleaved rounds of 3 steps")
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
                        mod.adamw_(p, g, *st, step=5, **HYPER)
                    times[name].append((time.perf_counter() - t0) / 3 * 1e3)
            mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"threads {threads}  old {mo:9.4g} ms  new {mn:9.4g} ms  new/old {mn / mo:.3f}")
        sys.path.remove(tmp)


if __name__ == "__main__":
    main()
