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

    python bench/bench_cpu.py            # the headline rows, under a minute on 2 cores
    python bench/bench_cpu.py --full     # every optimizer at every size, about 11 minutes
    python bench/bench_cpu.py --quick    # every optimizer at in-cache sizes, 1-2 minutes
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
import resource
import shutil
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

# Note [in-cache rows]
# When a row's arrays fit in the L2 caches of the cores it runs on, the ceiling is a cache
# bandwidth, and in cache both loops' speeds depend on where the arrays sit relative to each
# other (their offsets within a page: cache-set conflicts, loads aliasing earlier stores), which
# changes from run to run with the allocator: at 2^16 on a 2-vCPU Zen 4, fastoptim's % of
# ceiling ranged from 42% to 198% across runs of the same build. A row is "in cache" when its
# working set (param, grad and states: elements x 4 B x (2 + states), the arrays the ceiling
# loop touches) is at most the L2 size of one core times the threads used (L2_BYTES: read from
# sysfs, 1 MiB where it cannot be read). Its % of ceiling carries IN_CACHE_MARK and a
# footnote: not comparable from run to run, nor a measure of the kernel's efficiency.
IN_CACHE_MARK = "~"
DEFAULT_L2_BYTES = 2**20


def l2_cache_bytes() -> int | None:
    """CPU 0's level-2 (data or unified) cache size in bytes from sysfs, or None."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if ((index / "level").read_text().strip() == "2"
                    and (index / "type").read_text().strip() in ("Unified", "Data")):
                text = (index / "size").read_text().strip().upper()
                if text[-1:] in units:
                    return int(text[:-1]) * units[text[-1]]
                return int(text)
    except (OSError, ValueError):
        pass
    return None


L2_BYTES = l2_cache_bytes() or DEFAULT_L2_BYTES

# Note [stalled cells]
# On a busy machine a parallel region can wait for a CPU: an OpenMP worker (torch) that is
# not running when the region starts delays the whole region by a scheduler slice (a few
# ms), so a torch step of 0.1 ms took 8-190 ms in runs on a loaded 2-vCPU VM, in some cells
# on EVERY call (median and minimum alike: no "noisy" flag), which printed ratios such as
# "x vs fused 3645". An implementation's figure in a cell is "stalled" when
#   * its median is over STALL_OVER_MIN times its fastest call (most calls waited), or
#   * at N > 1 threads, its median is over STALL_OVER_ONE_THREAD times the same
#     implementation's median at 1 thread in this run (more threads made it much slower:
#     it waited for CPUs or memory bandwidth that other load held).
# A row with a stalled implementation is measured again, once, at once: the WHOLE row, every
# implementation interleaved in the same repetitions as the first time (their threads woken
# first), and the second set replaces the first, so every ratio pairs figures of one
# interleaved set (re-measuring the stalled one alone would pair its new figure with its
# peers' old ones, and re-measuring only bad-looking figures would keep the lucky ones). An
# implementation still stalled in the second set carries STALL_MARK and so does every
# figure derived from it (% of ceiling, the ratios). The JSON keeps the first set
# (``remeasured``) and lists the rows measured twice (``remeasured_rows``). (One whose median
# call is over REMEASURE_MAX_CALL_S is not timed again, see the time limits below: it keeps
# its first, marked, figure, so the figures derived from it are marked too.)
STALL_OVER_MIN = 2.0
STALL_OVER_ONE_THREAD = 1.5
STALL_MARK = "!"
# Time limits for stalled cells (one stalled torch step took 24 s in a run on that VM): an
# implementation's timed calls stop at BUDGET_FACTOR times what they should take (measure),
# and one whose median call is over REMEASURE_MAX_CALL_S is marked without a second try.
BUDGET_FACTOR = 3.0
REMEASURE_MAX_CALL_S = 1.0

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
# line stores. Each column's GB/s counts the bytes that column moves (``column_bytes``): an
# update's, its minimal traffic (``bytes_per_element``); the ceiling's, what stream_rmw moves
# (``ceiling_bytes_per_element``: 20 for ASGD's 16). "% of ceiling" is the ratio of the
# times (the ceiling's over fastoptim's), which for ASGD is not the ratio of the GB/s columns.

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
        """The update's minimal traffic (what the implementations' GB/s count)."""
        return ITEMSIZE * sum(self.streams)

    @property
    def ceiling_bytes_per_element(self) -> int:
        """What the ceiling loop moves per element (what the ceiling's GB/s counts)."""
        return ITEMSIZE * sum(self.ceiling_streams)

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


def column_bytes(case: Case, impl: str) -> int:
    """The bytes per element behind an implementation's GB/s: the ceiling's own traffic for
    the ceiling, the update's minimal traffic for the others (Note [traffic and ceiling])."""
    return case.ceiling_bytes_per_element if impl == "ceiling" else case.bytes_per_element


# The minimal traffic documented in bench/README.md, checked against the stream counts.
assert {c.key: c.bytes_per_element for c in CASES} == {
    "sgd": 12, "sgd_momentum": 20, "rmsprop": 20, "rmsprop_centered_momentum": 36, "adam": 28,
    "adamw": 28, "adam_amsgrad": 36, "adagrad": 20, "adadelta": 28, "nadam": 28, "radam": 28,
    "adamax": 28, "asgd": 16, "asgd_averaging": 20, "rprop": 28, "lion": 20}


# What a run covers unless --sizes, --optimizers, --reps or --min-time say otherwise.
# Note [the default run]
# The default is the headline: the optimizers most used (Adam, AdamW, SGD momentum), RMSprop
# (torch has no fused CPU RMSprop: "x vs best" is against foreach) and NAdam (a newer rule,
# foreach only in torch), at 2^20 (4 MiB per array: in L3 here, the divider binds), 2^24
# (64 MiB per array: DRAM, the memory wall) and 256 tensors of 16,384 elements (a model's
# parameter list: ResNet-50 has 161 tensors, BERT-base about 200, LLaMA-7B 291; the
# per-tensor overhead counts), with fewer repetitions than --full. --quick is every case at
# the two smaller sizes and the list. Only --full has 2,000 x 4,096:
# on a busy machine a multi-threaded torch step there can wait a scheduler tick per tensor
# (15 s a step, seen on a 2-vCPU VM), and one such call would take the default's whole time.
PRESETS = {
    "default": {"cases": ("sgd_momentum", "rmsprop", "adam", "adamw", "nadam"),
                "sizes": ("2^20", "2^24", "256x16384"), "reps": 7, "min_time": 0.1},
    "quick": {"cases": None, "sizes": ("2^16", "2^18", "2^20", "256x16384"), "reps": 5,
              "min_time": 0.05},
    "full": {"cases": None, "sizes": tuple(f"2^{k}" for k in range(16, 27, 2)) + ("2000x4096",),
             "reps": 11, "min_time": 0.2},
}


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


def working_set_bytes(case: Case, size: Size) -> int:
    """The bytes of every array a row touches (param, grad, states; Note [in-cache rows])."""
    return size.total * ITEMSIZE * case.ceiling_streams[0]


def in_cache(case: Case, size: Size, threads: int, l2_bytes: int | None = None) -> bool:
    """Whether the row's working set fits in the L2 caches of the cores it runs on (one per
    thread, at most one per usable CPU): Note [in-cache rows]."""
    cores = max(1, min(threads, usable_cpus()))
    return working_set_bytes(case, size) <= (l2_bytes or L2_BYTES) * cores


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
    # This first step, untimed, only makes the states; on one thread, since on a busy machine
    # a multi-threaded torch step over many tensors can take seconds (Note [stalled cells]).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step()
    finally:
        torch.set_num_threads(threads)
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
    """Wakes the worker threads before a timed batch (untimed): a small parallel operation,
    repeated until ``good`` calls in a row take under 1 ms, or ``max_s`` passed. By default
    the operation is fastoptim's (``stream_rmw`` on two small arrays); ``torch_primer`` gives
    one for torch's OpenMP threads.

    Note [priming the thread pool]
    After the main thread has worked alone for some milliseconds (NumPy, a torch foreach
    step over small tensors, which runs on one thread, refilling the states), some kernels
    (VMs that pack idle vCPUs) put the sleeping workers on the main thread's CPU; every
    parallel call then waits for a scheduler tick, ~8 ms, until the workers are moved back,
    which can take a second. Such a stall would land on whichever implementation comes next,
    so each batch is preceded by a primer for the threads that implementation uses (fastoptim's
    pool for fastoptim and the ceiling, torch's OpenMP threads for torch), and the benchmark
    times back-to-back steps. On a machine without the effect a primer costs well under a
    millisecond; on a busy one it gives up after ``max_s`` (after 10 such give-ups, after
    ``later_max_s``).
    """

    def __init__(self, threads: int, op: Callable | None = None, good: int = 20,
                 max_s: float = 1.0, later_max_s: float = 0.05):
        if op is None:
            # threads * 2^16 elements: every thread gets a share (the dispatcher gives each
            # at least 2^15 elements) and the arrays stay in cache.
            streams = [np.zeros(threads * 2**16, DTYPE), np.zeros(threads * 2**16, DTYPE)]
            op = lambda: _core.stream_rmw(streams, 1)  # noqa: E731
        self.op, self.good, self.max_s, self.later_max_s = op, good, max_s, later_max_s
        self.stalls = 0  # calls over 1 ms seen while priming
        self.unsettled = 0  # primes that gave up
        self.primes = 0

    def __call__(self) -> None:
        clock, op = time.perf_counter, self.op
        start, good = clock(), 0
        self.primes += 1
        while good < self.good:
            t0 = clock()
            op()
            t1 = clock()
            if t1 - t0 < 1e-3:
                good += 1
            else:
                good = 0
                self.stalls += 1
            if t1 - start > self.max_s:
                self.unsettled += 1
                if self.unsettled == 10:
                    self.max_s = self.later_max_s
                return

    def counts(self) -> dict:
        return {"primes": self.primes, "stalled_calls": self.stalls,
                "unsettled_batches": self.unsettled}


def torch_primer(threads: int) -> ThreadPrimer:
    """A ThreadPrimer for torch's OpenMP threads: ``torch.add`` of two tensors of
    threads * 2^16 float32 (torch splits elementwise work in grains of 32,768 elements, so
    every thread gets some; 0.5 MiB each, in cache). It gives up sooner than fastoptim's
    (0.25 s, then 20 ms): on a loaded machine torch's threads may never settle (every call
    a scheduler tick late), and every torch batch is primed."""
    a, b = torch.zeros(threads * 2**16), torch.ones(threads * 2**16)
    out = torch.empty_like(a)
    return ThreadPrimer(threads, lambda: torch.add(a, b, out=out), max_s=0.25,
                        later_max_s=0.02)


def primers_for(fns: dict, primers: dict) -> dict:
    """Each implementation's primer: torch's for the torch columns, fastoptim's for fastoptim
    and the ceiling, none for NumPy (one thread)."""
    return {name: primers.get("torch" if name.startswith("torch") else
                              None if name == "numpy" else "fastoptim") for name in fns}


def calibrate(fns: dict, target_s: float, cap: int,
              before_batch: dict | None = None) -> tuple[dict, dict]:
    """Warm each callable up and choose its calls per repetition: enough to last about
    ``target_s``, between 1 and ``cap``. ``before_batch[name]``, if any, runs first. Returns
    (calls per repetition, seconds per call seen). A first call that lasts ``target_s`` or
    more is the only one (a stalled torch step can take seconds)."""
    calls, per_call = {}, {}
    clock = time.perf_counter
    for name, fn in fns.items():
        if before_batch and before_batch.get(name) is not None:
            before_batch[name]()
        t0 = clock()
        fn()  # first touch, lazy initialisation
        n, elapsed = 1, clock() - t0
        if elapsed < target_s:
            n, t0 = 0, clock()
            while True:
                fn()
                n += 1
                elapsed = clock() - t0
                if elapsed >= min(target_s, 0.01) or n >= cap:
                    break
        per_call[name] = elapsed / n
        calls[name] = max(1, min(cap, math.ceil(target_s / per_call[name])))
    return calls, per_call


def interleaved(fns: dict, reps: int, calls: dict, before_rep=None,
                before_batch: dict | None = None, per_call: bool = True,
                budget: dict | None = None) -> dict:
    """Time the callables interleaved (repetition 1 runs a, b, c; repetition 2 runs a, b, c;
    ...) so that drift in clock frequency or load hits all of them alike: ``calls[name]``
    calls of each per repetition, ``before_rep`` and ``before_batch[name]`` untimed.

    Returns per callable the seconds of every call, one list per repetition (``per_call``),
    or of each repetition's mean call (a batch timed as one: for calls of a few
    microseconds). A callable whose timed calls have taken ``budget[name]`` seconds is timed
    no more (a stalled cell must not hold the run for minutes): its list is shorter.
    """
    samples = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    limit = budget or {}
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            if before_rep is not None:
                before_rep()
            for name, fn in fns.items():
                if spent[name] > limit.get(name, math.inf):
                    continue
                k, out = calls[name], samples[name]
                if before_batch and before_batch.get(name) is not None:
                    before_batch[name]()
                if per_call:
                    batch = []
                    for _ in range(k):
                        t0 = clock()
                        fn()
                        batch.append(clock() - t0)
                        spent[name] += batch[-1]
                        if spent[name] > limit.get(name, math.inf):
                            break
                    out.append(batch)
                else:
                    t0 = clock()
                    for _ in range(k):
                        fn()
                    out.append((clock() - t0) / k)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def describe(per_rep: list) -> dict:
    """Statistics of one implementation's call times (seconds, one list per repetition).
    ``median_s`` is the figure reported; ``slow_fraction`` is the share of calls over twice
    the median (stalls: something else took a core)."""
    a = np.concatenate([np.asarray(r, dtype=float) for r in per_rep])
    med = float(np.median(a))
    return {"median_s": med, "mean_s": float(a.mean()), "min_s": float(a.min()),
            "p10_s": float(np.percentile(a, 10)), "p90_s": float(np.percentile(a, 90)),
            "calls": int(a.size), "slow_fraction": float((a > 2 * med).mean()),
            "rep_median_s": [float(np.median(r)) for r in per_rep],
            "rep_mean_s": [float(np.mean(r)) for r in per_rep]}


def measure(fns: dict, reps: int, min_time: float, reset: Callable, primers: dict,
            expected: dict | None = None) -> dict:
    """One cell's timing: calibrate, then ``reps`` interleaved repetitions. Returns each
    implementation's ``describe`` statistics with its calls per repetition.

    An implementation's timed calls get BUDGET_FACTOR times what its cell should take:
    ``reps`` calls of its ``expected`` seconds (its 1-thread median, when known; else the
    calibration's time per call), at least ``min_time``. One that runs past it (stalled) is
    left with the calls it has (``cut_short``); one whose warm-up call alone took longer is
    not timed again: that call is its only sample (``warmup_only``)."""
    reset()
    before = primers_for(fns, primers)
    calls, seen = calibrate(fns, min_time / reps, MAX_CALLS_PER_REP, before)
    expected = expected or {}
    budget = {k: BUDGET_FACTOR * max(min_time, reps * expected.get(k, seen[k])) for k in fns}
    timed = {k: fn for k, fn in fns.items() if seen[k] <= budget[k]}
    samples = interleaved(timed, reps, calls, reset, before, budget=budget)
    stats = {}
    for k in fns:
        if k in samples:
            stats[k] = dict(describe(samples[k]), calls_per_rep=calls[k])
            if stats[k]["calls"] < reps * calls[k]:
                stats[k]["cut_short"] = True
        else:
            stats[k] = dict(describe([[seen[k]]]), calls_per_rep=0, cut_short=True,
                            warmup_only=True)
    return stats


def stall_reasons(stats: dict, threads: int, one_thread: dict) -> dict:
    """The implementations of a cell whose figure is stalled (Note [stalled cells]), each
    with the reasons: ``{name: ["median 3.1x its fastest call", ...]}``. ``one_thread`` holds
    the same cell's medians at 1 thread (empty when there are none)."""
    stalled = {}
    for name, st in stats.items():
        reasons = []
        if st["median_s"] > STALL_OVER_MIN * st["min_s"]:
            reasons.append(f"median {st['median_s'] / st['min_s']:.1f}x its fastest call")
        base = one_thread.get(name)
        if threads > 1 and base and st["median_s"] > STALL_OVER_ONE_THREAD * base:
            reasons.append(f"median {st['median_s'] / base:.1f}x its 1-thread median")
        if reasons:
            stalled[name] = reasons
    return stalled


def measure_cell(fns: dict, args, reset: Callable, primers: dict, threads: int,
                 one_thread: dict) -> tuple[dict, dict]:
    """Measure a row, every implementation interleaved; when some figure is stalled and can
    be re-measured, measure the WHOLE row once more, interleaved as before, and keep that
    second set (Note [stalled cells]). An implementation whose median call is over
    REMEASURE_MAX_CALL_S is not timed again: it keeps its first figure, marked.

    Returns (stats, first): ``first`` is {} when the row was measured once, else the first
    set, every implementation's statistics (a stalled one with ``stalled``, its reasons). A
    stats entry has ``stalled`` when the figure kept is stalled."""
    stats = measure(fns, args.reps, args.min_time, reset, primers, one_thread)
    stalled = stall_reasons(stats, threads, one_thread)
    hopeless = {k: v for k, v in stalled.items()
                if stats[k]["median_s"] > REMEASURE_MAX_CALL_S}
    first = {}
    if len(stalled) > len(hopeless):  # a second set can clear some figure: once, whole row
        first = {k: dict(v, **({"stalled": stalled[k]} if k in stalled else {}))
                 for k, v in stats.items()}
        again = {k: fn for k, fn in fns.items() if k not in hopeless}
        second = measure(again, args.reps, args.min_time, reset, primers, one_thread)
        stats = {k: second.get(k, stats[k]) for k in fns}  # the row's order
        stalled = dict(hopeless, **stall_reasons(second, threads, one_thread))
        for name in hopeless:  # not timed again: the one figure not of the second set
            stats[name]["kept_from_first_set"] = True
    for name, reasons in stalled.items():
        stats[name]["stalled"] = reasons
    return stats, first


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


class LoadMeter:
    """How busy the machine is: the load average, and between two samples the CPU time that
    OTHER processes used (all CPUs' busy time in /proc/stat minus this process's, both over
    the wall time: "0.9 CPUs" means other work kept about one CPU busy) and the time the
    hypervisor stole."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.first = self.last = self._read()

    def _read(self) -> dict:
        own = os.times()
        reading = {"wall": time.perf_counter(), "own": own.user + own.system}
        try:
            lines = Path("/proc/stat").read_text().splitlines()
            f = [int(x) for x in lines[0].split()[1:9]]
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            reading["busy"] = (f[0] + f[1] + f[2] + f[5] + f[6]) / self.tick
            reading["steal"] = f[7] / self.tick
            reading["cpus"] = sum(1 for ln in lines[1:] if ln.startswith("cpu"))
        except (OSError, ValueError, IndexError):
            pass
        return reading

    def sample(self, label: str, since_first: bool = False) -> dict:
        """The load average now and the other processes' CPU since the previous sample (or
        since the meter was made)."""
        now, last = self._read(), self.first if since_first else self.last
        self.last = now
        wall = now["wall"] - last["wall"]
        out = {"when": label, "loadavg": loadavg(), "seconds": round(wall, 1)}
        if "busy" in now and "busy" in last and wall > 0:
            out["other_cpus"] = round(max(0.0, (now["busy"] - last["busy"]
                                                - (now["own"] - last["own"])) / wall), 2)
            out["steal_cpus"] = round((now["steal"] - last["steal"]) / wall, 2)
            out["cpus"] = now["cpus"]
        return out


def fmt_load(sample: dict) -> str:
    text = f"load average {sample['loadavg']}"
    if "other_cpus" in sample:
        text += (f"; other processes used {sample['other_cpus']:.2f} of {sample['cpus']} CPUs "
                 f"over the last {sample['seconds']:g} s (steal {sample['steal_cpus']:.2f})")
    return text


class Progress:
    """Progress on stderr, plain text: one line redrawn with \r on a terminal, otherwise a
    line per finished cell."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.done = total, stream, 0
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()

    def _clock(self) -> str:
        elapsed = time.perf_counter() - self.start
        if not self.done:
            return f"{elapsed:.0f} s"
        return f"{elapsed:.0f} s, ~{elapsed / self.done * (self.total - self.done):.0f} s left"

    def begin(self, what: str) -> None:
        if self.tty:
            bar = "#" * (20 * self.done // self.total)
            line = f"[{bar:-<20}] {self.done}/{self.total} {what} ({self._clock()})"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()

    def end(self, summary: str) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write(f"[{self.done:3}/{self.total}] {summary}  [{self._clock()}]\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()


# ---------------------------------------------------------------------------------------
# One cell, the latency row, the output

def summarize(stats: dict, case: Case, size: Size, threads: int) -> dict:
    """A row: per implementation the call statistics and the GB/s of the median (each
    column's own bytes, ``column_bytes``), the ratios of medians, which of them derive from a
    stalled figure (Note [stalled cells]) and whether the row is in cache (Note [in-cache
    rows])."""
    med = {k: v["median_s"] for k, v in stats.items()}
    fo = med["fastoptim"]
    torch_impls = [k for k in ("torch_foreach", "torch_fused") if k in med]
    stalled = sorted(k for k, v in stats.items() if v.get("stalled"))
    derived = {"pct_of_ceiling": ("fastoptim", "ceiling"), "x_vs_numpy": ("fastoptim", "numpy"),
               "x_vs_torch_fused": ("fastoptim", "torch_fused"),
               "x_vs_torch_best": ("fastoptim", *torch_impls)}
    return {
        "optimizer": case.key, "label": case.label, "size": size.label,
        "tensors": size.tensors, "elements_per_tensor": size.elements, "elements": size.total,
        "threads": threads, "bytes_per_element": case.bytes_per_element,
        "ceiling_bytes_per_element": case.ceiling_bytes_per_element,
        "streams_read_written": list(case.streams),
        "ceiling_streams_read_written": list(case.ceiling_streams),
        "median_s": med,
        "gbps": {k: size.total * column_bytes(case, k) / t / 1e9 for k, t in med.items()},
        "pct_of_ceiling": 100 * med["ceiling"] / fo,  # of the times (Note [traffic and ceiling])
        "working_set_bytes": working_set_bytes(case, size),
        "in_cache": in_cache(case, size, threads),
        "x_vs_numpy": med["numpy"] / fo if "numpy" in med else None,
        "x_vs_torch_fused": med["torch_fused"] / fo if "torch_fused" in med else None,
        "x_vs_torch_best": min(med[k] for k in torch_impls) / fo if torch_impls else None,
        "noisy": any(v["slow_fraction"] > NOISY_FRACTION for v in stats.values()),
        "stalled": stalled,
        "stalled_figures": sorted(k for k, inputs in derived.items()
                                  if any(i in stalled for i in inputs)),
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
    primers = make_primers(threads, prime, use_torch)
    before = primers_for(fns, primers)
    calls, _ = calibrate(fns, 2e-3, 1000, before)
    samples = interleaved(fns, reps, calls, reset, before, per_call=False)
    return {"threads": threads, "elements": 1024, "optimizer": "adam",
            "median_us": {k: 1e6 * statistics.median(v) for k, v in samples.items()},
            "min_us": {k: 1e6 * min(v) for k, v in samples.items()},
            "rep_mean_s": samples, "calls_per_rep": calls, "finite": all_finite(arrays)}


def mark_latency(lat: list) -> None:
    """Note [stalled cells] for the latency row: on the repetitions' mean calls, against the
    1-thread entry."""
    one = next((e["median_us"] for e in lat if e["threads"] == 1), {})
    for e in lat:
        stats = {k: {"median_s": v, "min_s": e["min_us"][k]} for k, v in e["median_us"].items()}
        e["stalled"] = stall_reasons(stats, e["threads"], one)


def make_primers(threads: int, prime: bool, use_torch: bool) -> dict:
    """The thread primers of a thread count: none at 1 thread or with --no-prime."""
    if threads == 1 or not prime:
        return {}
    primers = {"fastoptim": ThreadPrimer(threads)}
    if use_torch:
        primers["torch"] = torch_primer(threads)
    return primers


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


def fmt_marked(text: str, marked: bool) -> str:
    """A figure and one column for its mark (STALL_MARK or a space)."""
    return text + (STALL_MARK if marked and text != "-" else " ")


def fmt_pct(r: dict) -> str:
    """The row's % of ceiling and two columns for its marks: STALL_MARK when it derives from
    a stalled figure, IN_CACHE_MARK when the row is in cache (in that order, no space)."""
    text = fmt_num(r["pct_of_ceiling"], 0)
    marks = ((STALL_MARK if "pct_of_ceiling" in r.get("stalled_figures", ()) else "")
             + (IN_CACHE_MARK if r.get("in_cache") else ""))
    return (text + marks).ljust(len(text) + 2)


def table_lines(rows: list, threads: int, load: dict | None = None) -> list:
    """One thread count's table as lines of text. A stalled implementation's ms and every
    figure derived from it carry STALL_MARK; the size carries * when the row is noisy; the %
    of ceiling carries IN_CACHE_MARK when the row is in cache."""
    plural = "s" if threads > 1 else ""
    lines = [f"\n== {threads} thread{plural} (fastoptim, torch, ceiling); "
             "NumPy single-threaded =="]
    if load is not None:
        lines.append(f"   during this pass: {fmt_load(load)}")
    lines.append(f"{'':16} {'':>10} | {'fastoptim':^15} | {'NumPy':^15} | "
                 f"{'torch foreach':^15} | {'torch fused':^15} | {'ceiling':>7} | "
                 f"{'% of':>7} {'x vs':>7} {'x vs':>7} {'x vs':>7}")
    lines.append(f"{'optimizer':16} {'N':>10} | " + " | ".join([f"{'ms':>8} {'GB/s':>6}"] * 4)
                 + f" | {'GB/s':>7} | {'ceil':>7} {'NumPy':>7} {'fused':>7} {'best':>7}")
    last = None
    for r in rows:
        if last is not None and r["optimizer"] != last:
            lines.append("")
        last = r["optimizer"]
        med, gbps, stalled = r["median_s"], r["gbps"], set(r.get("stalled", ()))
        marked = set(r.get("stalled_figures", ()))
        impls = " | ".join(f"{fmt_marked(fmt_ms(med.get(i)), i in stalled):>8} "
                           f"{fmt_num(gbps.get(i)):>6}"
                           for i in ("fastoptim", "numpy", "torch_foreach", "torch_fused"))
        size = r["size"] + ("*" if r["noisy"] else " ")
        ratios = " ".join(f"{fmt_marked(fmt_num(r[k]), k in marked):>7}"
                          for k in ("x_vs_numpy", "x_vs_torch_fused", "x_vs_torch_best"))
        ceiling = fmt_num(gbps.get("ceiling")) + (STALL_MARK if "ceiling" in stalled else "")
        lines.append(f"{r['label']:16} {size:>10} | {impls} | {ceiling:>7} | {fmt_pct(r):>7} "
                     f"{ratios}")
    return lines


def print_latency(lat: list) -> None:
    print("\n== Latency: one Adam step on 1,024 float32, end to end from Python (median, us) ==")
    impls = [i for i in ("fastoptim", "numpy", "torch_fused", "torch_foreach")
             if i in lat[0]["median_us"]]
    print(f"{'threads':>7} " + " ".join(f"{IMPL_TITLES[i]:>14} " for i in impls))
    for entry in lat:
        stalled = entry.get("stalled", {})
        print(f"{entry['threads']:>7} " + " ".join(
            f"{fmt_marked(format(entry['median_us'][i], '.1f'), i in stalled):>15}"
            for i in impls))


def default_json_path() -> Path:
    stem = f"cpu-{datetime.date.today().isoformat()}"
    path, n = BENCH_DIR / "results" / f"{stem}.json", 2
    while path.exists():
        path, n = BENCH_DIR / "results" / f"{stem}-{n}.json", n + 1
    return path


# ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="every optimizer at 2^16, 2^18, "
                       "..., 2^26 and 2000x4096; 11 repetitions, 0.2 s per implementation per "
                       "cell (about 11 minutes and 2.6 GiB on 2 cores)")
    which.add_argument("--quick", action="store_true", help="every optimizer at 2^16, 2^18, "
                       "2^20 and 256x16384; 5 repetitions, 0.05 s per implementation per cell")
    ap.add_argument("--sizes", help="comma-separated: 2^k, an element count, or COUNTxSIZE for "
                    "a list of COUNT arrays (default 2^20,2^24,256x16384)")
    ap.add_argument("--threads", help="comma-separated thread counts (default: 1 and all)")
    ap.add_argument("--optimizers", help="comma-separated subset of: " + ", ".join(CASES_BY_KEY)
                    + " (default " + ",".join(PRESETS["default"]["cases"]) + ")")
    ap.add_argument("--reps", type=int, help="repetitions per cell (default 7; --full 11; "
                    "--quick 5)")
    ap.add_argument("--min-time", type=float, help="seconds per implementation per cell, all "
                    "repetitions together (default 0.1; --full 0.2; --quick 0.05)")
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
    args.preset = "full" if args.full else "quick" if args.quick else "default"
    preset = PRESETS[args.preset]
    try:
        args.sizes = [parse_size(s) for s in
                      (args.sizes.split(",") if args.sizes else preset["sizes"])]
        args.threads = (sorted({int(t) for t in args.threads.split(",")}) if args.threads
                        else sorted({1, usable_cpus()}))
        if min(args.threads) < 1:
            raise ValueError("thread counts must be >= 1")
        keys = (args.optimizers.split(",") if args.optimizers else preset["cases"])
        args.cases = [CASES_BY_KEY[k.strip()] for k in keys] if keys else CASES
    except KeyError as exc:
        ap.error(f"unknown optimizer {exc}; choose from {', '.join(CASES_BY_KEY)}")
    except ValueError as exc:
        ap.error(str(exc))
    args.reps = args.reps or preset["reps"]
    args.min_time = args.min_time or preset["min_time"]
    args.use_torch = torch is not None and not args.no_torch
    return args


def print_header(args, machine: dict, load: dict) -> None:
    fo = machine["fastoptim"]
    print(f"CPU       {machine['cpu']} ({machine['usable_cpus']} usable of "
          f"{machine['logical_cpus']} logical CPUs; {', '.join(machine.get('cpu_flags', []))}); "
          f"{machine.get('mem_total_gib', '?')} GiB RAM")
    print(f"fastoptim {fo['version']}: isa={fo['isa']} (compiled {','.join(fo['isas_compiled'])};"
          f" supported {','.join(fo['isas_supported'])}), threading={fo['threading']}, "
          f"default threads={fo['num_threads']}")
    print(f"numpy {np.__version__}; torch {machine['torch'] or 'not installed'}; "
          f"python {machine['python']}")
    print(f"load at the start: {fmt_load(load)}")
    more = "" if args.preset == "full" else " (--full: every optimizer and size)"
    print(f"run {args.preset}{more}: {', '.join(c.key for c in args.cases)}; sizes "
          f"{', '.join(s.label for s in args.sizes)} (float32); threads {args.threads}; "
          f"{args.reps} reps, ~{args.min_time:g} s per implementation per cell; median of calls")


def run_cells(args, unavailable: set, meter: LoadMeter, progress: Progress) -> tuple:
    """Every (threads, size, case) cell, in that order; returns the rows, the primers' counts
    per thread count and the load of each thread count's pass."""
    rows, priming, loads = [], {}, {}
    numpy_stats = {}  # (case, size) -> stats: NumPy runs on one thread, measured once
    one_thread = {}  # (case, size) -> {implementation: median at 1 thread}
    for threads in args.threads:
        set_threads(threads)
        meter.sample(f"before {threads} threads")
        primers = make_primers(threads, not args.no_prime, args.use_torch)
        for size in args.sizes:
            pool = allocate(size, np.random.default_rng(0))
            params = torch_params(pool) if args.use_torch else None
            for case in args.cases:
                progress.begin(f"{threads} thr {case.label} {size.label}")
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
                cell_start = time.perf_counter()
                stats, first = measure_cell(fns, args, reset, primers, threads,
                                            one_thread.get(key, {}))
                del fns  # frees torch's optimizers before the next case builds its own
                if "numpy" in stats:
                    numpy_stats[key] = dict(stats["numpy"], measured_with_threads=threads)
                if key in numpy_stats:
                    stats["numpy"] = numpy_stats[key]
                if threads == 1:
                    one_thread[key] = {k: v["median_s"] for k, v in stats.items()
                                       if k != "numpy"}
                row = summarize(stats, case, size, threads)
                row["remeasured"] = first  # the first set of a row measured twice, else {}
                row["remeasured_because"] = {k: v["stalled"] for k, v in first.items()
                                             if v.get("stalled")}
                row["seconds"] = round(time.perf_counter() - cell_start, 2)
                row["finite"] = all_finite(arrays)
                rows.append(row)
                flags = "".join([" (noisy)" if row["noisy"] else "",
                                 " (in cache)" if row["in_cache"] else "",
                                 " (re-measured the row: stalled "
                                 f"{','.join(row['remeasured_because'])})" if first else "",
                                 f" (stalled {','.join(row['stalled'])})"
                                 if row["stalled"] else ""])
                progress.end(f"{threads} thr {case.label:16} {size.label:>9}: fastoptim "
                             f"{fmt_ms(row['median_s']['fastoptim'])} ms, "
                             f"{row['pct_of_ceiling']:.0f}% of ceiling{flags}")
            del pool, params, arrays
            gc.collect()
        loads[threads] = meter.sample(f"{threads} threads")
        priming[threads] = {k: p.counts() for k, p in primers.items()}
    return rows, priming, loads


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.isa:
        fastoptim.set_isa(args.isa)
    machine = machine_info()
    meter = LoadMeter()
    time.sleep(0.5)  # a short window for the other processes' CPU use
    load_start = meter.sample("start")
    print_header(args, machine, load_start)

    notes, unavailable = check_implementations(args.cases, args.use_torch)
    if torch is None:
        notes.append("torch is not installed: no torch columns")
    for note in notes:
        print(f"note: {note}")
    # The arrays (2 + MAX_STATES streams), NumPy's scratch (up to 3), torch's temporaries.
    peak = max(s.total for s in args.sizes) * ITEMSIZE * (2 + MAX_STATES + 3 + 3)
    print(f"arrays and scratch about {peak / 2**30:.1f} GiB (an estimate; the libraries add "
          f"~0.2 GiB, and the peak is printed at the end; available "
          f"{machine.get('mem_available_gib', '?')} GiB)", flush=True)

    start = time.perf_counter()
    progress = Progress(len(args.threads) * (len(args.sizes) * len(args.cases) + 1))
    try:
        rows, priming, loads = run_cells(args, unavailable, meter, progress)
        lat = []
        for i, t in enumerate(args.threads):
            progress.begin(f"{t} thr latency row")
            lat.append(latency(t, not args.no_numpy and i == 0, args.use_torch,
                               3 * max(args.reps, 11), not args.no_prime))
            progress.end(f"{t} thr latency row")
    finally:
        progress.close()
    for entry in lat[1:]:
        if "numpy" in lat[0]["median_us"]:
            entry["median_us"]["numpy"] = lat[0]["median_us"]["numpy"]
            entry["min_us"]["numpy"] = lat[0]["min_us"]["numpy"]
    mark_latency(lat)
    seconds = time.perf_counter() - start

    order = {c.key: i for i, c in enumerate(args.cases)}
    for threads in args.threads:
        print("\n".join(table_lines(
            sorted((r for r in rows if r["threads"] == threads),
                   key=lambda r: (order[r["optimizer"]], r["tensors"] > 0, r["elements"])),
            threads, loads.get(threads))))
    print()
    if any(r["noisy"] for r in rows):
        print(f"* noisy: over {NOISY_FRACTION:.0%} of some implementation's calls took more "
              "than twice its median (other load on the machine); the median is still shown")
    stalled = [r for r in rows if r["stalled"]]
    print(f"{STALL_MARK} stalled: the implementation's median was over {STALL_OVER_MIN:g}x its "
          f"fastest call, or over {STALL_OVER_ONE_THREAD:g}x its own 1-thread median: it "
          "waited for CPUs or memory that other load held. A row with such a figure is "
          "measured again once, all its implementations interleaved, and that second set is "
          f"shown (a figure whose calls took over {REMEASURE_MAX_CALL_S:g} s is not timed "
          f"again and keeps its mark). Every figure derived from a stalled one carries "
          f"{STALL_MARK}. {len(stalled)} of {len(rows)} rows have one; "
          f"{sum(1 for r in rows if r['remeasured'])} rows were re-measured.")
    if any(r["in_cache"] for r in rows):
        print(f"{IN_CACHE_MARK} in cache: the row's arrays (param, grad, states) fit in the L2 "
              f"caches of the cores it ran on ({L2_BYTES // 2**10} KiB per core x threads). "
              "In cache the ceiling and the kernels run at speeds that depend on where the "
              "arrays sit relative to each other (their offsets within a page), which changes "
              "from run to run: such a % of ceiling is not comparable run to run (42% to 198% "
              "at 2^16 in runs on a 2-vCPU Zen 4) nor a measure of the kernel's efficiency.")
    own = sorted({(r["label"], r["ceiling_bytes_per_element"], r["bytes_per_element"])
                  for r in rows if r["ceiling_bytes_per_element"] != r["bytes_per_element"]})
    if own:
        print("ceiling GB/s counts the bytes the ceiling loop moves: " + "; ".join(
            f"{label} {c} B per element, where the implementations' GB/s count the update's "
            f"minimal {b}" for label, c, b in own) + " (% of ceiling is the ratio of the times)")
    print_latency(lat)

    nonfinite = [f"{r['optimizer']} {r['size']} threads={r['threads']}"
                 for r in rows if not r["finite"]]
    nonfinite += [f"latency threads={e['threads']}" for e in lat if not e["finite"]]
    for note in notes:
        print(f"note: {note}")
    for threads, counts in priming.items():
        for who, p in counts.items():
            if p["stalled_calls"]:
                print(f"note: {threads} threads: {p['stalled_calls']} of {who}'s parallel calls "
                      f"stalled (> 1 ms) while waking its threads before {p['primes']} timed "
                      f"batches, {p['unsettled_batches']} batches started unsettled "
                      "(ThreadPrimer in bench_cpu.py)")
    if nonfinite:
        print(f"WARNING: non-finite values after timing: {', '.join(nonfinite)}")
    load_end = meter.sample("end (the whole run)", since_first=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"load at the end: {fmt_load(load_end)}")
    print(f"benchmark {seconds:.0f} s; peak memory (max RSS) {peak_rss:.2f} GiB")

    config = {"argv": sys.argv[1:] if argv is None else list(argv), "preset": args.preset,
              "sizes": [dataclasses.asdict(s) for s in args.sizes], "threads": args.threads,
              "optimizers": [c.key for c in args.cases], "reps": args.reps,
              "min_time_s": args.min_time, "max_calls_per_rep": MAX_CALLS_PER_REP,
              "numpy_block": args.numpy_block, "prime_threads": not args.no_prime,
              "statistic": "median of every timed call (perf_counter per call), interleaved",
              "stall_rule": {"over_min": STALL_OVER_MIN,
                             "over_one_thread": STALL_OVER_ONE_THREAD, "mark": STALL_MARK,
                             "remeasured_once": True,
                             "remeasure": "the whole row, interleaved, once; the second set "
                                          "is kept (the first in results[i].remeasured)",
                             "remeasure_max_call_s": REMEASURE_MAX_CALL_S},
              "in_cache_rule": {"mark": IN_CACHE_MARK, "l2_bytes_per_core": L2_BYTES,
                                "l2_from_sysfs": l2_cache_bytes() is not None,
                                "rule": "working_set_bytes <= l2_bytes_per_core x "
                                        "min(threads, usable CPUs)"},
              "dtype": "float32",
              "cases": {c.key: {"bytes_per_element": c.bytes_per_element,
                                "ceiling_bytes_per_element": c.ceiling_bytes_per_element,
                                "streams_read_written": list(c.streams),
                                "ceiling_streams_read_written": list(c.ceiling_streams),
                                "per_step": getattr(c.step_arguments, "__name__", None),
                                "initial_states": c.initial,
                                "fastoptim": [c.function, c.hyper],
                                "numpy": [c.numpy_class, c.numpy_hyper],
                                "torch": [c.torch_class, c.torch_hyper]} for c in args.cases}}
    doc = {"schema": 2, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine,
           "load_average": {"start": load_start["loadavg"], "end": load_end["loadavg"]},
           "load": {"start": load_start, "passes": {str(t): v for t, v in loads.items()},
                    "end": load_end},
           "seconds": round(seconds, 1), "peak_rss_gib": round(peak_rss, 3),
           "config": config, "notes": notes, "nonfinite": nonfinite, "priming": priming,
           "remeasured_rows": [{"optimizer": r["optimizer"], "size": r["size"],
                                "threads": r["threads"], "because": r["remeasured_because"]}
                               for r in rows if r["remeasured"]],
           "results": rows, "latency": lat}
    out = args.json or default_json_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
