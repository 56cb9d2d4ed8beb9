#!/usr/bin/env python3
"""CPU benchmark: fastoptim's fused updates against NumPy, torch.optim and the memory ceiling.

For each optimizer, size and thread count: the median time of one step (ms) and the
effective bandwidth (GB/s: the minimal bytes an update must move, divided by that time) of

* fastoptim, the functional API (``fastoptim.adam_`` ...);
* the NumPy baseline of bench/numpy_impl.py (single-threaded, measured once per cell);
* torch.optim with ``foreach=True`` and with ``fused=True`` (where torch has it on the CPU)
  on the very same memory (``torch.from_numpy``);
* the ceiling, ``fastoptim._core.stream_rmw``: an in-place read-modify-write loop over the
  same arrays with the same threads and next to no arithmetic.

bench/README.md explains what is measured and how to read the table.

    python bench/bench_cpu.py            # the full run, about 15 minutes
    python bench/bench_cpu.py --quick    # small sizes, fewer repetitions, about a minute
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

try:
    import fastoptim
    from fastoptim import _core, reference
except ImportError as exc:
    sys.exit(f"bench_cpu.py: cannot import fastoptim ({exc}). Install it (pip install .) or "
             "run from the repository root with PYTHONPATH=python.")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_impl  # noqa: E402  (the sibling file, whatever the working directory)

try:
    import torch
except ImportError:
    torch = None

BENCH_DIR = Path(__file__).resolve().parent
DTYPE = np.float32
ITEMSIZE = np.dtype(DTYPE).itemsize

# torch's defaults except a small learning rate: values stay finite over many thousands of
# steps, and the speed of an update does not depend on them.
LR = 1e-4
MOMENTUM = 0.9

# At most this many calls of one implementation per repetition. The states are reset
# before each repetition (reset_states), and centered RMSprop stays finite for ~1,500 steps
# from zero with a constant gradient: 256 calls x (fastoptim, NumPy, torch) stays below.
MAX_CALLS_PER_REP = 256

# Steps of the check against fastoptim.reference before timing: past RAdam's first
# rectified step (6) and ASGD's first averaging step (3, with t0 = 0).
CHECK_STEPS = 8

# A row is flagged "noisy" when some implementation had more than this share of its calls
# over twice its median: something else ran on the machine.
NOISY_FRACTION = 0.1

IMPL_TITLES = {"fastoptim": "fastoptim", "numpy": "NumPy", "torch_foreach": "torch foreach",
               "torch_fused": "torch fused", "ceiling": "ceiling"}


# ---------------------------------------------------------------------------------------
# The cases. States carry torch's state names, in the order of the functional API's
# positional arguments (``keyword_states`` maps those passed by keyword).
#
# Note [traffic and ceiling]
# A case with S states moves at least 2 + S streams read (param, grad, states) and 1 + S
# written (param, states), 4 bytes each per element: ``bytes_per_element``. A state the
# update writes without reading it (``unread``: ASGD's ``ax = p`` while mu == 1) is not
# counted as read. The ceiling is always stream_rmw over [param, *states, grad] writing the
# first 1 + S: every written array is also read, as the hardware does for a store to a line
# that is not in cache (write-allocate). stream_rmw has exactly the patterns (2 + S, 1 + S),
# S = 0..3, so every case has one; for a case with unread states it moves more than the
# minimal traffic and "% of ceiling" may exceed 100 on a CPU that skips the read for whole-
# line stores.

# Note [per-step scalars]
# A case's ``scalars`` generator yields the keyword arguments of steps 1, 2, ... as a
# stateful caller computes them (NAdam's mu_product, ASGD's eta and mu). Computing them costs
# Python time (about 0.3 us for NAdam, 0.7 us for ASGD, measured on the machine this was
# written on) that is not the update's, and the benchmark leaves it out of the timed call,
# as it leaves out binding the arguments: they are computed AHEAD steps at a time, merged
# into the call's keyword arguments, and a call takes the next dict (the first chunk on the
# untimed warm-up call; a later chunk, every AHEAD calls, lands on one timed call, which the
# median ignores). torch computes its scalars inside opt.step(), NumPy's classes inside
# step(): both are timed with them.
AHEAD = 4096


def step_only(hyper: dict) -> Iterator[dict]:
    """``step``: 1, 2, 3, ..."""
    return ({"step": step} for step in itertools.count(1))


def nadam_scalars(hyper: dict) -> Iterator[dict]:
    """NAdam's ``step`` and ``mu_product``, carried as torch carries its state: multiplied by
    this step's mu before the update (a Python float here; torch keeps a float32 tensor)."""
    beta1, decay = hyper["beta1"], hyper["momentum_decay"]
    mu_product = 1.0
    for step in itertools.count(1):
        mu_product *= fastoptim.functional.nadam_mu(step, beta1, decay)
        yield {"step": step, "mu_product": mu_product}


def asgd_scalars(hyper: dict) -> Iterator[dict]:
    """ASGD's ``eta`` and ``mu``: this step uses the current values (``lr`` and 1 at step 1),
    which are advanced after it (``asgd_next``), as torch does."""
    eta, mu = hyper["lr"], 1.0
    for step in itertools.count(1):
        yield {"eta": eta, "mu": mu}
        eta, mu = fastoptim.functional.asgd_next(step, hyper["lr"], hyper["lambd"],
                                                 hyper["alpha"], hyper["t0"])


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    label: str
    function: str  # in fastoptim and fastoptim.reference
    states: tuple[str, ...]
    hyper: dict  # keyword arguments of the function
    numpy_class: str  # in numpy_impl; takes (param, grad, *states, **numpy_hyper)
    numpy_hyper: dict
    torch_class: str  # in torch.optim (a missing class gets a note and no torch columns)
    torch_hyper: dict
    # The per-step keyword arguments, as a stateful caller computes them: a generator of
    # one dict per step, given ``hyper`` completed with the function's defaults. By default
    # ``step_only`` (``step=1, 2, ...``), or nothing when ``takes_step`` is False.
    scalars: Callable[[dict], Iterator[dict]] | None = None
    takes_step: bool = True
    keyword_states: dict = dataclasses.field(default_factory=dict)
    unread: tuple[str, ...] = ()  # states written but not read (Note [traffic and ceiling])
    initial: dict = dataclasses.field(default_factory=dict)  # state -> start value (else 0)

    @property
    def streams(self) -> tuple[int, int]:
        """The minimal (streams read, streams written)."""
        return 2 + len(self.states) - len(self.unread), 1 + len(self.states)

    @property
    def ceiling_streams(self) -> tuple[int, int]:
        """stream_rmw's (streams read, streams written) for this case."""
        return 2 + len(self.states), 1 + len(self.states)

    @property
    def bytes_per_element(self) -> int:
        return ITEMSIZE * sum(self.streams)

    @property
    def step_arguments(self) -> Callable[[dict], Iterator[dict]] | None:
        """The generator function of the per-step keyword arguments (None: none)."""
        return self.scalars or (step_only if self.takes_step else None)

    def per_step(self, module) -> Iterator[dict] | None:
        """The generator of per-step keyword arguments (None: there are none)."""
        scalars = self.step_arguments
        if scalars is None:
            return None
        fn = getattr(module, self.function)
        defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        return scalars({**defaults, **self.hyper})

    def functional(self, module, arrays: dict) -> Callable:
        """A callable doing the next step (1, 2, ...) of ``module.<function>`` on the arrays
        at each call: arguments bound once (a call costs what a user's call costs), the
        per-step arguments taken from ``per_step`` (Note [per-step scalars])."""
        fn = getattr(module, self.function)
        args = [arrays["param"], arrays["grad"]]
        args += [arrays[s] for s in self.states if s not in self.keyword_states]
        kwargs = dict(self.hyper, **{kw: arrays[s] for s, kw in self.keyword_states.items()})
        if self.scalars is None and not self.takes_step:
            return lambda: fn(*args, **kwargs)
        if self.scalars is None:
            steps = itertools.count(1)
            return lambda: fn(*args, step=next(steps), **kwargs)
        per_step = self.per_step(module)
        chunks = iter(lambda: [dict(kwargs, **s) for s in itertools.islice(per_step, AHEAD)], [])
        calls = itertools.chain.from_iterable(chunks)
        return lambda: fn(*args, **next(calls))

    def numpy(self, arrays: dict):
        cls = getattr(numpy_impl, self.numpy_class)
        return cls(arrays["param"], arrays["grad"], *(arrays[s] for s in self.states),
                   **self.numpy_hyper)


_lr = {"lr": LR}
_mom = {"lr": LR, "momentum": MOMENTUM}
_cmom = {"lr": LR, "momentum": MOMENTUM, "centered": True}
_ams = {"lr": LR, "amsgrad": True}
# ASGD averaging from the start: mu = 1/max(1, step - t0) is 1 for steps 1 and 2 (warm-up,
# never timed: calibrate makes at least two calls first), then 1/2, 1/3, ...
_avg = {"lr": LR, "t0": 0.0}
_adam = ("exp_avg", "exp_avg_sq")
CASES = [
    Case("sgd", "SGD", "sgd_", (), _lr, "SGD", _lr, "SGD", _lr, takes_step=False),
    Case("sgd_momentum", "SGD momentum", "sgd_", ("momentum_buffer",), _mom, "SGD", _mom,
         "SGD", _mom),
    Case("rmsprop", "RMSprop", "rmsprop_", ("square_avg",), _lr, "RMSprop", _lr, "RMSprop", _lr,
         takes_step=False),
    Case("rmsprop_centered_momentum", "RMSprop cent+mom", "rmsprop_",
         ("square_avg", "grad_avg", "momentum_buffer"), _cmom, "RMSprop", _cmom, "RMSprop", _cmom,
         takes_step=False),
    Case("adam", "Adam", "adam_", _adam, _lr, "Adam", _lr, "Adam", _lr),
    Case("adamw", "AdamW", "adamw_", _adam, _lr, "Adam",
         {"lr": LR, "weight_decay": 1e-2, "decoupled": True}, "AdamW", _lr),
    Case("adam_amsgrad", "Adam amsgrad", "adam_", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         _ams, "Adam", _ams, "Adam", _ams, keyword_states={"max_exp_avg_sq": "max_exp_avg_sqs"}),
    Case("adagrad", "Adagrad", "adagrad_", ("sum",), _lr, "Adagrad", _lr, "Adagrad", _lr),
    Case("adadelta", "Adadelta", "adadelta_", ("square_avg", "acc_delta"), {}, "Adadelta", {},
         "Adadelta", {}, takes_step=False),
    Case("nadam", "NAdam", "nadam_", _adam, _lr, "NAdam", _lr, "NAdam", _lr,
         scalars=nadam_scalars),
    Case("radam", "RAdam", "radam_", _adam, _lr, "RAdam", _lr, "RAdam", _lr),
    Case("adamax", "Adamax", "adamax_", ("exp_avg", "exp_inf"), _lr, "Adamax", _lr, "Adamax", _lr),
    Case("asgd", "ASGD", "asgd_", ("ax",), _lr, "ASGD", _lr, "ASGD", _lr, scalars=asgd_scalars,
         unread=("ax",)),
    Case("asgd_averaging", "ASGD averaging", "asgd_", ("ax",), _avg, "ASGD", _avg, "ASGD", _avg,
         scalars=asgd_scalars),
    Case("rprop", "Rprop", "rprop_", ("prev", "step_size"), _lr, "Rprop", {}, "Rprop", _lr,
         takes_step=False, initial={"step_size": LR}),
    Case("lion", "Lion", "lion_", ("exp_avg",), _lr, "Lion", _lr, "Lion", _lr, takes_step=False),
]
CASES_BY_KEY = {c.key: c for c in CASES}
MAX_STATES = max(len(c.states) for c in CASES)

# The minimal traffic documented in bench/README.md, checked against the stream counts.
assert {c.key: c.bytes_per_element for c in CASES} == {
    "sgd": 12, "sgd_momentum": 20, "rmsprop": 20, "rmsprop_centered_momentum": 36, "adam": 28,
    "adamw": 28, "adam_amsgrad": 36, "adagrad": 20, "adadelta": 28, "nadam": 28, "radam": 28,
    "adamax": 28, "asgd": 16, "asgd_averaging": 20, "rprop": 28, "lion": 20}


# ---------------------------------------------------------------------------------------
# Sizes and arrays

@dataclasses.dataclass(frozen=True)
class Size:
    label: str
    tensors: int  # 0: one array (the functional API's single-array form); n >= 1: n arrays
    elements: int  # per array

    @property
    def total(self) -> int:
        return max(self.tensors, 1) * self.elements


def parse_size(token: str) -> Size:
    """``2^k``, an element count (``65536``, ``1e6``) or ``COUNTxSIZE`` (a list of arrays)."""
    token = token.strip()
    try:
        if "x" in token:
            count, _, each = token.partition("x")
            size, count = parse_size(each), int(count)
            if count < 1:
                raise ValueError
            return Size(f"{count}x{size.elements}", count, size.elements)
        n = 2 ** int(token[2:]) if token.startswith("2^") else int(float(token))
        if n < 1:
            raise ValueError
    except (ValueError, OverflowError):
        raise ValueError(f"size {token!r}: expected 2^k, a positive count, or COUNTxSIZE") from None
    label = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
    return Size(label, 0, n)


def allocate(size: Size, rng: np.random.Generator) -> dict:
    """Param and grad ~ N(0, 1) and MAX_STATES zeroed state slots, arrays or lists of arrays.
    Every case of a size uses these (its states take the first slots)."""

    def make(fill):
        if size.tensors == 0:
            return fill(size.elements)
        return [fill(size.elements) for _ in range(size.tensors)]

    def normal(n):
        return rng.standard_normal(n, dtype=DTYPE)

    def zeros(n):
        return np.zeros(n, DTYPE)

    return {"param": make(normal), "grad": make(normal),
            "slots": [make(zeros) for _ in range(MAX_STATES)]}


def case_arrays(pool: dict, case: Case) -> dict:
    arrays = {"param": pool["param"], "grad": pool["grad"]}
    arrays.update(zip(case.states, pool["slots"]))
    return arrays


def as_list(x) -> list:
    return [x] if isinstance(x, np.ndarray) else list(x)


def blocks(arrays: dict, block: int) -> dict:
    """Single arrays as lists of views of ``block`` elements (lists pass through)."""
    if block <= 0:
        return arrays
    return {k: [v[i:i + block] for i in range(0, v.size, block)]
            if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def reset_states(arrays: dict, case: Case) -> None:
    """Set the states to torch's initial values (zeros; Rprop's step sizes: lr). Run before
    each repetition, untimed: with a constant gradient, centered RMSprop's ``square_avg -
    grad_avg**2`` shrinks to 0 and, after ~1,500 steps, below it by rounding (NaN)."""
    for name in case.states:
        for a in as_list(arrays[name]):
            a.fill(case.initial.get(name, 0.0))


def all_finite(arrays: dict) -> bool:
    return all(np.isfinite(a).all() for v in arrays.values() for a in as_list(v))


# ---------------------------------------------------------------------------------------
# The implementations of one cell: each a callable doing one step.

def make_fastoptim(case: Case, arrays: dict) -> Callable:
    return case.functional(fastoptim, arrays)


def make_ceiling(case: Case, arrays: dict) -> Callable:
    streams = [arrays["param"], *(arrays[s] for s in case.states), arrays["grad"]]
    writes, rmw = case.ceiling_streams[1], _core.stream_rmw
    return lambda: rmw(streams, writes)


def torch_params(pool: dict) -> list:
    """One torch Parameter per param array, sharing its memory, with .grad set (shared too)."""
    params = []
    for p, g in zip(as_list(pool["param"]), as_list(pool["grad"])):
        t = torch.nn.Parameter(torch.from_numpy(p))
        t.grad = torch.from_numpy(g)
        params.append(t)
    return params


def make_torch(case: Case, arrays: dict, params: list, mode: str) -> Callable:
    """``torch.optim.<class>(params, foreach=True)`` or ``fused=True``, whose states ARE our
    state arrays: torch allocates its states on the first step, so one step is taken and
    each state tensor is then replaced by ``torch.from_numpy`` of ours. Raises what torch
    raises when the mode is not supported (TypeError when torch.optim has no such class)."""
    cls = getattr(torch.optim, case.torch_class, None)
    if cls is None:
        raise TypeError(f"torch.optim has no {case.torch_class}")
    opt = cls(params, **case.torch_hyper, **{mode: True})
    opt.step()
    for p, *states in zip(params, *(as_list(arrays[s]) for s in case.states)):
        st = opt.state[p]
        for name, array in zip(case.states, states):
            if tuple(st[name].shape) != array.shape or st[name].dtype != torch.float32:
                raise RuntimeError(f"torch state {name}: {st[name].shape} {st[name].dtype}")
            st[name] = torch.from_numpy(array)
    return opt.step


def set_threads(n: int) -> None:
    fastoptim.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------
# Timing

class ThreadPrimer:
    """Wakes the worker threads before a timed batch (untimed): parallel ``stream_rmw`` calls
    on two small arrays until ``good`` calls in a row take under 1 ms, or ``max_s`` passed.

    Note [priming the thread pool]
    After the main thread has worked alone for some milliseconds (NumPy, a torch foreach
    step over small tensors, which runs on one thread, refilling the states), some kernels
    (VMs that pack idle vCPUs) put the sleeping OpenMP workers on the main thread's CPU;
    every parallel call then waits for a scheduler tick, ~8 ms, until the workers are moved
    back, which can take a second. Such a stall would land on whichever implementation comes
    next, so each batch is preceded by the primer, and the benchmark times back-to-back
    steps. On a machine without the effect the primer costs well under a millisecond; on a
    busy one it gives up after ``max_s`` (after 10 such give-ups, after 50 ms).
    """

    def __init__(self, threads: int, good: int = 20, max_s: float = 1.0):
        # threads * 2^16 elements: every thread gets a share (the dispatcher gives each at
        # least 2^15 elements) and the arrays stay in cache.
        n = threads * 2**16
        self.streams = [np.zeros(n, DTYPE), np.zeros(n, DTYPE)]
        self.good, self.max_s = good, max_s
        self.stalls = 0  # calls over 1 ms seen while priming
        self.unsettled = 0  # primes that gave up

    def __call__(self) -> None:
        clock, rmw, streams = time.perf_counter, _core.stream_rmw, self.streams
        start, good = clock(), 0
        while good < self.good:
            t0 = clock()
            rmw(streams, 1)
            t1 = clock()
            if t1 - t0 < 1e-3:
                good += 1
            else:
                good = 0
                self.stalls += 1
            if t1 - start > self.max_s:
                self.unsettled += 1
                if self.unsettled == 10:
                    self.max_s = 0.05
                return


def calibrate(fns: dict, target_s: float, cap: int, before_batch=None) -> dict:
    """Warm each callable up and choose its calls per repetition: enough to last about
    ``target_s``, between 1 and ``cap``."""
    calls = {}
    for name, fn in fns.items():
        if before_batch is not None:
            before_batch()
        fn()  # first touch, lazy initialisation
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min(target_s, 0.01) or n >= cap:
                break
        calls[name] = max(1, min(cap, math.ceil(target_s / (elapsed / n))))
    return calls


def interleaved(fns: dict, reps: int, calls: dict, before_rep=None, before_batch=None,
                per_call: bool = True) -> dict:
    """Time the callables interleaved (repetition 1 runs a, b, c; repetition 2 runs a, b, c;
    ...) so that drift in clock frequency or load hits all of them alike: ``calls[name]``
    calls of each per repetition, ``before_rep`` and ``before_batch`` untimed.

    Returns per callable the seconds of every call (``per_call``) or of each repetition's
    mean call (a batch timed as one: for calls of a few microseconds).
    """
    samples = {name: [] for name in fns}
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            if before_rep is not None:
                before_rep()
            for name, fn in fns.items():
                k, out = calls[name], samples[name]
                if before_batch is not None:
                    before_batch()
                if per_call:
                    for _ in range(k):
                        t0 = clock()
                        fn()
                        out.append(clock() - t0)
                else:
                    t0 = clock()
                    for _ in range(k):
                        fn()
                    out.append((clock() - t0) / k)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def describe(times: list, reps: int) -> dict:
    """Statistics of one implementation's call times (seconds, repetition-major).
    ``median_s`` is the figure reported; ``slow_fraction`` is the share of calls over twice
    the median (stalls: something else took a core)."""
    a = np.asarray(times)
    med = float(np.median(a))
    per_rep = np.array_split(a, reps)
    return {"median_s": med, "mean_s": float(a.mean()), "min_s": float(a.min()),
            "p10_s": float(np.percentile(a, 10)), "p90_s": float(np.percentile(a, 90)),
            "calls": int(a.size), "slow_fraction": float((a > 2 * med).mean()),
            "rep_median_s": [float(np.median(r)) for r in per_rep],
            "rep_mean_s": [float(r.mean()) for r in per_rep]}


# ---------------------------------------------------------------------------------------
# Checks before any timing

def check_implementations(cases: list, use_torch: bool) -> tuple[list, set]:
    """The NumPy baseline and the benchmark's fastoptim calls against fastoptim.reference
    (CHECK_STEPS steps from torch's initial states, one array and a list of three), and each
    torch optimizer updating the shared arrays. Returns (notes, {(case key, torch mode)
    unavailable}); raises AssertionError on a wrong result."""
    for size in (Size("1000", 0, 1000), Size("3x37", 3, 37)):
        for case in cases:
            pool = allocate(size, np.random.default_rng(1))
            reset_states(case_arrays(pool, case), case)
            results = {}
            for impl in ("reference", "numpy", "fastoptim"):
                arrays = {k: [a.copy() for a in as_list(v)]
                          for k, v in case_arrays(pool, case).items()}
                if impl == "numpy":
                    update = case.numpy(arrays).step
                else:
                    update = case.functional(reference if impl == "reference" else fastoptim,
                                             arrays)
                for _ in range(CHECK_STEPS):
                    update()
                    # A third of the gradient changes sign between steps (the timed runs keep
                    # it constant): Rprop's three branches are all taken.
                    for g in arrays["grad"]:
                        g[::3] *= -1
                assert all_finite(arrays), f"{impl} {case.key}: non-finite values"
                results[impl] = arrays
            for impl in ("numpy", "fastoptim"):
                for name, want in results["reference"].items():
                    for i, (got, w) in enumerate(zip(results[impl][name], want)):
                        # float32; the baseline folds scalar factors (a few ulp per step),
                        # atol for states that cancel towards 0.
                        np.testing.assert_allclose(
                            got, w, rtol=2e-5, atol=1e-6,
                            err_msg=f"{impl} {case.key} {name}[{i}] vs fastoptim.reference")
    notes, unavailable = [], set()
    if not use_torch:
        return notes, unavailable
    for case in cases:
        pool = allocate(Size("3x37", 3, 37), np.random.default_rng(2))
        arrays = case_arrays(pool, case)
        reset_states(arrays, case)
        for mode in ("foreach", "fused"):
            try:
                step = make_torch(case, arrays, torch_params(pool), mode)
            except (RuntimeError, TypeError, ValueError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                notes.append(f"torch {mode} {case.label}: not available ({msg})")
                unavailable.add((case.key, mode))
                continue
            # Two steps: Rprop's first keeps its step sizes (prev is 0).
            before = {k: [a.copy() for a in as_list(v)] for k, v in arrays.items()}
            step()
            step()
            for name in ("param", *case.states):
                for i, (a, b) in enumerate(zip(as_list(arrays[name]), before[name])):
                    assert not np.array_equal(a, b), \
                        f"torch {mode} {case.key}: {name}[{i}] not updated in place"
    return notes, unavailable


# ---------------------------------------------------------------------------------------
# The machine

def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "torch": torch.__version__ if torch is not None else None,
            "fastoptim": fastoptim.backend_info(),
            "cpu": platform.processor(), "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cpus()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        info["cpu"] = models[0] if models else info["cpu"]
        info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
        mem = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())
        info["mem_total_gib"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
        info["mem_available_gib"] = round(int(mem["MemAvailable"].split()[0]) / 2**20, 1)
        maps = Path("/proc/self/maps").read_text().splitlines()
        info["openmp_runtime"] = sorted({ln.split()[-1] for ln in maps
                                         if any(k in ln for k in ("gomp", "libiomp", "libomp"))})
    except (OSError, KeyError, ValueError, IndexError):
        pass
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.split("_")[0] in ("OMP", "GOMP", "KMP", "OPENBLAS", "MKL", "FASTOPTIM")}
    return info


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def loadavg() -> list | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------
# One cell, the latency row, the output

def summarize(stats: dict, case: Case, size: Size, threads: int) -> dict:
    """A row: per implementation the call statistics and the GB/s of the median, and the
    ratios of medians."""
    med = {k: v["median_s"] for k, v in stats.items()}
    nbytes = size.total * case.bytes_per_element
    fo = med["fastoptim"]
    torch_times = [med[k] for k in ("torch_foreach", "torch_fused") if k in med]
    return {
        "optimizer": case.key, "label": case.label, "size": size.label,
        "tensors": size.tensors, "elements_per_tensor": size.elements, "elements": size.total,
        "threads": threads, "bytes_per_element": case.bytes_per_element,
        "streams_read_written": list(case.streams),
        "ceiling_streams_read_written": list(case.ceiling_streams),
        "median_s": med, "gbps": {k: nbytes / t / 1e9 for k, t in med.items()},
        "pct_of_ceiling": 100 * med["ceiling"] / fo,
        "x_vs_numpy": med["numpy"] / fo if "numpy" in med else None,
        "x_vs_torch_fused": med["torch_fused"] / fo if "torch_fused" in med else None,
        "x_vs_torch_best": min(torch_times) / fo if torch_times else None,
        "noisy": any(v["slow_fraction"] > NOISY_FRACTION for v in stats.values()),
        "stats": stats,
    }


def latency(threads: int, use_numpy: bool, use_torch: bool, reps: int, prime: bool) -> dict:
    """One Adam step on 1,024 float32, end to end from Python: median batch mean, in us.
    (NumPy is timed at the first thread count only, as in the table.)"""
    case = CASES_BY_KEY["adam"]
    pool = allocate(Size("1024", 0, 1024), np.random.default_rng(3))
    arrays = case_arrays(pool, case)
    fns = {"fastoptim": make_fastoptim(case, arrays)}
    if use_numpy:
        fns["numpy"] = case.numpy(arrays).step
    if use_torch:
        params = torch_params(pool)
        for mode in ("fused", "foreach"):
            try:
                fns[f"torch_{mode}"] = make_torch(case, arrays, params, mode)
            except (RuntimeError, TypeError, ValueError):
                pass
    set_threads(threads)
    reset = lambda: reset_states(arrays, case)  # noqa: E731
    reset()
    primer = ThreadPrimer(threads) if threads > 1 and prime else None
    calls = calibrate(fns, 2e-3, 1000, primer)
    samples = interleaved(fns, reps, calls, reset, primer, per_call=False)
    return {"threads": threads, "elements": 1024, "optimizer": "adam",
            "median_us": {k: 1e6 * statistics.median(v) for k, v in samples.items()},
            "rep_mean_s": samples, "calls_per_rep": calls, "finite": all_finite(arrays)}


def fmt_ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    for limit, digits in ((1, 4), (10, 3), (100, 2), (1000, 1)):
        if ms < limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.0f}"


def fmt_num(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list, threads: int) -> None:
    plural = "s" if threads > 1 else ""
    print(f"\n== {threads} thread{plural} (fastoptim, torch, ceiling); NumPy single-threaded ==")
    print(f"{'':16} {'':>10} | {'fastoptim':^14} | {'NumPy':^14} | {'torch foreach':^14} | "
          f"{'torch fused':^14} | {'ceiling':>7} | {'% of':>5} {'x vs':>6} {'x vs':>6} {'x vs':>6}")
    print(f"{'optimizer':16} {'N':>10} | " + " | ".join([f"{'ms':>7} {'GB/s':>6}"] * 4)
          + f" | {'GB/s':>7} | {'ceil':>5} {'NumPy':>6} {'fused':>6} {'best':>6}")
    last = None
    for r in rows:
        if last is not None and r["optimizer"] != last:
            print()
        last = r["optimizer"]
        med, gbps = r["median_s"], r["gbps"]
        impls = " | ".join(f"{fmt_ms(med.get(i)):>7} {fmt_num(gbps.get(i)):>6}"
                           for i in ("fastoptim", "numpy", "torch_foreach", "torch_fused"))
        size = r["size"] + ("*" if r["noisy"] else " ")
        print(f"{r['label']:16} {size:>10} | {impls} | {fmt_num(gbps.get('ceiling')):>7} | "
              f"{fmt_num(r['pct_of_ceiling'], 0):>5} {fmt_num(r['x_vs_numpy']):>6} "
              f"{fmt_num(r['x_vs_torch_fused']):>6} {fmt_num(r['x_vs_torch_best']):>6}")


def print_latency(lat: list) -> None:
    print("\n== Latency: one Adam step on 1,024 float32, end to end from Python (median, us) ==")
    impls = [i for i in ("fastoptim", "numpy", "torch_fused", "torch_foreach")
             if i in lat[0]["median_us"]]
    print(f"{'threads':>7} " + " ".join(f"{IMPL_TITLES[i]:>14}" for i in impls))
    for entry in lat:
        print(f"{entry['threads']:>7} "
              + " ".join(f"{entry['median_us'][i]:>14.1f}" for i in impls))


def default_json_path() -> Path:
    stem = f"cpu-{datetime.date.today().isoformat()}"
    path, n = BENCH_DIR / "results" / f"{stem}.json", 2
    while path.exists():
        path, n = BENCH_DIR / "results" / f"{stem}-{n}.json", n + 1
    return path


# ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2^16, 2^18, 2^20 and 2000x4096; "
                    "5 repetitions, 0.05 s per implementation per cell")
    ap.add_argument("--sizes", help="comma-separated: 2^k, an element count, or COUNTxSIZE for "
                    "a list of COUNT arrays (default 2^16,2^18,...,2^26,2000x4096)")
    ap.add_argument("--threads", help="comma-separated thread counts (default: 1 and all)")
    ap.add_argument("--optimizers", help="comma-separated subset of: " + ", ".join(CASES_BY_KEY))
    ap.add_argument("--reps", type=int, help="repetitions per cell (default 11; --quick 5)")
    ap.add_argument("--min-time", type=float, help="seconds per implementation per cell, all "
                    "repetitions together (default 0.2; --quick 0.05)")
    ap.add_argument("--no-torch", action="store_true", help="skip torch.optim")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy baseline")
    ap.add_argument("--numpy-block", type=int, default=0, metavar="ELEMS",
                    help="run the NumPy baseline on views of ELEMS elements of each large "
                    "array, so its scratch stays in cache (default 0: whole arrays)")
    ap.add_argument("--no-prime", action="store_true",
                    help="do not wake the worker threads before each timed batch")
    ap.add_argument("--isa", help="fastoptim.set_isa(ISA) first: scalar, avx2 or avx512")
    ap.add_argument("--json", type=Path,
                    help="output file (default bench/results/cpu-<date>.json, never overwritten)")
    args = ap.parse_args(argv)
    try:
        if args.sizes:
            args.sizes = [parse_size(s) for s in args.sizes.split(",")]
        elif args.quick:
            args.sizes = [parse_size(s) for s in ("2^16", "2^18", "2^20", "2000x4096")]
        else:
            args.sizes = [parse_size(f"2^{k}") for k in range(16, 27, 2)] + [
                parse_size("2000x4096")]
        args.threads = (sorted({int(t) for t in args.threads.split(",")}) if args.threads
                        else sorted({1, usable_cpus()}))
        if min(args.threads) < 1:
            raise ValueError("thread counts must be >= 1")
        args.cases = ([CASES_BY_KEY[k.strip()] for k in args.optimizers.split(",")]
                      if args.optimizers else CASES)
    except KeyError as exc:
        ap.error(f"unknown optimizer {exc}; choose from {', '.join(CASES_BY_KEY)}")
    except ValueError as exc:
        ap.error(str(exc))
    args.reps = args.reps or (5 if args.quick else 11)
    args.min_time = args.min_time or (0.05 if args.quick else 0.2)
    args.use_torch = torch is not None and not args.no_torch
    return args


def print_header(args, machine: dict, load: list | None) -> None:
    fo = machine["fastoptim"]
    print(f"CPU       {machine['cpu']} ({machine['usable_cpus']} usable of "
          f"{machine['logical_cpus']} logical CPUs; {', '.join(machine.get('cpu_flags', []))}); "
          f"{machine.get('mem_total_gib', '?')} GiB RAM")
    print(f"fastoptim {fo['version']}: isa={fo['isa']} (compiled {','.join(fo['isas_compiled'])};"
          f" supported {','.join(fo['isas_supported'])}), threading={fo['threading']}, "
          f"default threads={fo['num_threads']}")
    print(f"numpy {np.__version__}; torch {machine['torch'] or 'not installed'}; "
          f"python {machine['python']}; load average {load}")
    print(f"sizes {', '.join(s.label for s in args.sizes)} (float32); threads {args.threads}; "
          f"{args.reps} reps, ~{args.min_time:g} s per implementation per cell; median of calls")


def run_cells(args, unavailable: set) -> tuple[list, dict]:
    """Every (threads, size, case) cell, in that order; returns the rows and the primers'
    counts per thread count."""
    rows, priming = [], {}
    numpy_stats = {}  # (case, size) -> stats: NumPy runs on one thread, measured once
    total = len(args.threads) * len(args.sizes) * len(args.cases)
    start = time.perf_counter()
    for threads in args.threads:
        set_threads(threads)
        primer = ThreadPrimer(threads) if threads > 1 and not args.no_prime else None
        for size in args.sizes:
            pool = allocate(size, np.random.default_rng(0))
            params = torch_params(pool) if args.use_torch else None
            for case in args.cases:
                arrays = case_arrays(pool, case)
                fns = {"fastoptim": make_fastoptim(case, arrays)}
                key = (case.key, size.label)
                if not args.no_numpy and key not in numpy_stats:
                    fns["numpy"] = case.numpy(blocks(arrays, args.numpy_block)).step
                if args.use_torch:
                    for mode in ("foreach", "fused"):
                        if (case.key, mode) not in unavailable:
                            fns[f"torch_{mode}"] = make_torch(case, arrays, params, mode)
                fns["ceiling"] = make_ceiling(case, arrays)

                reset = lambda: reset_states(arrays, case)  # noqa: E731
                reset()
                calls = calibrate(fns, args.min_time / args.reps, MAX_CALLS_PER_REP, primer)
                samples = interleaved(fns, args.reps, calls, reset, primer)
                del fns  # frees torch's optimizers before the next case builds its own
                stats = {k: dict(describe(v, args.reps), calls_per_rep=calls[k])
                         for k, v in samples.items()}
                if "numpy" in stats:
                    numpy_stats[key] = dict(stats["numpy"], measured_with_threads=threads)
                if key in numpy_stats:
                    stats["numpy"] = numpy_stats[key]
                row = summarize(stats, case, size, threads)
                row["finite"] = all_finite(arrays)
                rows.append(row)
                print(f"[{len(rows):3}/{total}] {threads} thr {case.label:16} {size.label:>9}: "
                      f"fastoptim {fmt_ms(row['median_s']['fastoptim'])} ms, "
                      f"{row['pct_of_ceiling']:.0f}% of ceiling"
                      f"{' (noisy)' if row['noisy'] else ''}  "
                      f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
            del pool, params, arrays
            gc.collect()
        if primer is not None:
            priming[threads] = {"stalled_calls": primer.stalls,
                                "unsettled_batches": primer.unsettled}
    return rows, priming


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.isa:
        fastoptim.set_isa(args.isa)
    machine = machine_info()
    load_start = loadavg()
    print_header(args, machine, load_start)

    notes, unavailable = check_implementations(args.cases, args.use_torch)
    if torch is None:
        notes.append("torch is not installed: no torch columns")
    for note in notes:
        print(f"note: {note}")
    # The arrays (2 + MAX_STATES streams), NumPy's scratch (up to 3), torch's temporaries.
    peak = max(s.total for s in args.sizes) * ITEMSIZE * (2 + MAX_STATES + 3 + 3)
    print(f"peak memory about {peak / 2**30:.1f} GiB "
          f"(available {machine.get('mem_available_gib', '?')} GiB)", flush=True)

    start = time.perf_counter()
    rows, priming = run_cells(args, unavailable)
    lat = [latency(t, not args.no_numpy and i == 0, args.use_torch, 3 * max(args.reps, 11),
                   not args.no_prime) for i, t in enumerate(args.threads)]
    for entry in lat[1:]:
        if "numpy" in lat[0]["median_us"]:
            entry["median_us"]["numpy"] = lat[0]["median_us"]["numpy"]

    order = {c.key: i for i, c in enumerate(args.cases)}
    for threads in args.threads:
        print_table(sorted((r for r in rows if r["threads"] == threads),
                           key=lambda r: (order[r["optimizer"]], r["tensors"] > 0, r["elements"])),
                    threads)
    if any(r["noisy"] for r in rows):
        print(f"\n* noisy: over {NOISY_FRACTION:.0%} of some implementation's calls took more "
              "than twice its median (other load on the machine); the median is still shown")
    print_latency(lat)

    nonfinite = [f"{r['optimizer']} {r['size']} threads={r['threads']}"
                 for r in rows if not r["finite"]]
    nonfinite += [f"latency threads={e['threads']}" for e in lat if not e["finite"]]
    for note in notes:
        print(f"note: {note}")
    for threads, p in priming.items():
        if p["stalled_calls"]:
            print(f"note: {threads} threads: {p['stalled_calls']} parallel calls stalled (> 1 ms) "
                  f"while waking the threads before timed batches, {p['unsettled_batches']} "
                  "batches started unsettled (ThreadPrimer in bench_cpu.py)")
    if nonfinite:
        print(f"WARNING: non-finite values after timing: {', '.join(nonfinite)}")
    load_end = loadavg()
    print(f"load average at the end {load_end}; {time.perf_counter() - start:.0f} s")

    config = {"argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
              "sizes": [dataclasses.asdict(s) for s in args.sizes], "threads": args.threads,
              "optimizers": [c.key for c in args.cases], "reps": args.reps,
              "min_time_s": args.min_time, "max_calls_per_rep": MAX_CALLS_PER_REP,
              "numpy_block": args.numpy_block, "prime_threads": not args.no_prime,
              "statistic": "median of every timed call (perf_counter per call), interleaved",
              "dtype": "float32",
              "cases": {c.key: {"bytes_per_element": c.bytes_per_element,
                                "streams_read_written": list(c.streams),
                                "ceiling_streams_read_written": list(c.ceiling_streams),
                                "per_step": getattr(c.step_arguments, "__name__", None),
                                "initial_states": c.initial,
                                "fastoptim": [c.function, c.hyper],
                                "numpy": [c.numpy_class, c.numpy_hyper],
                                "torch": [c.torch_class, c.torch_hyper]} for c in args.cases}}
    doc = {"schema": 1, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine, "load_average": {"start": load_start, "end": load_end},
           "config": config, "notes": notes, "nonfinite": nonfinite, "priming": priming,
           "results": rows, "latency": lat}
    out = args.json or default_json_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
