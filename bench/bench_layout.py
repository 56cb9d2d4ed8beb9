#!/usr/bin/env python3
"""AdamW on four arrays placed at chosen distances from each other: fastoptim and torch's fused
AdamW on the SAME slices of one buffer.

Separate allocations of equal size (torch tensors, NumPy arrays: one mmap each) put four
arrays of n elements n x itemsize + 4 KiB apart (the mmap's header page). On a 2-vCPU Zen 4
that spacing made the 16-bit steps 1.4-1.9x slower (fastoptim) and 2.5x slower (torch fused)
than at + 64 KiB, while fp32 did not care (README, "On a 2-vCPU Zen 4"). This script measures
that: for each format and each gap (bytes added to n x itemsize between consecutive array
starts; each array starts 16 bytes past a page, as glibc's mmap chunks do), the param, grad and
two states are slices of one buffer, fastoptim.adamw_ updates them, and torch.optim.AdamW
(fused=True) updates the same memory (its param, grad and states are views of the slices,
checked after timing). Arrays hold constants (the timing does not depend on the data: measured
the same with random arrays in the same memory). The implementations of a row are timed
interleaved, a batch of 3 steps of each in turn (fastoptim, torch, fastoptim, torch, ...), so
that load comes and goes on both alike; the figures are medians of --reps batches. A ratio
whose either side spread over SPREAD_LIMIT (slowest batch over fastest) carries SPREAD_MARK:
other load moved the timings, and the ratio of medians is not to be trusted.

    PYTHONPATH=python python3 bench/bench_layout.py                # 2^26, gaps 4 KiB and 64 KiB
    PYTHONPATH=python python3 bench/bench_layout.py --gaps 0 4096 4160 5120 8192 65536 --threads 1
    PYTHONPATH=python python3 bench/bench_layout.py --dropin       # the optimizers' own states

--dropin times the drop-ins instead, as a training script uses them: the param and grad are
separate torch allocations (torch.empty), shared by torch.optim.AdamW(fused=True) and
fastoptim.torch.AdamW, and each optimizer allocates its own states (torch: zeros_like, at the
param's offset within a page; fastoptim: placed 1-2 KiB off it, Note [state placement] in
python/fastoptim/_placement.py). The third column is fastoptim.adamw_ on torch's own states
(the same memory as torch's step); "apart" gives the distances from the param modulo 4 KiB.
"""
import argparse
import statistics
import time

import ml_dtypes
import numpy as np

import fastoptim

try:
    import torch
except ImportError:  # fastoptim alone
    torch = None

FORMATS = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
HEADER = 16  # bytes past a page boundary where each array starts
BATCH = 3  # steps per timed batch
SPREAD_LIMIT = 1.5  # a side's slowest batch over its fastest beyond which its ratio is marked
SPREAD_MARK = "*"


def interleaved_ms(fns, reps):
    """Per callable, the ms per step of ``reps`` batches of BATCH steps, timed interleaved:
    one untimed warm-up call of each, then ``reps`` rounds, each timing one batch of every
    callable in turn (a, b, a, b, ...)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    clock = time.perf_counter
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(BATCH):
                fn()
            times[name].append((clock() - t0) / BATCH * 1e3)
    return times


def spread(samples):
    """The slowest sample over the fastest."""
    return max(samples) / min(samples) if min(samples) > 0 else float("inf")


def ratio_cell(num, den, width=8):
    """The ratio of the medians of two sample lists, with SPREAD_MARK (or a space) after it
    when either list spread over SPREAD_LIMIT. Returns (text, marked)."""
    a, b = statistics.median(num), statistics.median(den)
    marked = max(spread(num), spread(den)) > SPREAD_LIMIT
    return f"{a / b if b > 0 else float('nan'):{width}.2f}" + (SPREAD_MARK if marked else " "), \
        marked


def spread_note():
    return (f"{SPREAD_MARK} after a ratio: fastoptim's or torch's batches spread over "
            f"{SPREAD_LIMIT:g}x (slowest over fastest): other load moved the timings, so the "
            "ratio of the medians is unreliable; run again on a quieter machine")


def placed(buf, n, itemsize, gap):
    """Four byte slices of buf, each n x itemsize long, starting HEADER bytes past a page and
    n x itemsize + gap bytes apart."""
    first = -buf.ctypes.data % 4096 + HEADER
    stride = n * itemsize + gap
    return [buf[first + k * stride: first + k * stride + n * itemsize] for k in range(4)]


def torch_dtype(name):
    """The torch dtype of a FORMATS name."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def torch_step(slices, dtype):
    """torch's fused AdamW whose param, grad and states are views of the four byte slices."""
    tdt = torch_dtype(dtype)
    tp, tg, tm, tv = [torch.from_numpy(s).view(tdt) for s in slices]
    p = torch.nn.Parameter(tp)
    p.grad = tg
    opt = torch.optim.AdamW([p], lr=1e-6, fused=True)
    opt.state[p] = {"step": torch.tensor(4.0), "exp_avg": tm, "exp_avg_sq": tv}

    def check():
        ptrs = [p.data_ptr(), p.grad.data_ptr(), opt.state[p]["exp_avg"].data_ptr(),
                opt.state[p]["exp_avg_sq"].data_ptr()]
        if ptrs != [s.ctypes.data for s in slices]:
            raise SystemExit("torch moved a tensor off the placed memory")

    return opt.step, check


def dropin_rows(n, names, threads_list, reps):
    """The --dropin table: each optimizer on its own states, the param and grad shared."""
    import fastoptim.torch as ft
    print(f"AdamW drop-ins, {n:,} elements, param and grad separate torch allocations; ms")
    print(f"{'format':6s} {'threads':>7s} {'fastoptim.torch':>15s} {'torch fused':>12s} "
          f"{'x torch':>8s}  {'adamw_ on torch states':>22s}  apart (B mod 4096: g, m, v | m, v)")
    any_marked = False
    for name in names:
        p = torch.nn.Parameter(torch.ones(n, dtype=torch_dtype(name)))
        p.grad = torch.full((n,), 0.5, dtype=torch_dtype(name))
        ours = ft.AdamW([p], lr=1e-6)
        theirs = torch.optim.AdamW([p], lr=1e-6, fused=True)
        ours.step()
        theirs.step()
        sm, sv = ours.state[p]["exp_avg"], ours.state[p]["exp_avg_sq"]
        tm, tv = theirs.state[p]["exp_avg"], theirs.state[p]["exp_avg_sq"]
        rel = [(t.data_ptr() - p.data_ptr()) % 4096 for t in (p.grad, tm, tv, sm, sv)]
        views = [t.detach().numpy() if name != "bf16" else t.detach().view(torch.int16).numpy()
                 .view(FORMATS["bf16"]) for t in (p, p.grad, tm, tv)]
        for threads in threads_list:
            fastoptim.set_num_threads(threads)
            torch.set_num_threads(threads)
            t = interleaved_ms({"ours": ours.step, "theirs": theirs.step,
                                "same": lambda: fastoptim.adamw_(*views, step=5, lr=1e-6)}, reps)
            ratio, marked = ratio_cell(t["theirs"], t["ours"])
            any_marked |= marked
            med = {k: statistics.median(v) for k, v in t.items()}
            print(f"{name:6s} {threads:7d} {med['ours']:15.3f} {med['theirs']:12.3f} "
                  f"{ratio} {med['same']:22.3f}"
                  f"  {rel[0]}, {rel[1]}, {rel[2]} | {rel[3]}, {rel[4]}", flush=True)
        del ours, theirs, p, views, sm, sv, tm, tv  # free every array before the next format
    if any_marked:
        print(spread_note())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2", type=int, default=26, help="elements per array = 2**log2")
    ap.add_argument("--gaps", type=int, nargs="+", default=[4096, 65536],
                    help="bytes between one array's end and the next one's start")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dropin", action="store_true",
                    help="time the drop-ins on their own states instead (needs torch)")
    args = ap.parse_args()
    if args.dropin:
        if torch is None:
            ap.error("--dropin needs torch")
        dropin_rows(2**args.log2, args.formats, args.threads, args.reps)
        return
    if any(gap < 0 or gap % 4 for gap in args.gaps):
        ap.error("--gaps must be multiples of 4 bytes, >= 0 (every format's elements stay aligned)")
    n = 2**args.log2
    print(f"AdamW, {n:,} elements per array; ms, medians of {args.reps} batches of {BATCH} "
          "steps, fastoptim's and torch's interleaved"
          + ("" if torch else " (torch not installed: fastoptim only)"))
    any_marked = False
    print(f"{'format':6s} {'threads':>7s} {'gap B':>7s} {'fastoptim':>10s} {'torch fused':>12s} {'x torch':>8s}")
    for name in args.formats:
        dtype = FORMATS[name]
        itemsize = np.dtype(dtype).itemsize
        buf = np.zeros(4 * (n * itemsize + max(args.gaps)) + 4096 + HEADER, np.uint8)
        for threads in args.threads:
            fastoptim.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            for gap in args.gaps:
                slices = placed(buf, n, itemsize, gap)
                p, g, m, v = [s.view(dtype) for s in slices]
                for a, c in zip((p, g, m, v), (1.0, 0.5, 0.0, 0.01)):
                    a[...] = c
                fns = {"fastoptim": lambda: fastoptim.adamw_(p, g, m, v, step=5, lr=1e-6)}
                if torch is not None:
                    fns["torch"], check = torch_step(slices, name)
                t = interleaved_ms(fns, args.reps)
                cells = f"{statistics.median(t['fastoptim']):10.3f}"
                if torch is not None:
                    check()
                    ratio, marked = ratio_cell(t["torch"], t["fastoptim"])
                    any_marked |= marked
                    cells += f" {statistics.median(t['torch']):12.3f} {ratio}"
                print(f"{name:6s} {threads:7d} {gap:7d} {cells}", flush=True)
        del buf
    if any_marked:
        print(spread_note())


if __name__ == "__main__":
    main()
