#!/usr/bin/env python3
"""AVX-512 against AVX2 (and scalar, optionally): the same update on the same arrays, the ISA
switched between interleaved batches, 1 and 2 threads, in-cache and DRAM sizes.

This is the measurement behind the default ISA (src/cpp/dispatch.cpp, Note [untested ISA
paths]): a path is the default where it is at least as fast as the one below it.

    PYTHONPATH=python python3 bench/bench_isa.py                 # about 2 minutes on 2 cores
    PYTHONPATH=python python3 bench/bench_isa.py --sizes 2^16 --reps 3 --optimizers adam

Prints a table of median step times (us) and the avx512/avx2 time ratio per cell (< 1: AVX-512
is faster), and writes the samples as JSON (--json).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import fastoptim
    from fastoptim import functional as F
except ImportError as exc:
    sys.exit(f"bench_isa.py: cannot import fastoptim ({exc}); pip install . or PYTHONPATH=python")

# (name, function, state count, extra keyword arguments). States start at zero, except where
# noted; every call is one in-place step on float32 arrays.
CASES = {
    "sgd": (F.sgd_, 0, dict(lr=1e-4)),
    "adam": (F.adam_, 2, dict(lr=1e-4, step=3)),
    "rmsprop": (F.rmsprop_, 1, dict(lr=1e-4)),
    "adadelta": (F.adadelta_, 2, dict()),
    "nadam": (F.nadam_, 2, dict(lr=1e-4, step=3, mu_product=0.5)),
    "radam": (F.radam_, 2, dict(lr=1e-4, step=10)),
    "rprop": (F.rprop_, 2, dict()),
    "lion": (F.lion_, 1, dict(lr=1e-4)),
}


def parse_size(token: str) -> int:
    return 2 ** int(token[2:]) if token.startswith("2^") else int(float(token))


def time_cell(fn, arrays, kwargs, isas, threads, reps, min_time):
    """Median seconds per call of each ISA: batches of calls, ISAs interleaved per rep."""
    fastoptim.set_num_threads(threads)
    calls = {}
    for isa in isas:  # warm up and size the batches: about min_time seconds each
        fastoptim.set_isa(isa)
        fn(*arrays, **kwargs)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(min_time, 0.02):
            fn(*arrays, **kwargs)
            n += 1
        calls[isa] = max(1, round(min_time / ((time.perf_counter() - t0) / n)))
    samples = {isa: [] for isa in isas}
    gc.disable()
    try:
        for r in range(reps):
            order = isas if r % 2 == 0 else isas[::-1]
            for isa in order:
                fastoptim.set_isa(isa)
                k = calls[isa]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(*arrays, **kwargs)
                samples[isa].append((time.perf_counter() - t0) / k)
    finally:
        gc.enable()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2^16,2^20,2^24", help="elements per array (2^k or N)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--optimizers", default=",".join(CASES), help=", ".join(CASES))
    ap.add_argument("--isas", default="avx2,avx512")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per batch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    info = fastoptim.backend_info()
    isas = args.isas.split(",")
    missing = [i for i in isas if i not in info["isas_supported"]]
    if missing:
        sys.exit(f"bench_isa.py: {missing} not supported by this CPU/build "
                 f"(supported: {info['isas_supported']})")
    saved_isa, saved_threads = info["isa"], fastoptim.get_num_threads()
    rng = np.random.default_rng(0)
    results = []
    print(f"default ISA {info['isa']}; times are medians of {args.reps} interleaved batches (us)")
    print(f"{'optimizer':10} {'size':>6} {'thr':>3} " + " ".join(f"{i:>10}" for i in isas)
          + f" {isas[-1] + '/' + isas[0]:>14}")
    try:
        for size in map(parse_size, args.sizes.split(",")):
            p = rng.standard_normal(size, dtype=np.float32)
            g = rng.standard_normal(size, dtype=np.float32)
            states = [np.zeros(size, np.float32) for _ in range(2)]
            for name in args.optimizers.split(","):
                fn, n_states, kwargs = CASES[name]
                st = states[:n_states]
                if name == "rprop":
                    st[1].fill(1e-3)
                arrays = [p, g, *st]
                for threads in map(int, args.threads.split(",")):
                    s = time_cell(fn, arrays, kwargs, isas, threads, args.reps, args.min_time)
                    med = {i: statistics.median(v) for i, v in s.items()}
                    ratio = med[isas[-1]] / med[isas[0]]
                    label = f"2^{size.bit_length() - 1}" if size & (size - 1) == 0 else str(size)
                    print(f"{name:10} {label:>6} {threads:>3} "
                          + " ".join(f"{med[i] * 1e6:10.1f}" for i in isas) + f" {ratio:14.3f}",
                          flush=True)
                    results.append({"optimizer": name, "size": size, "threads": threads,
                                    "median_s": med, "samples_s": s, "ratio": ratio})
                    for a in st:
                        a.fill(0)
    finally:
        fastoptim.set_isa(saved_isa)
        fastoptim.set_num_threads(saved_threads)
    if args.json:
        args.json.write_text(json.dumps({"backend": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
