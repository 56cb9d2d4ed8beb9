#!/usr/bin/env python3
"""CUDA benchmark: fastoptim's Adam on CuPy arrays against torch.optim and a CuPy kernel.

float32 Adam, one step, timed with CUDA events on the stream the work runs on:

* ``fastoptim``: ``fastoptim.adam_`` on CuPy arrays (one launch per 576 tensors, the
  metadata in the kernel parameters);
* ``torch fused`` / ``torch foreach``: ``torch.optim.Adam(fused=True)`` / ``(foreach=True)``
  on torch CUDA tensors (its own step counter included, as in training);
* ``cupy kernel``: the same update as one fused ``cupy.ElementwiseKernel``, launched once
  per tensor (what a quick hand-written CuPy version does);
* ceilings, measured in the same run on the same sizes: ``d2d copy`` (``cupy.copyto``, 8 bytes
  per element) and ``stream_rmw`` (``fastoptim._core.stream_rmw``: Adam's exact traffic,
  4 streams read and 3 written, with no arithmetic).

Workloads: single buffers of 2^20 .. 2^28 elements; 5,000 tensors of 4,096 elements; 5,000
tensors of 17 elements (launch-bound: host cost per call); and a transformer-like mix (GPT-2
small's 148 parameter tensors, 124M elements).

Bandwidth (GB/s) is the minimal traffic of the update (Adam: 28 bytes per element; copy: 8)
divided by the median time. ``--json`` writes every measurement with the GPU, driver and
library versions. Nothing runs without a CUDA GPU, CuPy and a fastoptim built with CUDA: the
script says which is missing and exits with status 2.

    python bench/bench_cuda.py --json bench_cuda.json          # a few minutes on an H100
    python bench/bench_cuda.py --quick                         # 2^20 .. 2^24, fewer repeats
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from typing import Callable

ADAM_BYTES = 28  # fp32 Adam: param r+w, grad r, exp_avg r+w, exp_avg_sq r+w (4 B each)
COPY_BYTES = 8  # read + write
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M), a transformer-like size mix."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="fastoptim CUDA benchmark (float32 Adam): fastoptim vs torch fused/foreach "
                    "vs a CuPy elementwise kernel, with the device copy bandwidth as ceiling.",
        epilog="Needs a CUDA GPU, CuPy, and fastoptim built with CUDA (docs/cuda.md); torch is "
               "optional (its rows are skipped without a CUDA build of torch).")
    ap.add_argument("--min-log2", type=int, default=20, help="smallest single buffer, log2 elements")
    ap.add_argument("--max-log2", type=int, default=28, help="largest single buffer, log2 elements")
    ap.add_argument("--tensors", type=int, default=5000, help="many-tensors case: tensor count")
    ap.add_argument("--tensor-numel", type=int, default=4096, help="many-tensors case: elements each")
    ap.add_argument("--small-numel", type=int, default=17,
                    help="many-small-tensors case: elements each (0: skip)")
    ap.add_argument("--no-transformer", action="store_true", help="skip the GPT-2-small size mix")
    ap.add_argument("--no-torch", action="store_true", help="skip torch.optim")
    ap.add_argument("--iters", type=int, default=20, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (median and min reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    ap.add_argument("--quick", action="store_true", help="2^20..2^24, 1,000 tensors, fewer repeats")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_log2 = min(args.max_log2, 24)
        args.tensors = min(args.tensors, 1000)
        args.iters, args.repeats, args.warmup = 5, 3, 2
    return args


def require_gpu():
    """Import what the benchmark needs, or exit with status 2 saying what is missing."""
    def fail(why):
        print(f"bench_cuda.py needs a CUDA GPU: {why}", file=sys.stderr)
        sys.exit(2)

    try:
        import fastoptim
    except ImportError as e:
        fail(f"cannot import fastoptim ({e}); pip install . or PYTHONPATH=python")
    cuda = fastoptim._core.info()["cuda"]
    if not cuda["built"]:
        fail("this fastoptim was built without CUDA (docs/cuda.md: FASTOPTIM_CUDA)")
    try:
        import cupy
    except ImportError as e:
        fail(f"CuPy is not installed ({e})")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        fail(f"CuPy finds no usable GPU ({type(e).__name__}: {e})")
    if n < 1:
        fail("no GPU visible")
    if cuda["device_count"] < 1:
        fail(f"fastoptim's CUDA runtime cannot use the GPU: {cuda['error']}")
    return fastoptim, cupy


def time_gpu(step: Callable[[], None], new_event, sync, iters, repeats, warmup):
    """Median and min (ms per step) over `repeats` runs of `iters` steps, by CUDA events."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start, end = new_event(), new_event()
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times), min(times)


class Bench:
    def __init__(self, args, fastoptim, cp):
        self.args, self.fo, self.cp = args, fastoptim, cp
        self.results: list[dict] = []
        self.torch = None
        if not args.no_torch:
            try:
                import torch
                if torch.cuda.is_available():
                    self.torch = torch
            except ImportError:
                pass
        self.adam_kernel = cp.ElementwiseKernel(
            "T g, T beta1, T beta2, T eps, T step_size, T bc2_sqrt",
            "T p, T m, T v",
            """
            m = m + (1 - beta1) * (g - m);
            v = beta2 * v + (1 - beta2) * g * g;
            p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps);
            """,
            "fastoptim_bench_adam")

    # -- timing helpers ------------------------------------------------------------------
    def _cupy_time(self, step):
        cp = self.cp
        a = self.args

        class Ev:
            def __init__(self):
                self.e = cp.cuda.Event()

            def record(self):
                self.e.record()

            def synchronize(self):
                self.e.synchronize()

            def elapsed_time(self, end):
                return cp.cuda.get_elapsed_time(self.e, end.e)

        return time_gpu(step, Ev, cp.cuda.Device().synchronize, a.iters, a.repeats, a.warmup)

    def _torch_time(self, step):
        t, a = self.torch, self.args
        return time_gpu(step, lambda: t.cuda.Event(enable_timing=True), t.cuda.synchronize,
                        a.iters, a.repeats, a.warmup)

    def record(self, workload, impl, shapes, bytes_per_elem, timing, ceiling_gbps=None):
        numel = sum(math.prod(s) for s in shapes)
        med, best = timing
        gbps = bytes_per_elem * numel / (med * 1e-3) / 1e9
        row = dict(workload=workload, impl=impl, n_tensors=len(shapes), numel=numel,
                   ms_median=med, ms_min=best, gbps=gbps,
                   fraction_of_copy=(gbps / ceiling_gbps) if ceiling_gbps else None)
        self.results.append(row)
        frac = f"{row['fraction_of_copy']:.2f}" if ceiling_gbps else "-"
        print(f"{workload:>22} {impl:>16} {med:10.4f} ms {best:10.4f} ms {gbps:9.1f} GB/s  {frac}",
              flush=True)
        return gbps

    def free(self):
        self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    # -- one workload ----------------------------------------------------------------------
    def run(self, workload, shapes):
        cp, fo = self.cp, self.fo
        rng = cp.random.default_rng(0)
        numel = sum(math.prod(s) for s in shapes)

        # Ceiling 1: device-to-device copy of as many elements.
        src = cp.ones(numel, cp.float32)
        dst = cp.empty_like(src)
        copy = self.record(workload, "d2d copy", shapes, COPY_BYTES,
                           self._cupy_time(lambda: cp.copyto(dst, src)))
        del src, dst
        self.free()

        params = [rng.standard_normal(s, dtype=cp.float32) for s in shapes]
        grads = [rng.standard_normal(s, dtype=cp.float32) for s in shapes]
        m = [cp.zeros(s, cp.float32) for s in shapes]
        v = [cp.zeros(s, cp.float32) for s in shapes]

        # Ceiling 2: Adam's traffic with no arithmetic (scale 0: nothing changes).
        self.record(workload, "stream_rmw", shapes, ADAM_BYTES,
                    self._cupy_time(lambda: fo._core.stream_rmw([params, m, v, grads], 3, 0.0)),
                    copy)

        step = 10  # a fixed step: the bias corrections are computed once per call anyway
        self.record(workload, "fastoptim", shapes, ADAM_BYTES, self._cupy_time(
            lambda: fo.adam_(params, grads, m, v, step=step, lr=LR, beta1=BETA1, beta2=BETA2,
                             eps=EPS)), copy)

        step_size = LR / (1 - BETA1**step)
        bc2_sqrt = math.sqrt(1 - BETA2**step)
        consts = [cp.float32(x) for x in (BETA1, BETA2, EPS, step_size, bc2_sqrt)]

        def cupy_step():
            for p, g, mm, vv in zip(params, grads, m, v):
                self.adam_kernel(g, *consts, p, mm, vv)

        self.record(workload, "cupy kernel", shapes, ADAM_BYTES, self._cupy_time(cupy_step), copy)
        self._check(params, grads, shapes)
        del params, grads, m, v
        self.free()

        if self.torch is not None:
            t = self.torch
            tparams = [t.randn(s, device="cuda", dtype=t.float32) for s in shapes]
            for p in tparams:
                p.grad = t.randn_like(p)
            for impl, kw in (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True))):
                opt = t.optim.Adam(tparams, lr=LR, betas=(BETA1, BETA2), eps=EPS, **kw)
                self.record(workload, impl, shapes, ADAM_BYTES, self._torch_time(opt.step), copy)
                del opt
            del tparams
            self.free()

    def _check(self, params, grads, shapes):
        """fastoptim and the CuPy kernel agree on one step from the same state (rtol 1e-5: the
        CuPy kernel rounds x + a*y twice where fastoptim uses one fma)."""
        cp, fo = self.cp, self.fo
        k = min(len(shapes), 4)
        p1 = [p.copy() for p in params[:k]]
        p2 = [p.copy() for p in params[:k]]
        m1, v1 = [cp.zeros_like(p) for p in p1], [cp.zeros_like(p) for p in p1]
        m2, v2 = [cp.zeros_like(p) for p in p1], [cp.zeros_like(p) for p in p1]
        fo.adam_(p1, grads[:k], m1, v1, step=1, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS)
        consts = [cp.float32(x) for x in (BETA1, BETA2, EPS, LR / (1 - BETA1), math.sqrt(1 - BETA2))]
        for p, g, mm, vv in zip(p2, grads[:k], m2, v2):
            self.adam_kernel(g, *consts, p, mm, vv)
        for a, b in zip(p1, p2):
            cp.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def environment(fo, cp, torch):
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        compute_capability=f"{props['major']}.{props['minor']}",
        driver_version=cp.cuda.runtime.driverGetVersion(),
        cupy=cp.__version__,
        cupy_cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
        torch=(torch.__version__ if torch else None),
        fastoptim=fo.__version__,
        fastoptim_cuda=fo._core.info()["cuda"],
        python=platform.python_version(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    fo, cp = require_gpu()
    bench = Bench(args, fo, cp)
    env = environment(fo, cp, bench.torch)
    print(f"# {env['gpu']} (sm_{env['compute_capability'].replace('.', '')}), driver "
          f"{env['driver_version']}, torch {env['torch']}, cupy {env['cupy']}")
    print(f"{'workload':>22} {'impl':>16} {'median':>13} {'min':>13} {'bandwidth':>14}  /copy")
    try:
        for k in range(args.min_log2, args.max_log2 + 1):
            bench.run(f"1 x 2^{k}", [(2**k,)])
        bench.run(f"{args.tensors} x {args.tensor_numel}", [(args.tensor_numel,)] * args.tensors)
        if args.small_numel > 0:
            bench.run(f"{args.tensors} x {args.small_numel}", [(args.small_numel,)] * args.tensors)
        if not args.no_transformer:
            bench.run("gpt2-small mix", gpt2_small_shapes())
    finally:  # what was measured is kept even when a later row fails
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(environment=env, settings=vars(args), results=bench.results), f,
                          indent=1)
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
