#!/usr/bin/env python3
"""All-bfloat16 Adam against torch's fused bf16 Adam, on torch's own tensors' memory (the
bf16 ndarrays are views of the tensors), with fp32 Adam and the bf16 in-place ceiling
(`_core.stream_rmw` over the same four bf16 arrays: read 4, write 3 = 14 B/element) in the same
run; 1 and 2 threads, medians of 11 interleaved batches of 3 steps.

    PYTHONPATH=python python3 bench/bench_formats.py          # about 30 s
"""
import statistics
import sys
import time

import ml_dtypes
import torch

import fastoptim

N = 2**int(sys.argv[1]) if len(sys.argv) > 1 else 2**24
def np_view(t):  # a bf16 ndarray on the tensor's own memory
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
for threads in (1, 2):
    torch.set_num_threads(threads); fastoptim.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N, generator=gen).to(torch.bfloat16))
    p.grad = torch.randn(N, generator=gen).to(torch.bfloat16)
    opt = torch.optim.Adam([p], lr=1e-4, fused=True); opt.step()
    st = opt.state[p]
    P, G, M, V = np_view(p.data), np_view(p.grad), np_view(st["exp_avg"]), np_view(st["exp_avg_sq"])
    # the fp32 ceiling-like reference: fp32 Adam on fp32 tensors (28 B/element)
    p32 = torch.nn.Parameter(torch.randn(N, generator=gen)); p32.grad = torch.randn(N, generator=gen)
    o32 = torch.optim.Adam([p32], lr=1e-4, fused=True); o32.step()
    s32 = o32.state[p32]
    P32, G32, M32, V32 = p32.data.numpy(), p32.grad.numpy(), s32["exp_avg"].numpy(), s32["exp_avg_sq"].numpy()
    fns = {"fastoptim bf16": lambda: fastoptim.adam_(P, G, M, V, step=5, lr=1e-4),
           "torch fused bf16": opt.step,
           "fastoptim fp32": lambda: fastoptim.adam_(P32, G32, M32, V32, step=5, lr=1e-4),
           "torch fused fp32": o32.step,
           "ceiling bf16 (4 rd, 3 wr)": lambda: fastoptim._core.stream_rmw([P, M, V, G], 3, 0.0)}
    times = {k: [] for k in fns}
    for rep in range(11):
        for k, f in fns.items():
            f(); t0 = time.perf_counter()
            for _ in range(3): f()
            times[k].append((time.perf_counter() - t0) / 3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        b = 14 if "bf16" in k else 28
        print(f"threads {threads} {k:28s} {v*1e3:8.2f} ms {b*N/v/1e9:6.1f} GB/s")
    print(f"threads {threads}: bf16 x torch fused bf16 = {med['torch fused bf16']/med['fastoptim bf16']:.2f}; "
          f"% of bf16 ceiling = {100*med['ceiling bf16 (4 rd, 3 wr)']/med['fastoptim bf16']:.0f}; "
          f"bf16 vs fastoptim fp32 = {med['fastoptim fp32']/med['fastoptim bf16']:.2f}x")
