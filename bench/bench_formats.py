#!/usr/bin/env python3
"""AdamW in every storage format and mixed-precision option of fastoptim, against torch's fused
AdamW (bf16, fp16 and fp32) on the SAME memory, each row with its own in-place bandwidth ceiling.

Rows (docs/api.md, "Storage formats"; bytes per element moved by one step in brackets):
  fp32                      params, grads, states float32                        [28]
  bf16                      all bfloat16 (torch fused's bf16 behaviour)          [14]
  bf16 +stochastic          all bfloat16, params stored with stochastic rounding [14]
  bf16 +kahan               all bfloat16 + bfloat16 compensation (r+w)           [18]
  bf16/f32 states           bfloat16 params and grads, float32 states            [22]
  bf16/f32 states +stoch.   the same, stochastic rounding of the params          [22]
  f32 master/bf16 grads     float32 params and states, bfloat16 grads            [26]
  ... +copy                 + the model's bfloat16 copy of the params, written   [28]
  fp16 / fp16/f32 states / f32 master/fp16 grads (+copy): the float16 twins
  fp32 +grad_scale          fp32 with torch.amp's grad_scale unscaled in the kernel [28]
torch rows: torch.optim.AdamW(fused=True) on the bf16, fp16 and fp32 tensors whose memory the
fastoptim rows update (the ndarrays are views of torch's own tensors); torch's fp32 step
followed by `copy.copy_(param)` to a bf16 / fp16 copy, what the master-weights +copy rows do in
one pass (torch's fp32 step reads the fp32 grad, 2 bytes more than ours: 28 + 6 = 34 bytes);
and torch's fused fp32 step with the grad_scale and found_inf tensors torch.amp.GradScaler.step
gives it (set as the optimizer's attributes, as the scaler does), on its own fp32 tensors, whose
grads hold the scaled values again before each batch (torch unscales them in place: it writes
the grad back, 32 bytes). Each row's "peer" column names the torch row it is compared with: the
bf16/f32-states rows' peer is torch fused all-bf16 (torch's fused kernel takes bf16 params only
with bf16 states), the master-weights rows' torch's fp32 step (+ the copy).

Ceilings: each row has its own, the fastest of its in-place loops over arrays of the row's size,
each timed every round: `_core.stream_bytes` on the row's OWN arrays with exactly its traffic
(each array read, written or both as AdamW moves it; integer work only, no conversion between
the loop and the memory: Note [byte ceiling] in src/cpp/kernels.h), in two loop shapes
(BYTE_SHAPES: which one the memory likes best depends on the arrays and where they sit), and
`_core.stream_rmw` (scale 0: the values written are the values read; the first k-1 of its k
streams read and written, the last read), the pattern whose bytes are closest to the row's, ties
to the one with the fewest bytes on arrays the row does not touch. Most rows get a stream_rmw
loop of exactly their bytes on their own arrays (fp32, all-bf16 and all-fp16, kahan, bf16/f32
states, the +copy rows); the fp16/f32-states and f32 master/fp16 rows get their bytes with bf16
arrays in place of their fp16 ones (stream_rmw takes no float32-with-float16-states pattern),
f32 master/bf16 grads and torch +grad_scale with one or two bf16 arrays of other rows; the torch
step + copy rows (34 B: the copy reads the param again, a traffic no single pass has) get only a
stream_rmw loop, on their own arrays at 32 B. The mixed-dtype stream_rmw loops convert every
value both ways and ran slower than the rows they were to bound; stream_bytes has no such cost.
The table prints the ceiling's B/el beside the row's and lists each ceiling's loops (the fastest
first, marked '>'), their arrays and those the row does not touch. "% ceil" is the row's
achieved GB/s (its B/el x elements / its median time) over the fastest loop's GB/s (the loop's
B/el x elements / its median time). Each round times every row and each ceiling loop (once a
round, right after the first row that uses it) as a batch of 3 steps after one untimed step; the
figures are medians over --reps rounds (default 9), and a ratio is flagged '*' where the samples
of either side spread more than 1.5x (max/min) or a row runs above 115% of its ceiling; a pass
whose load average exceeds the usable CPUs is marked BUSY (a side that stalls in every round has
no spread). 1 and 2 threads. The JSON (bench/results/formats_2e<log2>_t<threads>_<time>.json, a
new file each run, unless --out) keeps every sample, each ceiling's loop, B/el and GB/s, and the
load average at the start and end of the run and of each pass.

    PYTHONPATH=python python3 bench/bench_formats.py            # 2^24 elements, ~2 minutes
    PYTHONPATH=python python3 bench/bench_formats.py --log2 26  # 2^26, ~8 minutes, ~4.5 GiB
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import ml_dtypes
import numpy as np
import torch

import fastoptim

BF16 = ml_dtypes.bfloat16
GRAD_SCALE = 65536.0
CALLS = 3  # timed steps per batch (after one untimed step)
SPREAD_LIMIT = 1.5  # max/min of a side's samples above which its ratios are flagged
PCT_LIMIT = 115.0  # % of the ceiling above which the ceiling's samples must have stalled
FLAG = "*"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPE_NAMES = {np.dtype(np.float32): "f32", np.dtype(BF16): "bf16", np.dtype(np.float16): "f16"}


def view_of(t: torch.Tensor) -> np.ndarray:
    """An ndarray on the tensor's own memory (bf16 through an int16 view)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


# ---- shared with bench_quant.py: ceilings, interleaved timing, the noise flag, the table ----

# The shapes of the stream_bytes loops, (prefetch_ahead, run): Note [byte ceiling] in
# src/cpp/kernels.h. On a Zen 4 VM at 2^26 (1 thread) the first was the fastest for fp32 and
# mixed fp32/bf16 streams, the second for four bf16 streams (43-46 GB/s where every other
# shape, and stream_rmw, reached 29-30).
BYTE_SHAPES = ((256, 1), (0, 8))


class Loop:
    """One in-place loop of a ceiling, timed on its own: `_core.stream_rmw` over `rmw` (the
    first len-1 streams read and written, scale 0: rewritten unchanged, the last read), or
    `_core.stream_bytes` over `exact` ((name, array, mode) with mode 'r', 'w' or 'rw': the
    row's own traffic, values unchanged, write-only streams zeroed) in one of BYTE_SHAPES."""

    def __init__(self, rmw: Sequence[tuple[str, np.ndarray]] = (),
                 exact: Sequence[tuple[str, np.ndarray, str]] = (),
                 shape: tuple[int, int] = (0, 1)) -> None:
        if bool(rmw) == bool(exact):
            raise ValueError("a loop is stream_rmw (rmw) or stream_bytes (exact)")
        if rmw and not 2 <= len(rmw) <= 5:
            raise ValueError("stream_rmw takes 2 to 5 streams")
        self.rmw = bool(rmw)
        self.names = [x[0] for x in (rmw or exact)]
        self.arrays = [x[1] for x in (rmw or exact)]
        self.modes = ["rw"] * (len(rmw) - 1) + ["r"] if rmw else [x[2] for x in exact]
        self.shape = shape
        self.elements = self.arrays[0].size
        self.key = ""  # c1.0, c1.1, ... (number_ceilings)

    @property
    def bytes_per_element(self) -> float:
        return sum(a.nbytes * len(m) for a, m in zip(self.arrays, self.modes)) / self.elements

    def describe(self) -> str:
        names = [f"{name} {DTYPE_NAMES.get(a.dtype, a.dtype)}"
                 for name, a in zip(self.names, self.arrays)]
        if self.rmw:
            return f"stream_rmw([{', '.join(names[:-1])} | {names[-1]}])"
        streams = ", ".join(f"{x} {m}" for x, m in zip(names, self.modes))
        return f"stream_bytes([{streams}], prefetch {self.shape[0]}, run {self.shape[1]})"

    def __call__(self) -> None:
        if self.rmw:
            fastoptim._core.stream_rmw(self.arrays, len(self.arrays) - 1, 0.0)
        else:
            fastoptim._core.stream_bytes(self.arrays, self.modes, self.elements, *self.shape)


class Ceiling:
    """A row's in-place ceiling: the fastest of its loops (each timed every round). `streams`:
    the stream_rmw loop (as before stream_bytes existed), or none; `exact`: the row's own
    traffic, (name, array, mode), for one stream_bytes loop per BYTE_SHAPES; `rmw_loop`: a
    stream_rmw Loop shared with another ceiling (timed once a round)."""

    def __init__(self, *streams: tuple[str, np.ndarray],
                 exact: Sequence[tuple[str, np.ndarray, str]] = (),
                 rmw_loop: Optional[Loop] = None) -> None:
        self.loops: list[Loop] = [rmw_loop] if rmw_loop else [Loop(rmw=streams)] if streams else []
        self.loops += [Loop(exact=exact, shape=sh) for sh in BYTE_SHAPES] if exact else []
        if not self.loops:
            raise ValueError("a ceiling needs a loop")
        self.id = ""  # c1, c2, ... in the order of the rows (number_ceilings)

    @property
    def rmw(self) -> Optional[Loop]:
        return next((x for x in self.loops if x.rmw), None)


@dataclasses.dataclass
class Row:
    name: str
    bytes_per_element: float
    fn: Callable[[], object]
    ceiling: Ceiling
    arrays: dict[str, np.ndarray]  # the arrays the row reads or writes, by name
    peer: Optional[str] = None  # the torch row it is compared with
    before: Optional[Callable[[], object]] = None  # before each batch, not timed


def number_ceilings(rows: Sequence[Row]) -> list[Ceiling]:
    """The distinct ceilings, numbered c1, c2, ... in the order of the rows that use them; a
    loop is keyed by the first ceiling that has it (c1.0, c1.1, ...)."""
    out: list[Ceiling] = []
    for r in rows:
        if all(c is not r.ceiling for c in out):
            out.append(r.ceiling)
            r.ceiling.id = f"c{len(out)}"
            for k, loop in enumerate(r.ceiling.loops):
                loop.key = loop.key or f"{r.ceiling.id}.{k}"
    return out


def time_batch(fn: Callable[[], object], before: Optional[Callable[[], object]] = None,
               calls: int = CALLS) -> float:
    """Seconds per call of a batch of `calls` calls after one untimed call."""
    if before is not None:
        before()
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def interleaved_rounds(rows: Sequence[Row], rounds: int
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every sample of every row and ceiling loop (by Loop.key): each round times each row in
    turn, and each loop of its ceiling once a round, right after the first row that uses it."""
    row_s: dict[str, list[float]] = {r.name: [] for r in rows}
    ceil_s: dict[str, list[float]] = {x.key: [] for r in rows for x in r.ceiling.loops}
    for _ in range(rounds):
        done: set[str] = set()
        for r in rows:
            row_s[r.name].append(time_batch(r.fn, r.before))
            for loop in r.ceiling.loops:
                if loop.key not in done:
                    ceil_s[loop.key].append(time_batch(loop))
                    done.add(loop.key)
    return row_s, ceil_s


def ceiling_loops(c: Ceiling, ceil_s: dict[str, list[float]], n: int) -> list[dict]:
    """Each loop of the ceiling: its description, B/el, samples and GB/s (its B/el x n / its
    median time), fastest first."""
    out = [{"loop": x.describe(), "names": x.names, "bytes_per_element": x.bytes_per_element,
            "samples_s": ceil_s[x.key],
            "gb_s": x.bytes_per_element * n / statistics.median(ceil_s[x.key]) / 1e9}
           for x in c.loops]
    return sorted(out, key=lambda d: -d["gb_s"])


def spread(samples: Sequence[float]) -> float:
    """max / min of the samples (inf if one is not positive)."""
    return max(samples) / min(samples) if min(samples) > 0 else float("inf")


def unsteady(*sides: Sequence[float]) -> bool:
    """Whether the samples of either side of a ratio spread more than SPREAD_LIMIT."""
    return any(spread(s) > SPREAD_LIMIT for s in sides)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_note(load0: Sequence[float], load1: Sequence[float]) -> str:
    """A warning when the 1-minute load average at the start or end of a pass exceeds the
    usable CPUs: other processes then take the cores in turns, and a row whose every sample
    stalls the same way is not caught by the spread flag."""
    cpus, worst = usable_cpus(), max(load0[0], load1[0])
    if worst <= cpus:
        return ""
    return (f"BUSY MACHINE: load average {worst:.2f} > {cpus} usable CPUs; other processes take "
            f"the cores in turns, and a side that stalled in every round is not flagged: rerun "
            f"on an idle machine before trusting any ratio")


def results_path(prefix: str, log2: int, threads: Sequence[int], out: Optional[str]) -> str:
    """--out, else bench/results/<prefix>_2e<log2>_t<threads>_<local time>.json (never an
    earlier run's file)."""
    if out:
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS, f"{prefix}_2e{log2}_t{'-'.join(map(str, threads))}_{stamp}.json")


def write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def finish_run(doc: dict, prefix: str, log2: int, threads: Sequence[int],
               out: Optional[str]) -> None:
    """Closes a run's JSON (the load average and time at its end) and writes it to --out or a
    new results file (results_path), saying where."""
    doc["load_end"] = load_average()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = results_path(prefix, log2, threads, out)
    write_json(path, doc)
    print(f"\nwrote {path}")


def summarize(rows: Sequence[Row], row_s: dict[str, list[float]],
              ceil_s: dict[str, list[float]], n: int, threads: int) -> list[dict]:
    """One JSON row per Row: every sample, the medians, GB/s, the ceiling's and the ratios."""
    med = {k: statistics.median(v) for k, v in row_s.items()}
    out = []
    for r in rows:
        c = r.ceiling
        gbs = r.bytes_per_element * n / med[r.name] / 1e9
        loops = ceiling_loops(c, ceil_s, n)
        best = loops[0]  # the fastest loop is the ceiling
        c_gbs = best["gb_s"]
        d = {"threads": threads, "row": r.name, "bytes_per_element": r.bytes_per_element,
             "arrays": list(r.arrays), "samples_s": row_s[r.name], "ms": med[r.name] * 1e3,
             "gb_s": gbs, "spread": spread(row_s[r.name]),
             "ceiling": c.id, "ceiling_loop": best["loop"],
             "ceiling_bytes_per_element": best["bytes_per_element"],
             "ceiling_other_arrays": [x for x in best["names"] if x not in r.arrays],
             "ceiling_samples_s": best["samples_s"],
             "ceiling_ms": statistics.median(best["samples_s"]) * 1e3, "ceiling_gb_s": c_gbs,
             "ceiling_spread": spread(best["samples_s"]),
             "ceiling_loops": {x["loop"]: x["gb_s"] for x in loops},
             "pct_ceiling": 100 * gbs / c_gbs,
             "pct_ceiling_unsteady": (unsteady(row_s[r.name], best["samples_s"])
                                      or 100 * gbs / c_gbs > PCT_LIMIT),
             "peer": r.peer, "x_peer": None, "x_peer_unsteady": None}
        if r.peer is not None:
            d["x_peer"] = med[r.peer] / med[r.name]
            d["x_peer_unsteady"] = unsteady(row_s[r.name], row_s[r.peer])
        out.append(d)
    return out


def run_record(n: int, log2: int, threads: Sequence[int], rounds: int) -> dict:
    """The head of a run's JSON; main adds "passes", "rows", "load_end" and "finished"."""
    return {"elements": n, "log2": log2, "threads": list(threads), "rounds": rounds,
            "steps_per_batch": CALLS, "spread_limit": SPREAD_LIMIT, "pct_limit": PCT_LIMIT,
            "usable_cpus": usable_cpus(), "isa": fastoptim.backend_info().get("isa"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_start": load_average(),
            "passes": [], "rows": []}


def pass_record(threads: int, load0: Sequence[float], load1: Sequence[float], note: str,
                ceilings: Sequence[Ceiling], ceil_s: dict[str, list[float]], n: int) -> dict:
    """One thread count's record: the load, the busy flag, each ceiling's loops (fastest
    first) with their B/el, samples and GB/s."""
    return {"threads": threads, "load_start": list(load0), "load_end": list(load1),
            "busy": bool(note),
            "ceilings": {c.id: ceiling_loops(c, ceil_s, n) for c in ceilings}}


def print_table(title: str, summary: Sequence[dict], ceilings: Sequence[Ceiling],
                rounds: int, note: str = "") -> None:
    print(f"\n{title}")
    if note:
        print(note)
    print(f"{'':10s}{'row':30s} {'median':>12s} {'row B/el':>11s} {'GB/s':>11s} | {'ceil':>4s} "
          f"{'ceil B/el':>11s} {'GB/s':>11s} {'% ceil':>7s} | x peer (its time / row's)")
    for d in summary:
        pct = f"{d['pct_ceiling']:5.0f}%" + (FLAG if d["pct_ceiling_unsteady"] else " ")
        peer = "| (a peer)" if d["peer"] is None else (
            f"| x {d['peer']} {d['x_peer']:.2f}" + (FLAG if d["x_peer_unsteady"] else ""))
        print(f"threads {d['threads']} {d['row']:30s} {d['ms']:9.3f} ms "
              f"{d['bytes_per_element']:6.2f} B/el {d['gb_s']:6.1f} GB/s | {d['ceiling']:>4s} "
              f"{d['ceiling_bytes_per_element']:6.2f} B/el {d['ceiling_gb_s']:6.1f} GB/s "
              f"{pct} {peer}")
    print(f"% ceil = the row's GB/s / its ceiling's GB/s, each its own B/el x elements / its "
          f"median time over {rounds} interleaved rounds of {CALLS} steps; a ceiling is the "
          f"fastest of its loops,\nall in place on arrays of the row's size (stream_rmw: before "
          f"'|' read and written, after it read; stream_bytes: the row's own arrays, r / w / rw):")
    for c in ceilings:
        users = [d for d in summary if d["ceiling"] == c.id]
        rows = ", ".join(d["row"] + (f" (not its arrays: {', '.join(d['ceiling_other_arrays'])})"
                                     if d["ceiling_other_arrays"] else "") for d in users)
        print(f"  {c.id:>3s} {users[0]['ceiling_gb_s']:.1f} GB/s (spread "
              f"{users[0]['ceiling_spread']:.2f}), for {rows}:")
        for k, (loop, g) in enumerate(users[0]["ceiling_loops"].items()):
            bpe = next(x.bytes_per_element for x in c.loops if x.describe() == loop)
            print(f"      {'>' if k == 0 else ' '} {loop} {bpe:.2f} B/el {g:.1f} GB/s")
    flagged = sum(bool(d["pct_ceiling_unsteady"]) + bool(d["x_peer_unsteady"]) for d in summary)
    print(f"{FLAG} = the samples of the row or of the other side spread more than "
          f"{SPREAD_LIMIT}x (max/min over the rounds), or % ceil > {PCT_LIMIT:.0f}: the machine "
          f"was busy, the ratio is not to be trusted ({flagged} flagged)")


# ---- the formats benchmark ----

def fused_adamw(n: int, dtype: torch.dtype, gen: torch.Generator):
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
    p.grad = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    opt.step()
    st = opt.state[p]
    return opt, [view_of(x) for x in (p.data, p.grad, st["exp_avg"], st["exp_avg_sq"])]


def build_rows(n: int, seed: int = 0) -> list[Row]:
    """The rows on n elements, in timing order, each with its ceiling and peer."""
    gen = torch.Generator().manual_seed(seed)
    t_bf16, (P, G, M, V) = fused_adamw(n, torch.bfloat16, gen)
    t_f32, (P32, G32, M32, V32) = fused_adamw(n, torch.float32, gen)
    t_f16, (H, HG, HM, HV) = fused_adamw(n, torch.float16, gen)
    # fp32 states for the low-precision params, a bf16/f16 grad and copy for the fp32 master
    # rows, a compensation: allocated once, beside torch's tensors
    M32b, V32b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    Gb, Gh = G32.astype(BF16), G32.astype(np.float16)
    Cb, Ch = np.zeros(n, BF16), np.zeros(n, np.float16)
    K = np.zeros(n, BF16)
    # torch's way to the master-weights rows: its fp32 fused step, then the low-precision copy
    p32_t = t_f32.param_groups[0]["params"][0]
    copy_b, copy_h = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.float16)
    TCb, TCh = view_of(copy_b), view_of(copy_h)

    def torch_master(copy: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            t_f32.step()
            copy.copy_(p32_t.data)
        return step

    # torch's fp32 step under torch.amp: GradScaler.step sets these two attributes, the fused
    # kernel unscales the grads in place; the scaled grads are put back before each batch
    t_gs, (Ps, Gs, Ms, Vs) = fused_adamw(n, torch.float32, gen)
    gs_t = t_gs.param_groups[0]["params"][0].grad
    gs_t.mul_(GRAD_SCALE)
    g_scaled = gs_t.clone()
    t_gs.grad_scale = torch.tensor(GRAD_SCALE)  # type: ignore[attr-defined]
    t_gs.found_inf = torch.zeros(())  # type: ignore[attr-defined]

    named = dict(P=P, G=G, M=M, V=V, P32=P32, G32=G32, M32=M32, V32=V32, H=H, HG=HG, HM=HM,
                 HV=HV, M32b=M32b, V32b=V32b, Gb=Gb, Gh=Gh, Cb=Cb, Ch=Ch, K=K, TCb=TCb, TCh=TCh,
                 Ps=Ps, Gs=Gs, Ms=Ms, Vs=Vs)

    def adam(p: str, g: str, m: str, v: str, *extra: tuple[str, str]
             ) -> list[tuple[str, np.ndarray, str]]:
        """AdamW's exact traffic, for a ceiling's stream_bytes loops: p, m, v read and written,
        g read (rw: torch's in-place unscale), and each (name, mode) of `extra`."""
        modes = [(p, "rw"), (g, "rw" if g == "Gs" else "r"), (m, "rw"), (v, "rw"), *extra]
        return [(x, named[x], mode) for x, mode in modes]

    # each ceiling: its stream_rmw loop and the row's exact traffic; rows that share a
    # stream_rmw loop but not their arrays share the loop (timed once a round)
    c_f32 = Ceiling(("P32", P32), ("M32", M32), ("V32", V32), ("G32", G32),
                    exact=adam("P32", "G32", "M32", "V32"))
    c_bf16 = Ceiling(("P", P), ("M", M), ("V", V), ("G", G), exact=adam("P", "G", "M", "V"))
    c_kahan = Ceiling(("P", P), ("M", M), ("V", V), ("K", K), ("G", G),
                      exact=adam("P", "G", "M", "V", ("K", "rw")))
    c_bf16_f32 = Ceiling(("M32b", M32b), ("V32b", V32b), ("P", P), ("G", G),
                         exact=adam("P", "G", "M32b", "V32b"))
    c_f16_f32 = Ceiling(exact=adam("H", "HG", "M32b", "V32b"), rmw_loop=c_bf16_f32.rmw)
    c_master_b = Ceiling(("P32", P32), ("M32", M32), ("Gb", Gb), ("Cb", Cb), ("K", K),
                         exact=adam("P32", "Gb", "M32", "V32"))
    c_master_h = Ceiling(exact=adam("P32", "Gh", "M32", "V32"), rmw_loop=c_master_b.rmw)
    c_master_b_copy = Ceiling(("Gb", Gb), ("Cb", Cb), ("M32", M32), ("V32", V32), ("P32", P32),
                              exact=adam("P32", "Gb", "M32", "V32", ("Cb", "w")))
    c_f16 = Ceiling(("H", H), ("HM", HM), ("HV", HV), ("HG", HG),
                    exact=adam("H", "HG", "HM", "HV"))
    c_master_h_copy = Ceiling(("Gh", Gh), ("Ch", Ch), ("M32", M32), ("V32", V32), ("P32", P32),
                              exact=adam("P32", "Gh", "M32", "V32", ("Ch", "w")))
    c_torch_gs = Ceiling(("Ps", Ps), ("K", K), ("Gs", Gs), ("Ms", Ms), ("Vs", Vs),
                         exact=adam("Ps", "Gs", "Ms", "Vs"))
    # torch's step + copy reads the param twice (34 B): no single pass has its traffic
    c_torch_cb = Ceiling(("P32", P32), ("TCb", TCb), ("M32", M32), ("V32", V32), ("G32", G32))
    c_torch_ch = Ceiling(("P32", P32), ("TCh", TCh), ("M32", M32), ("V32", V32), ("G32", G32))

    def own(*names: str) -> dict[str, np.ndarray]:
        return {k: named[k] for k in names}

    kw = dict(step=5, lr=1e-4)
    f32, b16 = own("P32", "G32", "M32", "V32"), own("P", "G", "M", "V")
    h16 = own("H", "HG", "HM", "HV")
    tb, th, t32 = "torch fused bf16", "torch fused fp16", "torch fused fp32"
    tcb, tch = "torch fp32 step + bf16 copy", "torch fp32 step + fp16 copy"
    tgs = "torch fused fp32 +grad_scale"
    rows = [
        Row("fp32", 28, lambda: fastoptim.adamw_(P32, G32, M32, V32, **kw), c_f32, f32, t32),
        Row("bf16", 14, lambda: fastoptim.adamw_(P, G, M, V, **kw), c_bf16, b16, tb),
        Row("bf16 +stochastic", 14, lambda: fastoptim.adamw_(
            P, G, M, V, **kw, stochastic_rounding=(0, 5)), c_bf16, b16, tb),
        Row("bf16 +kahan", 18, lambda: fastoptim.adamw_(P, G, M, V, **kw, compensation=K),
            c_kahan, own("P", "G", "M", "V", "K"), tb),
        Row("bf16/f32 states", 22, lambda: fastoptim.adamw_(P, G, M32b, V32b, **kw),
            c_bf16_f32, own("P", "G", "M32b", "V32b"), tb),
        Row("bf16/f32 states +stoch.", 22, lambda: fastoptim.adamw_(
            P, G, M32b, V32b, **kw, stochastic_rounding=(0, 5)),
            c_bf16_f32, own("P", "G", "M32b", "V32b"), tb),
        Row("f32 master/bf16 grads", 26, lambda: fastoptim.adamw_(P32, Gb, M32, V32, **kw),
            c_master_b, own("P32", "Gb", "M32", "V32"), t32),
        Row("f32 master/bf16 grads+copy", 28, lambda: fastoptim.adamw_(
            P32, Gb, M32, V32, **kw, param_copies=Cb),
            c_master_b_copy, own("P32", "Gb", "M32", "V32", "Cb"), tcb),
        Row("fp16", 14, lambda: fastoptim.adamw_(H, HG, HM, HV, **kw), c_f16, h16, th),
        Row("fp16/f32 states", 22, lambda: fastoptim.adamw_(H, HG, M32b, V32b, **kw),
            c_f16_f32, own("H", "HG", "M32b", "V32b"), th),
        Row("f32 master/fp16 grads", 26, lambda: fastoptim.adamw_(P32, Gh, M32, V32, **kw),
            c_master_h, own("P32", "Gh", "M32", "V32"), t32),
        Row("f32 master/fp16 grads+copy", 28, lambda: fastoptim.adamw_(
            P32, Gh, M32, V32, **kw, param_copies=Ch),
            c_master_h_copy, own("P32", "Gh", "M32", "V32", "Ch"), tch),
        Row("fp32 +grad_scale", 28, lambda: fastoptim.adamw_(
            P32, G32, M32, V32, **kw, grad_scale=GRAD_SCALE), c_f32, f32, tgs),
        Row(tb, 14, t_bf16.step, c_bf16, b16),
        Row(th, 14, t_f16.step, c_f16, h16),
        Row(t32, 28, t_f32.step, c_f32, f32),
        Row(tgs, 32, t_gs.step, c_torch_gs, own("Ps", "Gs", "Ms", "Vs"),
            before=lambda: gs_t.copy_(g_scaled)),
        Row(tcb, 34, torch_master(copy_b), c_torch_cb, own("P32", "G32", "M32", "V32", "TCb")),
        Row(tch, 34, torch_master(copy_h), c_torch_ch, own("P32", "G32", "M32", "V32", "TCh")),
    ]
    number_ceilings(rows)
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--log2", type=int, default=24, help="elements = 2**log2 (default 24)")
    ap.add_argument("--reps", type=int, default=9,
                    help="interleaved rounds, one sample of each row and ceiling per round "
                         "(default 9; fewer than 7 makes the medians fragile)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", help="the JSON file (default: bench/results/formats_2e<log2>_t"
                                  "<threads>_<time>.json, a new file each run)")
    return ap.parse_args(argv)



def timed_pass(rows: Sequence[Row], ceilings: Sequence[Ceiling], n: int, threads: int,
               reps: int) -> tuple[list[dict], dict]:
    """One thread count's pass (shared with bench_quant.py): the interleaved rounds, the table
    printed, and (the rows' summaries, the pass's JSON record)."""
    torch.set_num_threads(threads)
    fastoptim.set_num_threads(threads)
    load0 = load_average()
    row_s, ceil_s = interleaved_rounds(rows, reps)
    load1 = load_average()
    summary = summarize(rows, row_s, ceil_s, n, threads)
    note = busy_note(load0, load1)
    print_table(f"AdamW, {n:,} elements, {threads} thread(s); load average {load0[0]:.2f} "
                f"at the start, {load1[0]:.2f} at the end", summary, ceilings, reps, note)
    return summary, pass_record(threads, load0, load1, note, ceilings, ceil_s, n)

def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    n = 2**args.log2
    rows = build_rows(n)
    ceilings = number_ceilings(rows)
    doc = run_record(n, args.log2, args.threads, args.reps)
    for threads in args.threads:
        summary, pass_doc = timed_pass(rows, ceilings, n, threads, args.reps)
        doc["rows"] += summary
        doc["passes"].append(pass_doc)
    finish_run(doc, "formats", args.log2, args.threads, args.out)


if __name__ == "__main__":
    main()
