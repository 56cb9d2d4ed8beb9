#!/usr/bin/env python3
"""AdamW with block-wise quantized states (int8, int4) against torch's fused fp32 AdamW on the
same work, plus fastoptim's own fp32 and bf16-state rows, the in-place ceiling, and the state
memory measured as resident set size. 1 and 2 threads; medians of 11 interleaved batches of 3
steps. Every array lives in memory that torch allocated (numpy views of torch tensors).

Bytes per element (one step): fp32 28 (p 8, g 4, two states 16); bf16 states 20; int8 16.06 (p 8, g 4, codes
2 x 2, absmax 2 x 2 x 4/256); int4 14.13 (codes 2 x 1, absmax 2 x 2 x 4/128).
The bfloat16-params rows (p and g bfloat16, as a bf16 model trains): all-bf16 14 (torch fused
bf16 moves the same), bf16 params with int8 states 10.06, with int4 states 8.13, and with int8
states and stochastic rounding of the params 10.06; their "x torch" column is against torch's
fused AdamW on bfloat16 params, whose states are bfloat16 (the only way torch's fused kernel
takes bf16 params).
The ceiling is `_core.stream_rmw` over three fp32 arrays, two of them written (20 B/element,
the read/write mix closest to the quantized update's 10 read + 6 written): its GB/s is the
memory system's in-place rate, and "% ceiling" = the row's GB/s / the ceiling's GB/s.
bitsandbytes' 8-bit AdamW is timed when it is installed (an optional extra; 3 steps).

    PYTHONPATH=python python3 bench/bench_quant.py        # 2^22 elements, about 20 s
    PYTHONPATH=python python3 bench/bench_quant.py 26     # 2^26 (the issue's size)
    PYTHONPATH=python python3 bench/bench_quant.py 24 --threads 1 2 --repeats 21 --no-memory

--in-cache times the compute alone instead: AdamW with fp32, int8 and int4 states on float32
params, and int8 and int4 states on bfloat16 params and grads (bf16p-), on 2^16 elements (or
2^log2), small enough to stay in L2, 1 thread, on every ISA this CPU runs
(fastoptim.set_isa), in one process on the same arrays; each figure is the MINIMUM over
--reps timings of --calls calls, in ns per element (in cache there is no memory noise to
average, only interruptions to drop). To compare two builds, run it with each on PYTHONPATH
and alternate the runs:

    PYTHONPATH=python python3 bench/bench_quant.py --in-cache
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import torch

import fastoptim
from bench_bf16_compute import min_ns_per_isa  # bench/ is the script's directory
from bench_formats import view_of
from fastoptim.quant import QuantizedState


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log2", nargs="?", type=int, help="2^log2 elements (default 22; 16 with --in-cache)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts to time (default: 1 2)")
    ap.add_argument("--repeats", type=int, default=11,
                    help="interleaved batches of 3 steps per row; the median is reported (default 11)")
    ap.add_argument("--no-memory", action="store_true", help="skip the state-memory (RSS) rows")
    ap.add_argument("--memory", metavar="FORMAT", help=argparse.SUPPRESS)  # internal: one RSS probe
    ap.add_argument("--in-cache", action="store_true",
                    help="the compute alone: every ISA, 1 thread, 2^16 elements, min of --reps")
    ap.add_argument("--reps", type=int, default=15, help="--in-cache: timings per cell (15)")
    ap.add_argument("--calls", type=int, default=200, help="--in-cache: calls per timing (200)")
    args = ap.parse_args(argv)
    if args.log2 is None:
        args.log2 = 16 if args.in_cache else 22
    return args


ARGS = parse_args()
LOG2 = ARGS.log2
N = 2**LOG2
BYTES = {"fp32": 28.0, "bf16": 20.0, "int8": 16 + 16 / 256, "int4": 14 + 16 / 128,
         "all-bf16": 14.0, "bf16p-int8": 10 + 16 / 256, "bf16p-int4": 8 + 16 / 128,
         "bf16p-int8-sr": 10 + 16 / 256}


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def torch_u8(n):
    return torch.zeros(n, dtype=torch.uint8).numpy()


def torch_f32(n, fill=0.0):
    return torch.full((n,), fill, dtype=torch.float32).numpy()


def quantized(n, bits, non_negative):
    b = 256 if bits == 8 else 128
    codes = torch_u8(n if bits == 8 else (n + 1) // 2)
    return QuantizedState(codes, torch_f32(-(-n // b)), bits, (n,), non_negative)


def state_memory():
    """RSS growth of the two AdamW states of N elements, written once (pages touched), each
    format measured in a fresh interpreter (freed memory would be reused otherwise)."""
    out = {}
    for name in ("fp32", "int8", "int4"):
        proc = subprocess.run([sys.executable, __file__, str(LOG2), "--memory", name],
                              capture_output=True, text=True, check=True)
        out[name] = int(proc.stdout.split()[-1])
    return out


def measure_memory(name):
    before = rss()
    if name == "fp32":
        st = [torch_f32(N, 1.0), torch_f32(N, 1.0)]
    else:
        bits = 8 if name == "int8" else 4
        st = [quantized(N, bits, False), quantized(N, bits, True)]
        for q in st:
            q.codes[:] = 1
            q.absmax[:] = 1
    print(rss() - before)
    return st


def main():
    gen = torch.Generator().manual_seed(0)
    hyper = dict(lr=1e-4, weight_decay=1e-2)
    if not ARGS.no_memory:
        mem = state_memory()
        print(f"N = 2^{LOG2}; state memory (RSS growth, both AdamW states): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB ({v / mem['fp32']:.3f}x fp32)" for k, v in mem.items()))
    try:
        import bitsandbytes as bnb  # optional
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        bnb = None
    print(f"N = 2^{LOG2}; fastoptim ISA {fastoptim.backend_info().get('isa', '?')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for threads in ARGS.threads:
        torch.set_num_threads(threads)
        fastoptim.set_num_threads(threads)
        p32 = torch.nn.Parameter(torch.randn(N, generator=gen))
        p32.grad = torch.randn(N, generator=gen)
        opt = torch.optim.AdamW([p32], fused=True, **hyper)
        opt.step()
        P, G = p32.data.numpy(), p32.grad.numpy()
        M, V = opt.state[p32]["exp_avg"].numpy(), opt.state[p32]["exp_avg_sq"].numpy()
        q8 = (quantized(N, 8, False), quantized(N, 8, True))
        q4 = (quantized(N, 4, False), quantized(N, 4, True))
        fastoptim.adamw_(P.copy(), G, *q8, step=1, **hyper)
        Mb = view_of(torch.zeros(N, dtype=torch.bfloat16))
        Vb = view_of(torch.zeros(N, dtype=torch.bfloat16))
        C1, C2 = torch_f32(N), torch_f32(N)
        # bfloat16 params and grads: torch's fused bf16 AdamW, and fastoptim on its tensors
        p16 = torch.nn.Parameter(torch.randn(N, generator=gen).to(torch.bfloat16))
        p16.grad = torch.randn(N, generator=gen).to(torch.bfloat16)
        opt16 = torch.optim.AdamW([p16], fused=True, **hyper)
        opt16.step()
        P16, G16 = view_of(p16.data), view_of(p16.grad)
        M16, V16 = view_of(opt16.state[p16]["exp_avg"]), view_of(opt16.state[p16]["exp_avg_sq"])
        q8b = (quantized(N, 8, False), quantized(N, 8, True))
        q4b = (quantized(N, 4, False), quantized(N, 4, True))
        fastoptim.adamw_(P16.copy(), G16, *q8b, step=1, **hyper)
        fns = {
            "torch fused fp32": opt.step,
            "fastoptim fp32": lambda: fastoptim.adamw_(P, G, M, V, step=5, **hyper),
            "fastoptim states bf16": lambda: fastoptim.adamw_(P, G, Mb, Vb, step=5, **hyper),
            "fastoptim int8": lambda: fastoptim.adamw_(P, G, *q8, step=5, **hyper),
            "fastoptim int4": lambda: fastoptim.adamw_(P, G, *q4, step=5, **hyper),
            "torch fused all-bf16": opt16.step,
            "fastoptim all-bf16": lambda: fastoptim.adamw_(P16, G16, M16, V16, step=5, **hyper),
            "fastoptim bf16p-int8": lambda: fastoptim.adamw_(P16, G16, *q8b, step=5, **hyper),
            "fastoptim bf16p-int4": lambda: fastoptim.adamw_(P16, G16, *q4b, step=5, **hyper),
            "fastoptim bf16p-int8-sr": lambda: fastoptim.adamw_(
                P16, G16, *q8b, step=5, stochastic_rounding=(1, 5), **hyper),
            "ceiling (3 rd, 2 wr fp32)": lambda: fastoptim._core.stream_rmw([P, C1, C2], 2, 0.0),
        }
        times = {k: [] for k in fns}
        for _ in range(ARGS.repeats):
            for k, f in fns.items():
                f()
                t0 = time.perf_counter()
                for _ in range(3):
                    f()
                times[k].append((time.perf_counter() - t0) / 3)
        med = {k: statistics.median(v) for k, v in times.items()}
        ceil_gbs = 20 * N / med["ceiling (3 rd, 2 wr fp32)"] / 1e9
        for k, v in med.items():
            b = 20.0 if k.startswith("ceiling") else BYTES[k.split()[-1]]
            gbs = b * N / v / 1e9
            peer = "torch fused all-bf16" if "bf16p" in k or "all-bf16" in k else "torch fused fp32"
            print(f"threads {threads} {k:28s} {v * 1e3:8.2f} ms {b:6.2f} B/el {gbs:6.1f} GB/s "
                  f"{100 * gbs / ceil_gbs:5.0f}% ceiling  x {peer} {med[peer] / v:5.2f}")
        if bnb is not None:
            pb = torch.nn.Parameter(torch.randn(N, generator=gen))
            pb.grad = torch.randn(N, generator=gen)
            ob = bnb.optim.AdamW8bit([pb], min_8bit_size=0, **hyper)
            ob.step()
            t0 = time.perf_counter()
            for _ in range(3):
                ob.step()
            tb = (time.perf_counter() - t0) / 3
            print(f"threads {threads} bitsandbytes AdamW8bit      {tb * 1e3:8.2f} ms  "
                  f"fastoptim int8 is {tb / med['fastoptim int8']:.0f}x faster")
        else:
            print(f"threads {threads} bitsandbytes: not installed (optional), skipped")


def in_cache():
    """ns/element of AdamW with fp32, int8 and int4 states on float32 params, and int8 and int4
    states on bfloat16 params and grads (bf16p-), per ISA (the --in-cache mode)."""
    rng = np.random.default_rng(0)
    hyper = dict(lr=1e-4, weight_decay=1e-2)
    p = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    pb, gb = p.astype(ml_dtypes.bfloat16), g.astype(ml_dtypes.bfloat16)
    cells = {"fp32": (p, g, np.zeros(N, np.float32), np.zeros(N, np.float32))}
    for prefix, (pp, gg) in (("", (p, g)), ("bf16p-", (pb, gb))):
        for bits in (8, 4):
            st = (QuantizedState.zeros((N,), bits),
                  QuantizedState.zeros((N,), bits, non_negative=True))
            for step in (1, 2, 3):  # states with nonzero absmax and codes
                fastoptim.adamw_(pp, gg, *st, step=step, **hyper)
            cells[f"{prefix}int{bits}"] = (pp, gg, *st)
    print(f"AdamW, 2^{LOG2} elements, 1 thread; ns/element, min of {ARGS.reps} x "
          f"{ARGS.calls} calls")
    print(f"{'ISA':12s}" + "".join(f" {k:>10s}" for k in cells) + "  int8/fp32  int4/fp32")
    cells = {name: (lambda a=a: fastoptim.adamw_(*a, step=5, **hyper))
             for name, a in cells.items()}
    for isa, best in min_ns_per_isa(cells, N, ARGS.reps, ARGS.calls):
        print(f"{isa:12s}" + "".join(f" {v:10.3f}" for v in best.values())
              + f"  {best['int8'] / best['fp32']:9.2f}  {best['int4'] / best['fp32']:9.2f}")


if __name__ == "__main__":
    if ARGS.in_cache:
        in_cache()
    elif ARGS.memory:
        measure_memory(ARGS.memory)
    else:
        main()
