#!/usr/bin/env python3
"""AdamW in every storage format and mixed-precision option of fastoptim, against torch's fused
AdamW (bf16 and fp32) on the SAME memory, with the in-place bandwidth ceiling of each row.

Rows (docs/api.md, "Storage formats"; bytes per element moved by one step in brackets):
  fp32                      params, grads, states float32                        [28]
  bf16                      all bfloat16 (torch fused's bf16 behaviour)          [14]
  bf16 +stochastic          all bfloat16, params stored with stochastic rounding [14]
  bf16 +kahan               all bfloat16 + bfloat16 compensation (r+w)           [18]
  bf16/f32 states           bfloat16 params and grads, float32 states            [22]
  bf16/f32 states +stoch.   the same, stochastic rounding of the params          [22]
  f32 master/bf16 grads     float32 params and states, bfloat16 grads            [26]
  ... +bf16 copy            + the model's bfloat16 copy of the params, written   [28]
  fp16 / fp16/f32 states / f32 master/fp16 grads (+copy): the float16 twins
  fp32 +grad_scale          fp32 with torch.amp's grad_scale unscaled in the kernel [28]
torch rows: torch.optim.AdamW(fused=True) on the bf16, fp16 and fp32 tensors whose memory the
fastoptim rows update (the ndarrays are views of torch's own tensors); and torch's fp32 step
followed by `bf16_copy.copy_(param)`, what the master-weights rows do in one pass (torch's
fp32 step reads the fp32 grad, 2 bytes more than ours: its total is 28 + 6 bytes).

Ceiling: `_core.stream_rmw` over four float32 arrays of the same memory as the fp32 row (read
4, write 3: 28 B/element), as GB/s; each row's "% ceiling" is its GB/s over that, i.e. the
same-byte in-place ceiling assuming the memory system moves bytes at one rate whatever the
element type. Medians of `--reps` interleaved batches of 3 steps, 1 and 2 threads.

    PYTHONPATH=python python3 bench/bench_formats.py            # 2^24 elements, ~1 minute
    PYTHONPATH=python python3 bench/bench_formats.py --log2 26  # 2^26, ~4 minutes, ~3 GiB
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ml_dtypes
import numpy as np
import torch

import fastoptim

BF16 = ml_dtypes.bfloat16


def view_of(t: torch.Tensor) -> np.ndarray:
    """An ndarray on the tensor's own memory (bf16 through an int16 view)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def fused_adamw(n: int, dtype: torch.dtype, gen: torch.Generator):
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
    p.grad = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    opt.step()
    st = opt.state[p]
    return opt, [view_of(x) for x in (p.data, p.grad, st["exp_avg"], st["exp_avg_sq"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2", type=int, default=24, help="elements = 2**log2 (default 24)")
    ap.add_argument("--reps", type=int, default=9, help="interleaved batches (default 9)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    n = 2**args.log2
    gen = torch.Generator().manual_seed(0)
    t_bf16, (P, G, M, V) = fused_adamw(n, torch.bfloat16, gen)
    t_f32, (P32, G32, M32, V32) = fused_adamw(n, torch.float32, gen)
    t_f16, (H, HG, HM, HV) = fused_adamw(n, torch.float16, gen)
    # fp32 states for the low-precision params, a bf16/f16 grad and copy for the fp32 master
    # rows, a compensation: allocated once, beside torch's tensors
    M32b, V32b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    Gb, Gh = G32.astype(BF16), G32.astype(np.float16)
    Cb, Ch = np.zeros(n, BF16), np.zeros(n, np.float16)
    K = np.zeros(n, BF16)
    # torch's way to the master-weights row: its fp32 fused step, then the bf16 copy
    p32_t = t_f32.param_groups[0]["params"][0]
    copy_t = torch.empty(n, dtype=torch.bfloat16)

    def torch_master() -> None:
        t_f32.step()
        copy_t.copy_(p32_t.data)

    kw = dict(step=5, lr=1e-4)
    rows = {
        "fp32": (28, lambda: fastoptim.adamw_(P32, G32, M32, V32, **kw)),
        "bf16": (14, lambda: fastoptim.adamw_(P, G, M, V, **kw)),
        "bf16 +stochastic": (14, lambda: fastoptim.adamw_(P, G, M, V, **kw,
                                                          stochastic_rounding=(0, 5))),
        "bf16 +kahan": (18, lambda: fastoptim.adamw_(P, G, M, V, **kw, compensation=K)),
        "bf16/f32 states": (22, lambda: fastoptim.adamw_(P, G, M32b, V32b, **kw)),
        "bf16/f32 states +stoch.": (22, lambda: fastoptim.adamw_(P, G, M32b, V32b, **kw,
                                                                 stochastic_rounding=(0, 5))),
        "f32 master/bf16 grads": (26, lambda: fastoptim.adamw_(P32, Gb, M32, V32, **kw)),
        "f32 master/bf16 grads+copy": (28, lambda: fastoptim.adamw_(P32, Gb, M32, V32, **kw,
                                                                    param_copies=Cb)),
        "fp16": (14, lambda: fastoptim.adamw_(H, HG, HM, HV, **kw)),
        "fp16/f32 states": (22, lambda: fastoptim.adamw_(H, HG, M32b, V32b, **kw)),
        "f32 master/fp16 grads": (26, lambda: fastoptim.adamw_(P32, Gh, M32, V32, **kw)),
        "f32 master/fp16 grads+copy": (28, lambda: fastoptim.adamw_(P32, Gh, M32, V32, **kw,
                                                                    param_copies=Ch)),
        "fp32 +grad_scale": (28, lambda: fastoptim.adamw_(P32, G32, M32, V32, **kw,
                                                          grad_scale=65536.0)),
        "torch fused bf16": (14, t_bf16.step),
        "torch fused fp16": (14, t_f16.step),
        "torch fused fp32": (28, t_f32.step),
        "torch fp32 step + bf16 copy": (34, torch_master),
        "ceiling (fp32 rmw 4r/3w)": (28, lambda: fastoptim._core.stream_rmw(
            [P32, M32, V32, G32], 3, 0.0)),
    }
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        fastoptim.set_num_threads(threads)
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.reps):
            for name, (_, fn) in rows.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(3):
                    fn()
                times[name].append((time.perf_counter() - t0) / 3)
        med = {k: statistics.median(v) for k, v in times.items()}
        ceiling_gbs = 28 * n / med["ceiling (fp32 rmw 4r/3w)"] / 1e9
        print(f"\nAdamW, {n:,} elements, {threads} thread(s); load {os.getloadavg()[0]:.2f}; "
              f"ceiling {ceiling_gbs:.1f} GB/s")
        print(f"{'row':28s} {'B/el':>4s} {'ms':>8s} {'GB/s':>6s} {'% ceil':>6s} "
              f"{'x torch bf16':>12s} {'x torch fp32':>12s}")
        for name, (b, _) in rows.items():
            gbs = b * n / med[name] / 1e9
            row = {"threads": threads, "row": name, "bytes_per_element": b,
                   "ms": med[name] * 1e3, "gb_s": gbs, "pct_ceiling": 100 * gbs / ceiling_gbs,
                   "x_torch_bf16": med["torch fused bf16"] / med[name],
                   "x_torch_fp32": med["torch fused fp32"] / med[name]}
            results.append(row)
            print(f"{name:28s} {b:4d} {row['ms']:8.2f} {gbs:6.1f} {row['pct_ceiling']:6.0f} "
                  f"{row['x_torch_bf16']:12.2f} {row['x_torch_fp32']:12.2f}")
        print(f"bf16 x torch fused bf16: {med['torch fused bf16'] / med['bf16']:.2f}; "
              f"f32 master/bf16 grads+copy x torch fp32 step + bf16 copy: "
              f"{med['torch fp32 step + bf16 copy'] / med['f32 master/bf16 grads+copy']:.2f}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", f"formats_2e{args.log2}.json")
    with open(out, "w") as f:
        json.dump({"elements": n, "rows": results}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
