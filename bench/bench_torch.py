#!/usr/bin/env python3
"""fastoptim.torch.Adam/AdamW against torch.optim and against the raw fastoptim call.

Four parameter sets (``--cases``), float32, every parameter with a gradient:

* ``one_tensor``: one tensor of 2^24 elements (``--numel``). What the wrapper adds to the raw
  call is fixed per step and per tensor, so here it should vanish (the issue's goal: at most
  10% over the raw call).
* ``many_tensors``: 2,000 tensors of 4,096 elements (``--tensors``, ``--tensor-numel``), where
  per-tensor costs dominate (the goal: faster than ``torch.optim.Adam(fused=True)``).
* ``gpt2_small``: the 148 parameter tensors of GPT-2 small (124.4M elements: token and
  position embeddings, 12 blocks of two LayerNorms, attention and MLP weights and biases, the
  final LayerNorm), stepped with AdamW (weight decay 0.01), as transformers are trained.
* ``resnet50``: the 161 parameter tensors of ResNet-50 (25.6M elements: 53 convolutions, 53
  BatchNorms' weights and biases, the classifier), many of them small, with AdamW.

``--dtype bfloat16`` makes every parameter and gradient bfloat16 instead (torch's fused and
foreach optimizers then keep bfloat16 states too, as does fastoptim.torch by default).

Implementations, each stepping the SAME parameter and gradient tensors with its own states:

* ``fastoptim.torch``: ``fastoptim.torch.Adam.step()``;
* ``raw adam_``: ``fastoptim.adam_`` (``adamw_`` for AdamW) on NumPy views of those params,
  grads and the fastoptim.torch optimizer's own states, built once (the floor the wrapper is
  measured against);
* ``torch foreach`` and ``torch fused``: ``torch.optim.Adam(foreach=True)`` / ``(fused=True)``;
* with ``--formats``, ``fastoptim.torch <format>``: the drop-in with a storage option
  (docs/torch.md): ``int8``, ``int4`` or ``bf16-states`` (``state_dtype``), and for bfloat16
  params ``master`` (``master_weights=True``) and ``sr`` (``stochastic_rounding=True``).

The implementations are timed in turn within each round, so a burst of load from elsewhere
lands on all of them; the table shows the median and the minimum over the rounds. torch and
fastoptim use the same number of threads (``--threads``, one or more counts, each a separate
run; default: fastoptim's, i.e. all cores).

    python bench/bench_torch.py                          # about a minute
    python bench/bench_torch.py --quick --json /tmp/bench_torch.json
    python bench/bench_torch.py --cases gpt2_small resnet50 --threads 1 2 --repeats 7
    python bench/bench_torch.py --cases resnet50 many_tensors --dtype bfloat16 --formats master int8
    python bench/bench_torch.py --cases many_tensors --threads 2 --after-torch-op
    python bench/bench_torch.py --cases many_tensors --threads 2 --fresh-grads

``--fresh-grads`` gives every parameter a new gradient before every timed step, made by a
backward pass as in training (so it has no Python object until something reads ``.grad``),
with the same values each time; ``raw adam_`` keeps stepping its views of the first ones.

``--after-torch-op`` runs a torch op right before every timed step, as a training loop's backward
pass does; torch's OpenMP threads are then still spinning when the step starts.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from functools import partial
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


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257,
                     context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (the output projection is tied to the embedding)."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,),                      # ln_1
                   (width, 3 * width), (3 * width,),        # attn.c_attn
                   (width, width), (width,),                # attn.c_proj
                   (width,), (width,),                      # ln_2
                   (width, 4 * width), (4 * width,),        # mlp.c_fc
                   (4 * width, width), (width,)]            # mlp.c_proj
    return shapes + [(width,), (width,)]                     # ln_f


def resnet50_shapes(classes: int = 1000) -> list[tuple[int, ...]]:
    """ResNet-50's parameter shapes: convolutions without bias, BatchNorm weight and bias."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:  # the projection shortcut
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    return shapes + [(classes, channels), (classes,)]


def case_shapes(case: str, args: argparse.Namespace) -> list[tuple[int, ...]]:
    if case == "one_tensor":
        return [(args.numel,)]
    if case == "many_tensors":
        return [(args.tensor_numel,)] * args.tensors
    return {"gpt2_small": gpt2_small_shapes, "resnet50": resnet50_shapes}[case]()


CASES = ("one_tensor", "many_tensors", "gpt2_small", "resnet50")
# AdamW for the real models, as they are trained; Adam for the synthetic cases.
DECOUPLED = {"gpt2_small": True, "resnet50": True}
WEIGHT_DECAY = 0.01


def make_params(shapes: list[tuple[int, ...]], seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def fresh_grads(params: list[torch.Tensor]) -> Callable[[], None]:
    """--fresh-grads: a function that gives every param a new gradient with the values it has
    now, made by autograd (a view per param, then one backward pass), as a training step's
    backward makes them: new tensors, with no Python object until ``.grad`` is read."""
    values = [p.grad.detach().clone() for p in params]

    def make() -> None:
        for p in params:
            p.grad = None
        torch.autograd.backward([p.view_as(p) for p in params], values)
    return make


IMPLS = ("fastoptim.torch", "raw adam_", "torch foreach", "torch fused")
# --formats: the drop-in's storage options (docs/torch.md); the last two for bfloat16 params
FORMATS = {"int8": {"state_dtype": "int8"}, "int4": {"state_dtype": "int4"},
           "bf16-states": {"state_dtype": "bfloat16"}, "master": {"master_weights": True},
           "sr": {"stochastic_rounding": True}}
LOW_ONLY = ("master", "sr")


def implementations(params: list[torch.Tensor], decoupled: bool = False,
                    chosen: tuple[str, ...] = IMPLS,
                    formats: tuple[str, ...] = ()) -> dict[str, Callable[[], None]]:
    name = "AdamW" if decoupled else "Adam"
    kwargs = {"lr": LR, "weight_decay": WEIGHT_DECAY} if decoupled else {"lr": LR}
    fast = getattr(ft, name)(params, **kwargs)
    fast.step()  # creates the states the raw call will use
    state = [fast.state[p] for p in params]
    view = ft._np  # (bfloat16 as ml_dtypes.bfloat16)
    views = ([view(p.detach()) for p in params], [view(p.grad) for p in params],
             [view(s["exp_avg"]) for s in state], [view(s["exp_avg_sq"]) for s in state])
    step = [2]
    update = fastoptim.adamw_ if decoupled else fastoptim.adam_

    def raw() -> None:
        update(*views, step=step[0], **kwargs)
        step[0] += 1

    impls = {"fastoptim.torch": fast.step, "raw adam_": raw}
    for f in formats:
        impls[f"fastoptim.torch {f}"] = getattr(ft, name)(params, **kwargs, **FORMATS[f]).step
    if "torch foreach" in chosen:
        impls["torch foreach"] = getattr(torch.optim, name)(params, foreach=True,
                                                            **kwargs).step
    if "torch fused" in chosen:
        impls["torch fused"] = getattr(torch.optim, name)(params, fused=True, **kwargs).step
    return impls


def time_round_robin(impls: dict[str, Callable[[], None]], repeats: int, warmup: int,
                     before: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Each implementation's step times over ``repeats`` rounds; ``before`` (untimed) runs
    right before every timed step."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = list(impls.items())
        shuffle = random.Random(0).shuffle
        for _ in range(repeats):
            # A new order every round: whatever runs right after torch shares the cores with
            # torch's OpenMP threads while they spin down, and that should not always be the
            # same implementation. (Rotating one order, as this loop used to, keeps every
            # neighbour: the implementation after torch fused was always fastoptim.torch.)
            shuffle(order)
            for name, fn in order:
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=["one_tensor", "many_tensors"],
                    help="parameter sets (default: one_tensor many_tensors)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (5 instead of 25)")
    ap.add_argument("--repeats", type=int, help="timed rounds per case")
    ap.add_argument("--numel", type=int, default=1 << 24, help="one_tensor size (2^24)")
    ap.add_argument("--tensors", type=int, default=2000, help="many_tensors count (2000)")
    ap.add_argument("--tensor-numel", type=int, default=4096, help="many_tensors size (4096)")
    ap.add_argument("--threads", type=int, nargs="+", help="threads for torch and fastoptim, "
                    "one run per count (default: fastoptim's default, all cores)")
    ap.add_argument("--skip", nargs="+", default=[], choices=("torch foreach", "torch fused"),
                    help="leave out these torch implementations (torch foreach takes 10x "
                         "longer than the others on many_tensors)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameters and gradients (default float32)")
    ap.add_argument("--formats", nargs="+", default=[], choices=list(FORMATS),
                    help="also time the drop-in with these storage options (master and sr: "
                         "bfloat16 params only)")
    ap.add_argument("--after-torch-op", action="store_true",
                    help="run a torch op (add_ on 16 MB, untimed) right before every timed "
                         "step, as the backward pass does in training: torch's OpenMP "
                         "threads are then still spinning (docs/torch.md, Threads)")
    ap.add_argument("--fresh-grads", action="store_true",
                    help="a new gradient for every parameter (from a backward pass, untimed) "
                         "before every timed step, as in a training loop that sets .grad to "
                         "None; the raw call keeps its views of the first ones")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    args = ap.parse_args(argv)
    low_only = [f for f in args.formats if f in LOW_ONLY]
    if low_only and args.dtype == "float32":
        ap.error(f"--formats {' '.join(low_only)} need --dtype bfloat16 (float32 params are "
                 "their own master and are rounded as usual)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 25)
    thread_counts = args.threads or [fastoptim.get_num_threads()]
    saved_threads = torch.get_num_threads(), fastoptim.get_num_threads()
    rows = []
    try:
        for case in args.cases:
            shapes = case_shapes(case, args)
            params = make_params(shapes, dtype=getattr(torch, args.dtype))
            for threads in thread_counts:
                torch.set_num_threads(threads)
                fastoptim.set_num_threads(threads)
                impls = implementations(params, DECOUPLED.get(case, False),
                                        tuple(i for i in IMPLS if i not in args.skip),
                                        tuple(args.formats))
                steps = []
                if args.fresh_grads:
                    steps.append(fresh_grads(params))
                if args.after_torch_op:
                    scratch = torch.zeros(1 << 22)
                    steps.append(partial(scratch.add_, 1.0))
                before = (lambda: [f() for f in steps]) if steps else None
                times = time_round_robin(impls, repeats, warmup=2, before=before)
                for impl, ts in times.items():
                    rows.append({"case": case, "tensors": len(shapes),
                                 "numel": sum(p.numel() for p in params), "threads": threads,
                                 "impl": impl, "median_ms": 1e3 * statistics.median(ts),
                                 "min_ms": 1e3 * min(ts), "repeats": repeats,
                                 "after_torch_op": args.after_torch_op,
                                 "fresh_grads": args.fresh_grads})
                del impls, times
                gc.collect()
            del params
            gc.collect()
    finally:
        torch.set_num_threads(saved_threads[0])
        fastoptim.set_num_threads(saved_threads[1])

    def stat(case: str, threads: int, impl: str, key: str = "median_ms") -> float:
        return next(r[key] for r in rows
                    if r["case"] == case and r["threads"] == threads and r["impl"] == impl)

    summary = {}
    for case in args.cases:
        count = next(r["tensors"] for r in rows if r["case"] == case)
        for threads in thread_counts:
            tag = f"{case}_{threads}t"
            # The wrapper's cost as a ratio of medians, and as the difference of the minimums
            # (steadier on a loaded machine: the fastest round of each had the least
            # interference).
            summary[f"{tag}_wrapper_overhead_vs_raw"] = (
                stat(case, threads, "fastoptim.torch") / stat(case, threads, "raw adam_") - 1)
            extra_ms = (stat(case, threads, "fastoptim.torch", "min_ms")
                        - stat(case, threads, "raw adam_", "min_ms"))
            summary[f"{tag}_wrapper_overhead_min_ms"] = extra_ms
            summary[f"{tag}_wrapper_overhead_min_us_per_tensor"] = 1e3 * extra_ms / count
            for other in ("torch fused", "torch foreach"):
                if other in args.skip:
                    continue
                key = other.replace(" ", "_")
                summary[f"{tag}_speedup_vs_{key}"] = (stat(case, threads, other)
                                                      / stat(case, threads, "fastoptim.torch"))
                for f in args.formats:
                    summary[f"{tag}_{f}_speedup_vs_{key}"] = (
                        stat(case, threads, other) / stat(case, threads, f"fastoptim.torch {f}"))
    print(f"fastoptim {fastoptim.__version__} ({fastoptim.backend_info()['isa']}), torch "
          f"{torch.__version__}, {args.dtype}, {repeats} rounds; Adam (AdamW for "
          f"{', '.join(DECOUPLED)})")
    header = (f"{'case':<14}{'tensors':>8}{'elements':>12}{'threads':>8}  {'implementation':<29}"
              f"{'median':>12}{'min':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<14}{r['tensors']:>8}{r['numel']:>12}{r['threads']:>8}  "
              f"{r['impl']:<29}{r['median_ms']:>9.3f} ms {r['min_ms']:>8.3f} ms")
    for case in args.cases:
        for threads in thread_counts:
            tag = f"{case}_{threads}t"
            print(f"{case}, {threads} thread(s): fastoptim.torch over the raw call "
                  f"{100 * summary[f'{tag}_wrapper_overhead_vs_raw']:+.1f}% (medians), "
                  f"{summary[f'{tag}_wrapper_overhead_min_ms']:+.3f} ms (minimums, "
                  f"{summary[f'{tag}_wrapper_overhead_min_us_per_tensor']:+.2f} us per tensor)"
                  + "".join(f"; {summary[f'{tag}_speedup_vs_{key}']:.2f}x {key.replace('_', ' ')}"
                            for key in ("torch_fused", "torch_foreach")
                            if f"{tag}_speedup_vs_{key}" in summary))
            for f in args.formats:
                if f"{tag}_{f}_speedup_vs_torch_fused" in summary:
                    print(f"{case}, {threads} thread(s): fastoptim.torch {f} "
                          f"{summary[f'{tag}_{f}_speedup_vs_torch_fused']:.2f}x torch fused")
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "fastoptim": fastoptim.backend_info(), "torch": torch.__version__,
        "threads": thread_counts, "dtype": args.dtype, "formats": args.formats, "rows": rows,
        "summary": summary,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
