"""The compute cost of the bf16 loads and stores, per ISA, with the memory out of the way.

All-bf16 AdamW on arrays small enough to stay in L2 (2^16 elements by default: 4 arrays of
128 KiB), 1 thread, plain, with stochastic rounding of the params and with Kahan compensation
(a fifth bf16 array, read and written), on every ISA this
CPU runs (fastoptim.set_isa), in one process on the same arrays. Each figure is the MINIMUM
over --reps timings of --calls calls, in ns per element: in cache there is no memory noise
to average, only interruptions to drop. At this size the step is compute-bound, so the
numbers show what the conversions and the SR hash cost; at 2^24 and above the same loop is
partly hidden behind memory (bench_formats.py measures that). To compare two builds, run
the script with each on PYTHONPATH and alternate the runs.

    PYTHONPATH=python python3 bench/bench_bf16_compute.py
"""

import argparse
import time

import ml_dtypes
import numpy as np

import fastoptim


def min_ns_per_isa(cells, n, reps, calls):
    """For each ISA this CPU runs (fastoptim.set_isa), 1 thread: (isa, {name: ns/element}),
    each the MINIMUM over `reps` timings of `calls` calls of cells[name]() on n elements. The
    ISA and thread count in force before are restored after. (bench_quant.py --in-cache uses
    it too.)"""
    info = fastoptim.backend_info()
    fastoptim.set_num_threads(1)
    try:
        for isa in info["isas_supported"]:
            fastoptim.set_isa(isa)
            best = {}
            for name, fn in cells.items():
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times.append((time.perf_counter() - t0) / calls / n * 1e9)
                best[name] = min(times)
            yield isa, best
    finally:
        fastoptim.set_isa(info["isa"])
        fastoptim.set_num_threads(info["num_threads"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2", type=int, default=16, help="elements = 2**log2 (default 16)")
    ap.add_argument("--reps", type=int, default=15, help="timings per cell (default 15)")
    ap.add_argument("--calls", type=int, default=300, help="calls per timing (default 300)")
    args = ap.parse_args()
    n = 2**args.log2
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    p, g, m = (rng.standard_normal(n).astype(np.float32).astype(bf16) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32).astype(bf16)
    print(f"all-bf16 AdamW, {n:,} elements, 1 thread; ns/element, min of {args.reps} x "
          f"{args.calls} calls")
    c = np.zeros(n, bf16)
    print(f"{'ISA':12s} {'plain':>8s} {'+ SR':>8s} {'+ Kahan':>8s} {'SR/plain':>9s}")
    cells = {
        "plain": lambda: fastoptim.adamw_(p, g, m, v, step=5, lr=1e-4),
        "sr": lambda: fastoptim.adamw_(p, g, m, v, step=5, lr=1e-4, stochastic_rounding=(0, 5)),
        "kahan": lambda: fastoptim.adamw_(p, g, m, v, step=5, lr=1e-4, compensation=c),
    }
    for isa, best in min_ns_per_isa(cells, n, args.reps, args.calls):
        print(f"{isa:12s} {best['plain']:8.3f} {best['sr']:8.3f} {best['kahan']:8.3f} "
              f"{best['sr'] / best['plain']:9.2f}")


if __name__ == "__main__":
    main()
