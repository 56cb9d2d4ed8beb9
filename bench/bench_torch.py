#!/usr/bin/env python3
"""fastoptim.torch.Adam against torch.optim.Adam and against the raw fastoptim.adam_ call.

Two models, float32, every parameter with a gradient:

* ``one_tensor``: one tensor of 2^24 elements (``--numel``). What the wrapper adds to the raw
  call is fixed per step and per tensor, so here it should vanish (the issue's goal: at most
  10% over the raw call).
* ``many_tensors``: 2,000 tensors of 4,096 elements (``--tensors``, ``--tensor-numel``), where
  per-tensor costs dominate (the goal: faster than ``torch.optim.Adam(fused=True)``).

Implementations, each stepping the SAME parameter and gradient tensors with its own states:

* ``fastoptim.torch``: ``fastoptim.torch.Adam.step()``;
* ``raw adam_``: ``fastoptim.adam_`` on NumPy views of those params, grads and the
  fastoptim.torch optimizer's own states, built once (the floor the wrapper is measured against);
* ``torch foreach`` and ``torch fused``: ``torch.optim.Adam(foreach=True)`` / ``(fused=True)``.

The implementations are timed in turn within each round, so a burst of load from elsewhere
lands on all of them; the table shows the median and the minimum over the rounds. torch and
fastoptim use the same number of threads (``--threads``, default: fastoptim's, i.e. all cores).

    python bench/bench_torch.py                          # about a minute
    python bench/bench_torch.py --quick --json /tmp/bench_torch.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

import torch

import fastoptim.torch as ft

LR = 1e-3


def make_params(count: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(count):
        p = torch.randn(numel, generator=gen).requires_grad_()
        p.grad = torch.randn(numel, generator=gen) * 1e-3
        params.append(p)
    return params


def implementations(params: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    fast = ft.Adam(params, lr=LR)
    fast.step()  # creates the states the raw call will use
    state = [fast.state[p] for p in params]
    views = ([p.detach().numpy() for p in params], [p.grad.numpy() for p in params],
             [s["exp_avg"].numpy() for s in state], [s["exp_avg_sq"].numpy() for s in state])
    step = [2]

    def raw() -> None:
        fastoptim.adam_(*views, step=step[0], lr=LR)
        step[0] += 1

    foreach = torch.optim.Adam(params, lr=LR, foreach=True)
    fused = torch.optim.Adam(params, lr=LR, fused=True)
    return {"fastoptim.torch": fast.step, "raw adam_": raw, "torch foreach": foreach.step,
            "torch fused": fused.step}


def time_round_robin(impls: dict[str, Callable[[], None]], repeats: int,
                     warmup: int) -> dict[str, list[float]]:
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = list(impls.items())
        for r in range(repeats):
            # Rotate the order every round: whatever runs right after torch shares the cores
            # with torch's OpenMP threads while they spin down, and that should not always be
            # the same implementation.
            for name, fn in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (5 instead of 25)")
    ap.add_argument("--repeats", type=int, help="timed rounds per case")
    ap.add_argument("--numel", type=int, default=1 << 24, help="one_tensor size (2^24)")
    ap.add_argument("--tensors", type=int, default=2000, help="many_tensors count (2000)")
    ap.add_argument("--tensor-numel", type=int, default=4096, help="many_tensors size (4096)")
    ap.add_argument("--threads", type=int, help="threads for torch and fastoptim (default: "
                                                "fastoptim's default, all cores)")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 25)
    threads = args.threads or fastoptim.get_num_threads()
    saved_threads = torch.get_num_threads(), fastoptim.get_num_threads()
    torch.set_num_threads(threads)
    fastoptim.set_num_threads(threads)
    cases = {"one_tensor": (1, args.numel), "many_tensors": (args.tensors, args.tensor_numel)}
    rows = []
    try:
        for case, (count, numel) in cases.items():
            params = make_params(count, numel)
            times = time_round_robin(implementations(params), repeats, warmup=2)
            for impl, ts in times.items():
                rows.append({"case": case, "tensors": count, "numel": numel, "impl": impl,
                             "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                             "repeats": repeats})
            del params, times
            gc.collect()
    finally:
        torch.set_num_threads(saved_threads[0])
        fastoptim.set_num_threads(saved_threads[1])

    def stat(case: str, impl: str, key: str = "median_ms") -> float:
        return next(r[key] for r in rows if r["case"] == case and r["impl"] == impl)

    count = {"one_tensor": 1, "many_tensors": args.tensors}
    summary = {}
    for case in cases:
        # The wrapper's cost as a ratio of medians, and as the difference of the minimums
        # (steadier on a loaded machine: the fastest round of each had the least interference).
        summary[f"{case}_wrapper_overhead_vs_raw"] = (
            stat(case, "fastoptim.torch") / stat(case, "raw adam_") - 1)
        extra_ms = stat(case, "fastoptim.torch", "min_ms") - stat(case, "raw adam_", "min_ms")
        summary[f"{case}_wrapper_overhead_min_ms"] = extra_ms
        summary[f"{case}_wrapper_overhead_min_us_per_tensor"] = 1e3 * extra_ms / count[case]
        for other in ("torch fused", "torch foreach"):
            key = other.replace(" ", "_")
            summary[f"{case}_speedup_vs_{key}"] = stat(case, other) / stat(case, "fastoptim.torch")
    print(f"fastoptim {fastoptim.__version__} ({fastoptim.backend_info()['isa']}), torch "
          f"{torch.__version__}, {threads} thread(s), Adam float32, {repeats} rounds")
    header = f"{'case':<14}{'tensors x numel':>18}  {'implementation':<17}{'median':>11}{'min':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<14}{r['tensors']:>8} x {r['numel']:<8}  {r['impl']:<17}"
              f"{r['median_ms']:>8.3f} ms{r['min_ms']:>8.3f} ms")
    for case in cases:
        print(f"{case}: fastoptim.torch over the raw call "
              f"{100 * summary[f'{case}_wrapper_overhead_vs_raw']:+.1f}% (medians), "
              f"{summary[f'{case}_wrapper_overhead_min_ms']:+.3f} ms (minimums, "
              f"{summary[f'{case}_wrapper_overhead_min_us_per_tensor']:+.2f} us per tensor); "
              f"{summary[f'{case}_speedup_vs_torch_fused']:.2f}x torch fused, "
              f"{summary[f'{case}_speedup_vs_torch_foreach']:.2f}x torch foreach")
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "fastoptim": fastoptim.backend_info(), "torch": torch.__version__,
        "threads": threads, "rows": rows, "summary": summary,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
