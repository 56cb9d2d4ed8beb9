#!/usr/bin/env python3
"""AdamW with block-wise quantized states (int8, int4) against torch's fused fp32 AdamW on the
same work, plus fastoptim's own fp32 and bf16-state rows, each row's in-place ceiling, and the
state memory measured as resident set size. 1 and 2 threads; medians of 11 interleaved rounds of
batches of 3 steps. Every array lives in memory that torch allocated (numpy views of torch
tensors).

Bytes per element (one step): fp32 28 (p 8, g 4, two states 16); bf16 states 20; int8 16.06 (p 8,
g 4, codes 2 x 2, absmax 2 x 2 x 4/256); int4 14.13 (codes 2 x 1, absmax 2 x 2 x 4/128).
The bfloat16-params rows (p and g bfloat16, as a bf16 model trains): all-bf16 14 (torch fused
bf16 moves the same), bf16 params with int8 states 10.06, with int4 states 8.13, and with int8
states and stochastic rounding of the params 10.06; their "x peer" column is against torch's
fused AdamW on bfloat16 params, whose states are bfloat16 (the only way torch's fused kernel
takes bf16 params); the float32-params rows' peer is torch fused fp32.

Ceilings: each row has its own, the fastest of its in-place loops on arrays of the row's size,
each timed in the same rounds as the row (bench_formats.py's Ceiling): `_core.stream_bytes` on
the row's own arrays with exactly its traffic (p, m, v read and written, g read; a quantized
state's codes, 1 byte per element for int8, half a byte for int4; its absmax, 4 bytes per block,
is left out: 0.06 B/el for int8, 0.13 for int4), in two loop shapes, and `_core.stream_rmw` (in
place, scale 0; of k streams the first k-1 read and written, the last read). fp32 (28 B), bf16
states (20) and all-bf16 (14) get a stream_rmw loop on their own arrays with exactly their
bytes; stream_rmw takes no byte-sized code arrays, so a quantized row's stream_rmw loop is the
pattern closest to its bytes, ties to the fewest bytes on arrays the row does not touch: int8
[P, Mb | G] 16 B (a bf16 array of another row stands in for the two code arrays), int4 the
all-bf16 loop 14 B, bf16p-int8 and bf16p-int4 [P16, G16 | M16] 10 B. The table prints the
ceiling's B/el beside the row's and lists each ceiling's loops and their arrays; "% ceil" = the
row's GB/s (its B/el x elements / its median time) / the fastest loop's GB/s (its B/el x
elements / its median time). A ratio is flagged '*' where the samples of either side spread more
than 1.5x (max/min) or a row runs above 115% of its ceiling, and a pass whose load average
exceeds the usable CPUs is marked BUSY. bitsandbytes' 8-bit AdamW is timed when it is installed
(an optional extra): the median of --bnb-batches batches of 3 steps, alternated with as many
batches of fastoptim int8, which it is compared with. The JSON
(bench/results/quant_2e<log2>_t<threads>_<time>.json, a new file each run, unless --out) keeps
every sample, each ceiling's loop, B/el and GB/s, the thread counts, the size, the state memory
and the load average at the start and end of the run and of each pass.

    PYTHONPATH=python python3 bench/bench_quant.py        # 2^22 elements, about 30 s
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
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import ml_dtypes
import numpy as np
import torch

import fastoptim
from bench_bf16_compute import min_ns_per_isa  # bench/ is the script's directory
from bench_formats import (
    CALLS, Ceiling, Row, finish_run, number_ceilings, run_record, spread,
    time_batch, timed_pass, unsteady, view_of)
from fastoptim.quant import QuantizedState

HYPER = dict(lr=1e-4, weight_decay=1e-2)
BYTES = {"fp32": 28.0, "bf16": 20.0, "int8": 16 + 16 / 256, "int4": 14 + 16 / 128,
         "all-bf16": 14.0, "bf16p-int8": 10 + 16 / 256, "bf16p-int4": 8 + 16 / 128,
         "bf16p-int8-sr": 10 + 16 / 256}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log2", nargs="?", type=int,
                    help="2^log2 elements (default 22; 16 with --in-cache)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts to time (default: 1 2)")
    ap.add_argument("--repeats", type=int, default=11,
                    help="interleaved rounds, one batch of 3 steps of each row and ceiling per "
                         "round; the medians are reported (default 11)")
    ap.add_argument("--bnb-batches", type=int, default=5,
                    help="batches of 3 steps of bitsandbytes (when installed) and of fastoptim "
                         "int8, alternated; the medians are reported (default 5)")
    ap.add_argument("--out", help="the JSON file (default: bench/results/quant_2e<log2>_t"
                                  "<threads>_<time>.json, a new file each run)")
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


def state_memory(log2):
    """RSS growth of the two AdamW states of 2^log2 elements, written once (pages touched), each
    format measured in a fresh interpreter (freed memory would be reused otherwise)."""
    out = {}
    for name in ("fp32", "int8", "int4"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(log2),
                               "--memory", name], capture_output=True, text=True, check=True)
        out[name] = int(proc.stdout.split()[-1])
    return out


def measure_memory(name, n):
    before = rss()
    if name == "fp32":
        st = [torch_f32(n, 1.0), torch_f32(n, 1.0)]
    else:
        bits = 8 if name == "int8" else 4
        st = [quantized(n, bits, False), quantized(n, bits, True)]
        for q in st:
            q.codes[:] = 1
            q.absmax[:] = 1
    print(rss() - before)
    return st


def build_rows(n, seed=0):
    """The rows on n elements, in timing order, each with its ceiling and peer."""
    gen = torch.Generator().manual_seed(seed)
    hyper = HYPER
    p32 = torch.nn.Parameter(torch.randn(n, generator=gen))
    p32.grad = torch.randn(n, generator=gen)
    opt = torch.optim.AdamW([p32], fused=True, **hyper)
    opt.step()
    P, G = p32.data.numpy(), p32.grad.numpy()
    M, V = opt.state[p32]["exp_avg"].numpy(), opt.state[p32]["exp_avg_sq"].numpy()
    q8 = (quantized(n, 8, False), quantized(n, 8, True))
    q4 = (quantized(n, 4, False), quantized(n, 4, True))
    fastoptim.adamw_(P.copy(), G, *q8, step=1, **hyper)
    Mb = view_of(torch.zeros(n, dtype=torch.bfloat16))
    Vb = view_of(torch.zeros(n, dtype=torch.bfloat16))
    # bfloat16 params and grads: torch's fused bf16 AdamW, and fastoptim on its tensors
    p16 = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))
    p16.grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    opt16 = torch.optim.AdamW([p16], fused=True, **hyper)
    opt16.step()
    P16, G16 = view_of(p16.data), view_of(p16.grad)
    M16, V16 = view_of(opt16.state[p16]["exp_avg"]), view_of(opt16.state[p16]["exp_avg_sq"])
    q8b = (quantized(n, 8, False), quantized(n, 8, True))
    q4b = (quantized(n, 4, False), quantized(n, 4, True))
    fastoptim.adamw_(P16.copy(), G16, *q8b, step=1, **hyper)

    named = dict(P=P, G=G, M=M, V=V, Mb=Mb, Vb=Vb, P16=P16, G16=G16, M16=M16, V16=V16)
    for tag, pair in (("q8", q8), ("q4", q4), ("q8b", q8b), ("q4b", q4b)):
        for state, q in zip(("m", "v"), pair):
            named.update({f"{tag}{state} codes": q.codes, f"{tag}{state} absmax": q.absmax})

    def adam(p, g, m, v):
        """AdamW's exact traffic for a ceiling's stream_bytes loops (p, m, v read and written,
        g read); a quantized state is its codes (the absmax, 4 bytes per block, is left out)."""
        return [(p, named[p], "rw"), (g, named[g], "r"), (m, named[m], "rw"), (v, named[v], "rw")]

    def codes(p, g, tag):
        return adam(p, g, f"{tag}m codes", f"{tag}v codes")

    # each ceiling: its stream_rmw loop (the pattern closest to the row's bytes) and the row's
    # exact traffic; the int4 rows share the stream_rmw loop of the row with their pattern
    c_f32 = Ceiling(("P", P), ("M", M), ("V", V), ("G", G), exact=adam("P", "G", "M", "V"))
    c_states_bf16 = Ceiling(("Mb", Mb), ("Vb", Vb), ("P", P), ("G", G),
                            exact=adam("P", "G", "Mb", "Vb"))
    c_int8 = Ceiling(("P", P), ("Mb", Mb), ("G", G), exact=codes("P", "G", "q8"))
    c_bf16 = Ceiling(("P16", P16), ("M16", M16), ("V16", V16), ("G16", G16),
                     exact=adam("P16", "G16", "M16", "V16"))
    c_int4 = Ceiling(exact=codes("P", "G", "q4"), rmw_loop=c_bf16.rmw)
    c_bf16p = Ceiling(("P16", P16), ("G16", G16), ("M16", M16), exact=codes("P16", "G16", "q8b"))
    c_bf16p4 = Ceiling(exact=codes("P16", "G16", "q4b"), rmw_loop=c_bf16p.rmw)

    def own(*names):
        return {k: named[k] for k in names}

    def own_quantized(p, g, tag):  # params, grads and both states' codes and absmax
        return own(p, g, *(f"{tag}{st} {part}" for st in "mv" for part in ("codes", "absmax")))

    f32, b16 = own("P", "G", "M", "V"), own("P16", "G16", "M16", "V16")
    t32, t16 = "torch fused fp32", "torch fused all-bf16"
    q8n, q4n = own_quantized("P", "G", "q8"), own_quantized("P", "G", "q4")
    q8bn, q4bn = own_quantized("P16", "G16", "q8b"), own_quantized("P16", "G16", "q4b")

    def adamw(*arrays, **kw):
        return lambda: fastoptim.adamw_(*arrays, step=5, **kw, **hyper)

    def row(name, fn, ceiling, arrays, peer=None):  # bytes from the name's last word
        return Row(name, BYTES[name.split()[-1]], fn, ceiling, arrays, peer)

    rows = [
        row(t32, opt.step, c_f32, f32),
        row("fastoptim fp32", adamw(P, G, M, V), c_f32, f32, t32),
        row("fastoptim states bf16", adamw(P, G, Mb, Vb), c_states_bf16, own("P", "G", "Mb", "Vb"),
            t32),
        row("fastoptim int8", adamw(P, G, *q8), c_int8, q8n, t32),
        row("fastoptim int4", adamw(P, G, *q4), c_int4, q4n, t32),
        row(t16, opt16.step, c_bf16, b16),
        row("fastoptim all-bf16", adamw(P16, G16, M16, V16), c_bf16, b16, t16),
        row("fastoptim bf16p-int8", adamw(P16, G16, *q8b), c_bf16p, q8bn, t16),
        row("fastoptim bf16p-int4", adamw(P16, G16, *q4b), c_bf16p4, q4bn, t16),
        row("fastoptim bf16p-int8-sr", adamw(P16, G16, *q8b, stochastic_rounding=(1, 5)),
            c_bf16p, q8bn, t16),
    ]
    number_ceilings(rows)
    return rows


def import_bitsandbytes():
    try:
        import bitsandbytes as bnb  # optional
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return bnb


def time_bitsandbytes(bnb, n, int8_row, batches, threads):
    """bitsandbytes' AdamW8bit on its own fp32 param of n elements: `batches` batches of CALLS
    steps, each followed by one of fastoptim int8; every sample and the medians."""
    gen = torch.Generator().manual_seed(1)
    pb = torch.nn.Parameter(torch.randn(n, generator=gen))
    pb.grad = torch.randn(n, generator=gen)
    ob = bnb.optim.AdamW8bit([pb], min_8bit_size=0, **HYPER)
    ob.step()
    tb, ti = [], []
    for _ in range(batches):
        tb.append(time_batch(ob.step))
        ti.append(time_batch(int8_row.fn))
    mb, mi = statistics.median(tb), statistics.median(ti)
    flagged = unsteady(tb, ti)
    print(f"threads {threads} bitsandbytes AdamW8bit: {mb * 1e3:.2f} ms, fastoptim int8 "
          f"{mi * 1e3:.2f} ms (medians of {batches} alternated batches of {CALLS} steps each): "
          f"fastoptim int8 is {mb / mi:.1f}x faster" + ("*" if flagged else ""))
    return {"samples_s": tb, "ms": mb * 1e3, "int8_samples_s": ti, "int8_ms": mi * 1e3,
            "x_int8": mb / mi, "spread": spread(tb), "unsteady": flagged}


def main(args):
    n = 2**args.log2
    doc = run_record(n, args.log2, args.threads, args.repeats)
    doc.update(state_memory_bytes=None, bitsandbytes=None)
    if not args.no_memory:
        mem = doc["state_memory_bytes"] = state_memory(args.log2)
        print(f"N = 2^{args.log2}; state memory (RSS growth, both AdamW states): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB ({v / mem['fp32']:.3f}x fp32)" for k, v in mem.items()))
    bnb = import_bitsandbytes()
    doc["bitsandbytes"] = getattr(bnb, "__version__", "installed") if bnb is not None else None
    print(f"N = 2^{args.log2}; fastoptim ISA {doc['isa']}; load average {doc['load_start'][0]:.2f}")
    rows = build_rows(n)
    ceilings = number_ceilings(rows)
    for threads in args.threads:
        summary, pass_doc = timed_pass(rows, ceilings, n, threads, args.repeats)
        doc["rows"] += summary
        pass_doc["bitsandbytes"] = None
        if bnb is not None:
            int8 = next(r for r in rows if r.name == "fastoptim int8")
            pass_doc["bitsandbytes"] = time_bitsandbytes(bnb, n, int8, args.bnb_batches, threads)
        else:
            print(f"threads {threads} bitsandbytes: not installed (optional), skipped")
        doc["passes"].append(pass_doc)
    finish_run(doc, "quant", args.log2, args.threads, args.out)


def in_cache(args):
    """ns/element of AdamW with fp32, int8 and int4 states on float32 params, and int8 and int4
    states on bfloat16 params and grads (bf16p-), per ISA (the --in-cache mode)."""
    n = 2**args.log2
    rng = np.random.default_rng(0)
    hyper = dict(lr=1e-4, weight_decay=1e-2)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    pb, gb = p.astype(ml_dtypes.bfloat16), g.astype(ml_dtypes.bfloat16)
    cells = {"fp32": (p, g, np.zeros(n, np.float32), np.zeros(n, np.float32))}
    for prefix, (pp, gg) in (("", (p, g)), ("bf16p-", (pb, gb))):
        for bits in (8, 4):
            st = (QuantizedState.zeros((n,), bits),
                  QuantizedState.zeros((n,), bits, non_negative=True))
            for step in (1, 2, 3):  # states with nonzero absmax and codes
                fastoptim.adamw_(pp, gg, *st, step=step, **hyper)
            cells[f"{prefix}int{bits}"] = (pp, gg, *st)
    print(f"AdamW, 2^{args.log2} elements, 1 thread; ns/element, min of {args.reps} x "
          f"{args.calls} calls")
    print(f"{'ISA':12s}" + "".join(f" {k:>10s}" for k in cells) + "  int8/fp32  int4/fp32")
    cells = {name: (lambda a=a: fastoptim.adamw_(*a, step=5, **hyper))
             for name, a in cells.items()}
    for isa, best in min_ns_per_isa(cells, n, args.reps, args.calls):
        print(f"{isa:12s}" + "".join(f" {v:10.3f}" for v in best.values())
              + f"  {best['int8'] / best['fp32']:9.2f}  {best['int4'] / best['fp32']:9.2f}")


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.in_cache:
        in_cache(ARGS)
    elif ARGS.memory:
        measure_memory(ARGS.memory, 2**ARGS.log2)
    else:
        main(ARGS)
