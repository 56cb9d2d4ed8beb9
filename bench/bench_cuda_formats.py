#!/usr/bin/env python3
"""CUDA benchmark of the storage formats: Adam in every 16-bit format on torch CUDA tensors.

One Adam step (lr 1e-3, betas 0.9/0.999), timed with CUDA events (median of repeats of
``--iters`` steps), on one buffer of 2^k elements. Rows, each with its true bytes per element:

* ``float32`` (28 B): fastoptim and torch.optim.Adam(fused=True) on the same tensors' copies;
* ``bfloat16`` / ``float16`` (14 B): all-16-bit Adam, fastoptim and torch fused on the same dtype
  (torch's fused Adam keeps its states in the params' dtype);
* ``bf16 + f32 states`` (22 B), ``f32 + bf16 grads`` (26 B), ``f32 + bf16 grads + copy``
  (28 B: the fp32 master weights written back to a bf16 copy in the same pass), ``bf16 Kahan``
  (18 B: a bf16 compensation read and written), ``bf16 stochastic rounding`` (14 B);
* the master-weights row's torch counterpart: ``torch fp32 step + copy`` (the grads cast to
  fp32, a fused fp32 step, the params copied to bf16: what torch offers for the same result);
* a same-byte in-place ceiling for every row: ``fastoptim._core.stream_rmw`` on float32 arrays
  holding exactly the row's bytes per stream (4 streams read, 3 written: Adam's shape), with
  no arithmetic; and a device-to-device copy.

    python bench/bench_cuda_formats.py --json out.json        # ~1 minute on an H100
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log2", type=int, nargs="+", default=[24, 26, 28])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import fastoptim
    except ImportError as e:
        print(f"bench_cuda_formats.py needs torch and fastoptim: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or not fastoptim._core.info()["cuda"]["device_count"]:
        print("bench_cuda_formats.py needs a CUDA GPU and a fastoptim built with CUDA",
              file=sys.stderr)
        return 2

    def timed(step):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(args.iters):
                step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / args.iters)
        return statistics.median(times)

    rows = []

    def record(n, fmt, impl, nbytes, ms, ceiling_ms=None):
        gbps = nbytes * n / (ms * 1e-3) / 1e9
        row = dict(numel=n, format=fmt, impl=impl, bytes_per_element=nbytes, ms=ms, gbps=gbps,
                   of_ceiling=(ceiling_ms / ms) if ceiling_ms else None)
        rows.append(row)
        frac = f"{row['of_ceiling']:.2f}" if ceiling_ms else "-"
        print(f"2^{n.bit_length() - 1:<3} {fmt:>24} {impl:>22} {nbytes:3d} B {ms:9.4f} ms "
              f"{gbps:8.0f} GB/s  {frac}", flush=True)
        return ms

    def ceiling(n, nbytes):
        """stream_rmw on float32 arrays of Adam's shape holding nbytes per element in all."""
        # Adam's streams: p (rw), m (rw), v (rw), g (r): 7 accesses of 4 arrays
        words = max(1, round(n * nbytes / 28))
        arrays = [torch.zeros(words, device="cuda") for _ in range(4)]
        ms = timed(lambda: fastoptim._core.stream_rmw(arrays, 3, 0.0))
        arrays.clear()
        return ms

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # name: (param, grad, state dtype, copy dtype, kahan, sr, bytes per element)
    formats = {
        "float32": (f32, f32, f32, None, False, False, 28),
        "bfloat16": (bf16, bf16, bf16, None, False, False, 14),
        "float16": (f16, f16, f16, None, False, False, 14),
        "bf16 + f32 states": (bf16, bf16, f32, None, False, False, 22),
        "f32 + bf16 grads": (f32, bf16, f32, None, False, False, 26),
        "f32 + bf16 grads + copy": (f32, bf16, f32, bf16, False, False, 28),
        "bf16 Kahan": (bf16, bf16, bf16, None, True, False, 18),
        "bf16 stochastic rounding": (bf16, bf16, bf16, None, False, True, 14),
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for k in args.log2:
        n = 1 << k
        src = torch.ones(n, device="cuda")
        dst = torch.empty_like(src)
        record(n, "float32", "d2d copy", 8, timed(lambda: dst.copy_(src)))
        src = dst = None
        for fmt, (pd, gd, sd, cd, kahan, sr, nbytes) in formats.items():
            ceil_ms = ceiling(n, nbytes)
            record(n, fmt, "ceiling (stream_rmw)", nbytes, ceil_ms, ceil_ms)
            gen = torch.Generator(device="cuda").manual_seed(k)
            p = torch.randn(n, device="cuda", generator=gen).to(pd)
            g = (torch.randn(n, device="cuda", generator=gen) * 1e-2).to(gd)
            m, v = torch.zeros(n, device="cuda", dtype=sd), torch.zeros(n, device="cuda", dtype=sd)
            kw = {}
            if cd is not None:
                kw["param_copies"] = [torch.empty(n, device="cuda", dtype=cd)]
            if kahan:
                kw["compensation"] = [torch.zeros(n, device="cuda", dtype=bf16)]
            counter = [0]

            def ours():
                counter[0] += 1
                extra = {"stochastic_rounding": (7, counter[0])} if sr else {}
                fastoptim.adam_([p], [g], [m], [v], step=10, lr=LR, beta1=BETAS[0],
                                beta2=BETAS[1], eps=EPS, **kw, **extra)

            ours_ms = record(n, fmt, "fastoptim", nbytes, timed(ours), ceil_ms)
            if gd == pd and sd == pd and cd is None and not kahan and not sr:
                tp = torch.nn.Parameter(p.detach().clone())
                tp.grad = g.clone()
                opt = torch.optim.Adam([tp], lr=LR, betas=BETAS, eps=EPS, fused=True)
                t_ms = record(n, fmt, "torch fused", nbytes, timed(opt.step), ceil_ms)
                print(f"{'':30} fastoptim x torch fused: {t_ms / ours_ms:.2f}")
                del tp, opt
            if cd is not None:
                # torch's way to the same result: fp32 grads, a fused fp32 step, a bf16 copy
                tp = torch.nn.Parameter(p.detach().clone())
                copy = torch.empty(n, device="cuda", dtype=cd)
                opt = torch.optim.Adam([tp], lr=LR, betas=BETAS, eps=EPS, fused=True)

                def theirs():
                    tp.grad = g.float()
                    opt.step()
                    copy.copy_(tp.detach())

                t_ms = record(n, fmt, "torch fp32 step + copy", nbytes, timed(theirs), ceil_ms)
                print(f"{'':30} fastoptim x torch step + copy: {t_ms / ours_ms:.2f}")
                tp = opt = copy = None
            p = g = m = v = None
            kw.clear()
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                           settings=vars(args), results=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
