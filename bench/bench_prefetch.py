"""The software prefetch distance (Note [software prefetch], src/cpp/kernels.h), measured.

AdamW in several storage formats, each at several prefetch distances (elements ahead; 0 = no
software prefetch) set with the tuning hook fastoptim._core._set_prefetch_ahead, in ONE
process on the SAME arrays: every distance of a format is timed on the same memory,
interleaved round by round, so the ratios hold even on a noisy machine. The arrays are
torch's own tensors (as in bench_formats.py) when torch is installed, NumPy arrays otherwise.
Prints, per thread count and format, the median ms at each distance and its ratio to the
default ("auto": 1024 elements ahead for 16-bit params, 64 for float32 ones, none for int8
states on float32 params, 256 for the other quantized states and for float32 params with
bfloat16 states, the "bf16 states" row; see
default_prefetch_ahead in src/cpp/dispatch.cpp); lower is better. The results do not depend on the distance: the
script checks that every distance writes the same bits as the default.

    PYTHONPATH=python python3 bench/bench_prefetch.py --log2 26
"""

import argparse
import json
import os
import statistics
import time

import ml_dtypes
import numpy as np

import fastoptim
from fastoptim import _core

try:
    import torch
except ImportError:  # NumPy arrays instead of torch's
    torch = None

BF16 = ml_dtypes.bfloat16
DEFAULT = None  # _set_prefetch_ahead(None): the automatic distance
_OWNERS = []  # the torch tensors whose memory the arrays are


def arrays(n: int, dtype, rng: np.random.Generator) -> list[np.ndarray]:
    """p, g, m, v of n elements of dtype, in torch's memory when torch is installed."""
    vals = [rng.standard_normal(n), rng.standard_normal(n) * 1e-2,
            rng.standard_normal(n) * 1e-3, np.abs(rng.standard_normal(n)) * 1e-5]
    out = []
    for x in vals:
        if torch is not None:
            t = torch.empty(n, dtype=torch.int16 if np.dtype(dtype).itemsize == 2 else torch.float32)
            a = t.numpy().view(dtype)
            _OWNERS.append(t)
        else:
            a = np.empty(n, dtype)
        a[...] = x.astype(np.float32).astype(dtype)
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2", type=int, default=24, help="elements = 2**log2 (default 24)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--distances", type=int, nargs="+", default=[0, 128, 256, 512, 1024],
                    help="elements ahead, besides the automatic default (0: no prefetch)")
    ap.add_argument("--formats", nargs="+", help="only these formats (names as printed)")
    ap.add_argument("--json", help="write the medians here")
    args = ap.parse_args()
    n = 2**args.log2
    rng = np.random.default_rng(0)
    P32, G32, M32, V32 = arrays(n, np.float32, rng)
    P, G, M, V = arrays(n, BF16, rng)
    H, HG, HM, HV = arrays(n, np.float16, rng)
    K = np.zeros(n, BF16)
    Q8p, Q8g, Q4p, Q4g = arrays(n, np.float32, rng)
    q8 = fastoptim.AdamW([Q8p], lr=1e-4, state_dtype="int8")
    q4 = fastoptim.AdamW([Q4p], lr=1e-4, state_dtype="int4")
    B8p, B8g, B4p, B4g = arrays(n, BF16, rng)
    b8 = fastoptim.AdamW([B8p], lr=1e-4, state_dtype="int8")
    b4 = fastoptim.AdamW([B4p], lr=1e-4, state_dtype="int4")
    kw = dict(step=5, lr=1e-4)
    formats = {  # name: (bytes per element, step, the arrays it writes)
        "fp32": (28, lambda: fastoptim.adamw_(P32, G32, M32, V32, **kw), (P32, M32, V32)),
        "bf16": (14, lambda: fastoptim.adamw_(P, G, M, V, **kw), (P, M, V)),
        "bf16 +stochastic": (14, lambda: fastoptim.adamw_(P, G, M, V, **kw,
                                                          stochastic_rounding=(0, 5)), (P, M, V)),
        "bf16 +kahan": (18, lambda: fastoptim.adamw_(P, G, M, V, **kw, compensation=K),
                        (P, M, V, K)),
        "fp16": (14, lambda: fastoptim.adamw_(H, HG, HM, HV, **kw), (H, HM, HV)),
        "bf16 states": (20, lambda: fastoptim.adamw_(P32, G32, M, V, **kw), (P32, M, V)),
        "f32 master/bf16 grads": (26, lambda: fastoptim.adamw_(P32, G, M32, V32, **kw),
                                  (P32, M32, V32)),
        # the states live in the optimizer: checked below on fresh optimizers instead
        "int8 states": (16, lambda: q8.step([Q8g]), None),
        "int4 states": (14, lambda: q4.step([Q4g]), None),
        "bf16 int8 states": (10, lambda: b8.step([B8g]), None),
        "bf16 int4 states": (8, lambda: b4.step([B4g]), None),
    }
    if args.formats:
        unknown = sorted(set(args.formats) - set(formats))
        if unknown:
            raise SystemExit(f"--formats: unknown {unknown}; the formats are {list(formats)}")
        formats = {f: formats[f] for f in args.formats}
    # Every distance writes the same bits (a prefetch is a hint): one step at each distance
    # from the same start, compared with the default's.
    for name, (_, fn, written) in formats.items():
        if written is None:
            continue
        start = [a.copy() for a in written]
        _core._set_prefetch_ahead(DEFAULT)
        fn()
        ref = [a.copy() for a in written]
        for d in args.distances:
            for a, s0 in zip(written, start):
                a[...] = s0
            _core._set_prefetch_ahead(d)
            fn()
            if not all(np.array_equal(a.view(np.uint8), r.view(np.uint8))
                       for a, r in zip(written, ref)):
                raise SystemExit(f"{name}: prefetch distance {d} changed the result")
        del start, ref
    for state_dtype, (p0, g0) in (("int8", (Q8p, Q8g)), ("int4", (Q4p, Q4g)),
                                  ("int8", (B8p, B8g)), ("int4", (B4p, B4g))):
        m = min(n, 2**20)  # fresh optimizers from the same start, two steps each
        outs = []
        for d in [DEFAULT] + args.distances:
            _core._set_prefetch_ahead(d)
            p = p0[:m].copy()
            opt = fastoptim.AdamW([p], lr=1e-4, state_dtype=state_dtype)
            opt.step([g0[:m]])
            opt.step([g0[:m]])
            outs.append(p.view(np.uint8))
        if not all(np.array_equal(o, outs[0]) for o in outs):
            raise SystemExit(f"{state_dtype} states, {p0.dtype} params: a prefetch distance "
                             "changed the result")
    _core._set_prefetch_ahead(DEFAULT)

    results = []
    for threads in args.threads:
        fastoptim.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        columns = [DEFAULT] + args.distances
        times = {(f, d): [] for f in formats for d in columns}
        for _ in range(args.reps):
            for f, (_, fn, _) in formats.items():
                for d in columns:
                    _core._set_prefetch_ahead(d)
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        fn()
                    times[(f, d)].append((time.perf_counter() - t0) / 3)
        _core._set_prefetch_ahead(DEFAULT)
        print(f"\nAdamW, {n:,} elements, {threads} thread(s), load {os.getloadavg()[0]:.2f}; "
              f"median ms (x the default, auto)")
        print(f"{'format':24s} {'B/el':>4s} " +
              " ".join(f"{'auto' if d is None else d:>14}" for d in columns))
        for f, (b, _, _) in formats.items():
            base = statistics.median(times[(f, DEFAULT)])
            cells = []
            for d in columns:
                ms = statistics.median(times[(f, d)]) * 1e3
                results.append({"threads": threads, "format": f, "bytes_per_element": b,
                                "prefetch_ahead": d, "ms": ms})
                cells.append(f"{ms:7.2f} ({ms / (base * 1e3):.2f})")
            print(f"{f:24s} {b:4d} " + " ".join(f"{c:>14s}" for c in cells))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"elements": n, "rows": results}, fh, indent=1)


if __name__ == "__main__":
    main()
