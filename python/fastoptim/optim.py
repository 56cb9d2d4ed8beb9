"""Stateful optimizers for NumPy arrays: torch.optim's classes as thin shells around the fused,
in-place updates of :mod:`fastoptim.functional` (contract: ``docs/api.md``).

Each class holds the hyperparameters (``param_groups``, torch's layout), the state arrays
(``state``, torch's names) and one step count per group. ``step(grads)`` makes one fused call per
(group, dtype), passing LISTS of arrays; there is no Python loop that calls a kernel per array.

Note [States are allocated once]
    Every state array is allocated in ``__init__`` (or ``add_param_group``), never in ``step``:
    zeros, except Adagrad's ``sum`` which starts at ``initial_accumulator_value``. Optional states
    exist only when the group asks for them at construction (``momentum_buffer`` when
    ``momentum != 0``, ``grad_avg`` when ``centered``, ``max_exp_avg_sq`` when ``amsgrad``).
    Turning such a flag on later through ``param_groups`` is an error, not a silent allocation.
    SGD's zero buffer is not torch's "no buffer yet": the kernel receives ``step`` and, on
    step 1, sets the buffer to the gradient exactly as torch does when it clones it.
    ``load_state_dict`` copies INTO these arrays, so their identity never changes.

Note [State dtypes]
    ``state_dtype`` (keyword, every class) chooses how the states are stored: ``None`` (the
    default) in the param's dtype; ``"float32"`` or ``"bfloat16"`` as such (float32 or bfloat16
    params); ``"int8"`` or ``"int4"`` block-wise quantized (:mod:`fastoptim.quant`), for float32
    or bfloat16 params of at least ``fastoptim.quant.MIN_QUANTIZED_SIZE`` (4096) elements; smaller tensors
    keep float32 states (their absmax and per-call overhead outweigh the bytes saved, as
    bitsandbytes' ``min_8bit_size``). A quantized state is a
    :class:`~fastoptim.quant.QuantizedState` in ``state``; ``state_dict`` saves it compressed
    (a copy of the object), and ``load_state_dict`` accepts, for each state, the saved form or a float array of its shape
    (torch.optim's layout), converting either way: ``QuantizedState.to_float()`` is the
    documented conversion to torch's fp32 layout, ``QuantizedState.from_float(x, bits,
    non_negative)`` the one back. ``state_nbytes()`` reports the bytes the states hold.

Note [One step count per group]
    torch keeps ``state[p]["step"]`` per parameter, but all parameters of a group step together,
    so one integer per group is kept here. ``state_dict`` writes it into every parameter's entry
    (torch's layout); ``load_state_dict`` requires the entries of a group to agree.

Note [Learning-rate schedules]
    ``lr`` (the constructor argument or a group's ``"lr"``) is a float or a callable ``lr(t)``,
    where ``t`` is the number of steps the group has already taken (0 for the first update), so
    ``lr=lambda t: 0.1 * 0.5**t`` is a schedule. The callable is called once per group per step
    and its value is checked (a finite number >= 0, else ValueError). ``state_dict`` stores the
    callable itself, not a value.

Note [All or nothing]
    A step either updates every group or none. Before the first kernel call, ``step`` checks
    every group's hyperparameters (they may have been edited through ``param_groups``), evaluates
    every callable lr, and, when there is more than one call to make, checks each gradient's
    type, dtype, shape and contiguity against its parameter and that no gradient shares memory
    with a parameter or state that any of the calls writes (the kernel checks overlaps within
    its own call only). With a single call the kernel's own checks, which run before it writes,
    give the same guarantee, and name the same ``grads[i]``. Masked arrays are refused as
    parameters and as gradients: the kernels would ignore the mask. ``load_state_dict``
    likewise validates and deep-copies everything (hyperparameters included) before it writes
    the first array or group.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from . import _placement
from . import functional as F
from .quant import MIN_QUANTIZED_SIZE, QuantizedState
from .typing import Params

__all__ = ["Optimizer", "SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam",
           "Adamax", "ASGD", "Rprop", "Lion"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
#: The kernels take step <= 2**53 (exact in float64; bindings.cpp, step_arg): a loaded step
#: count must leave room for the next step.
_MAX_STEP = 2**53


def _supported_dtype(dtype: np.dtype) -> bool:
    # bfloat16 (ml_dtypes) by name: importing ml_dtypes here would slow `import fastoptim`
    return dtype in _FLOAT_DTYPES or dtype.name == "bfloat16"
# What a gradient must share with its parameter; strides stand in for C-contiguity (a C-contiguous
# array of the parameter's shape and dtype has the parameter's strides, up to size-1 dimensions,
# which the exact check in Optimizer._check_grads then accepts).
_grad_meta = operator.attrgetter("__class__", "dtype", "shape", "strides")
_base = operator.attrgetter("base")
_owns_data = operator.attrgetter("flags.owndata")


# ---------------------------------------------------------------------------------------------
# Hyperparameter checks: the ranges of docs/api.md. Each takes the name to report and the value.

def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_real(where: str, value: Any) -> None:
    if not _is_real(value):
        raise TypeError(f"{where} must be a real number, got {value!r}")
    try:
        float(value)  # an int beyond float range (10**400): the kernels take doubles
    except OverflowError:
        raise ValueError(f"invalid {where}: too large for a float") from None


def _check_nonneg(where: str, value: Any) -> None:
    _check_real(where, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {where}: {value!r} (must be finite and >= 0)")


def _check_unit_open(where: str, value: Any) -> None:
    _check_real(where, value)
    if not 0 <= value < 1:
        raise ValueError(f"invalid {where}: {value!r} (must be in [0, 1))")


def _check_unit(where: str, value: Any) -> None:
    _check_real(where, value)
    if not 0 <= value <= 1:
        raise ValueError(f"invalid {where}: {value!r} (must be in [0, 1])")


def _check_flag(where: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be a bool, got {value!r}")


def _check_lr(where: str, value: Any) -> None:
    if not callable(value):
        _check_nonneg(where, value)


def _check_betas(where: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where} must be a pair (beta1, beta2), got {value!r}")
    _check_unit_open(f"{where}[0]", value[0])
    _check_unit_open(f"{where}[1]", value[1])


# Note [Hyperparameters checked once]
#     step() checks every group's hyperparameters before it writes anything (docs/api.md). On a
#     small model those checks were most of a step (36 us against 3.4 us for the functional
#     call on six 10-element tensors). So a group whose hyperparameters are the ones its last
#     check passed, as `_hyper_key` sees them, is not checked again: scalars of the same type
#     and value, tuples of them (betas), and callables (lr schedules: their check is that they
#     are callable, and each value they return is checked every step). Anything else (betas in
#     a list, which may change in place; a missing key) has no key and is checked every step.
_SCALARS = frozenset((bool, int, float, str, np.bool_, np.float16, np.float32, np.float64,
                      np.int32, np.int64))
_MISSING = object()


def _hyper_key(group: Mapping[str, Any], names: Any) -> tuple[Any, ...] | None:
    key = []
    for name in names:
        v = group.get(name, _MISSING)
        t = type(v)
        if t in _SCALARS or (callable(v) and t is not type):
            key.append((t, v))
        elif t is tuple and all(type(x) in _SCALARS for x in v):
            key.append((t, tuple((type(x), x) for x in v)))
        else:
            return None
    return tuple(key)


def _key(where: str, name: str) -> str:
    return f"{where}[{name!r}]" if where else name


def _check_float_array(where: str, p: Any) -> None:
    """A float32/float64/float16/bfloat16, C-contiguous numpy.ndarray (what the kernels update
    or read; a class keeps a param's states in the param's dtype: docs/api.md, "Storage
    formats", the all-low-precision rows)."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(p).__name__}")
    if isinstance(p, np.ma.MaskedArray):
        # The kernels would read and write every element, masked or not.
        raise TypeError(f"{where} is a numpy.ma.MaskedArray; fastoptim reads and writes every "
                        f"element and cannot honour a mask (pass its .data to ignore the mask)")
    if not _supported_dtype(p.dtype):
        raise TypeError(f"{where} has dtype {p.dtype}; must be float32, float64, float16 or "
                        f"bfloat16 (ml_dtypes)")
    if not p.flags.c_contiguous:
        raise ValueError(f"{where} is not C-contiguous")


def _check_param(where: str, p: Any) -> None:
    _check_float_array(where, p)
    if not p.flags.writeable:
        raise ValueError(f"{where} is not writeable")


def _span(a: np.ndarray) -> tuple[int, int]:
    """The bytes [lo, hi) a C-contiguous array occupies."""
    lo = a.__array_interface__["data"][0]
    return lo, lo + a.nbytes


def _owner(a: np.ndarray) -> np.ndarray | None:
    """The ndarray that owns the memory a views, or None when it is not an ndarray (bytes, an
    mmap, another library's buffer) or cannot be told. Two different owners never overlap."""
    while True:
        if a.flags.owndata:
            return a
        base = a.base
        if not isinstance(base, np.ndarray):
            return None
        a = base


def _check_no_overlap(params: Sequence[np.ndarray], names: Sequence[str]) -> None:
    # C-contiguous arrays occupy [address, address + nbytes); after sorting by address, any
    # overlap shows up between neighbours. This also catches the same array given twice.
    spans = sorted(
        (p.__array_interface__["data"][0], p.nbytes, k) for k, p in enumerate(params) if p.nbytes
    )
    for (a0, n0, k0), (a1, _, k1) in zip(spans, spans[1:]):
        if a1 < a0 + n0:
            raise ValueError(
                f"{names[k0]} and {names[k1]} overlap in memory (the same array given twice?)"
            )


_STATE_DTYPES = (None, "float32", "bfloat16", "int8", "int4")


def _check_state_dtype(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"state_dtype must be None or a str, got {type(value).__name__}")
    if value not in _STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, 'float32', 'bfloat16', 'int8' or 'int4', "
                         f"got {value!r}")
    return value


def _non_negative_names() -> frozenset[str]:
    """The class-level names (torch's, singular) of the states every rule declares
    non-negative (rules.h): ``exp_avg_sqs`` -> ``exp_avg_sq``; Adagrad's ``state_sums`` is
    torch's ``sum``."""
    from . import _core
    return frozenset("sum" if n == "state_sums" else n[:-1]
                     for info in _core.rules.values() for n in info["non_negative_states"])


def _state_arrays(x: Any) -> list[np.ndarray]:
    """The ndarrays a state holds (a QuantizedState: its codes and absmax)."""
    return [x.codes, x.absmax] if isinstance(x, QuantizedState) else [x]


def _state_kind(x: Any) -> str:
    return x.dtype if isinstance(x, QuantizedState) else str(x.dtype)


class _Bucket:
    """The arrays of one (group, dtype): the arguments of one fused call, built once."""

    __slots__ = ("indices", "start", "stop", "params", "states")

    def __init__(self, indices: list[int], params: list[np.ndarray],
                 states: dict[str, list[np.ndarray]]) -> None:
        self.indices = indices
        contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
        # A contiguous run of gradients is taken by slicing, without a per-array comprehension.
        self.start = indices[0] if contiguous else None
        self.stop = indices[0] + len(indices) if contiguous else None
        self.params = params
        self.states = states

    def grads(self, grads: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
        if self.start is not None:
            return grads[self.start:self.stop]
        return [grads[i] for i in self.indices]


class Optimizer:
    """Base class: parameter groups, states allocated once, one fused call per (group, dtype).

    Hyperparameters may be edited through ``param_groups`` between steps (as in torch), within
    the states allocated at construction. A group's ``"params"`` list is informational: add
    parameters with ``add_param_group``.

    Subclasses define ``_hyper`` (hyperparameter name -> check, in torch's order),
    ``_state_names(group)`` and ``_update(hp, step, params, grads, states)``.
    """

    _hyper: Mapping[str, Callable[[str, Any], None]] = {}

    def __init__(self, params: Params, defaults: Mapping[str, Any],
                 state_dtype: str | None = None) -> None:
        self._state_dtype = _check_state_dtype(state_dtype)
        self.defaults: dict[str, Any] = dict(defaults)
        self._check_group(self.defaults, "")
        self.param_groups: list[dict[str, Any]] = []
        #: flat parameter index -> {state name: array}; indices run over all groups in order.
        self.state: dict[int, dict[str, np.ndarray]] = {}
        self._params: list[np.ndarray] = []
        self._meta: list[tuple[Any, ...]] = []
        self._num_calls = 0
        self._param_names: list[str] = []
        self._group_indices: list[list[int]] = []
        self._allocated: list[tuple[str, ...]] = []
        #: per group, ``_hyper_key`` of the hyperparameters its last check passed
        self._checked: dict[int, tuple[Any, ...]] = {}
        self._buckets: list[list[_Bucket]] = []
        self._steps: list[int] = []
        #: What a step writes (every parameter and state): the byte spans sorted by start, the
        #: running maximum of their ends, their names; and the ids of the ndarrays that own their
        #: memory, or None when some owner is not an ndarray (Optimizer._check_aliases).
        self._written: list[tuple[int, int, str]] = []
        self._written_lo: list[int] = []
        self._written_hmax: list[int] = []
        self._written_owners: set[int] | None = set()
        #: (absmax, name) of every quantized state, checked before a step of several calls
        self._absmaxes: list[tuple[np.ndarray, str]] = []

        if isinstance(params, (np.ndarray, Mapping)):
            raise TypeError(
                "params must be a list of numpy arrays or a list of param-group dicts, got "
                f"{type(params).__name__} (wrap a single array in a list)"
            )
        groups: list[Any] = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(g, Mapping) for g in groups):
            for group in groups:
                self.add_param_group(group)
        elif any(isinstance(g, Mapping) for g in groups):
            raise TypeError("params must be all arrays or all param-group dicts, not a mix")
        else:
            self.add_param_group({"params": groups})

    # -- subclass hooks -------------------------------------------------------------------------

    def _check_cross(self, group: Mapping[str, Any], where: str) -> None:
        """Checks that involve several hyperparameters (e.g. nesterov)."""

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _initial_value(self, group: Mapping[str, Any], name: str) -> float:
        return 0.0

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        raise NotImplementedError

    def _prepare(self, hps: list[dict[str, Any]]) -> None:
        """What a step computes for every group (``hps``: their checked hyperparameters)
        before its first call writes (Note [All or nothing])."""

    # -- groups ---------------------------------------------------------------------------------

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        for name, check in self._hyper.items():
            if name not in group:
                raise ValueError(f"{where or 'defaults'} has no hyperparameter {name!r}")
            check(_key(where, name), group[name])
        self._check_cross(group, where)

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group (a dict with ``"params"`` and optional hyperparameters), allocating its
        states. Missing hyperparameters take the constructor's values."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params' entry")
        g = len(self.param_groups)
        where = f"param_groups[{g}]"
        params = param_group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(f"{where}['params'] must be an ordered collection, not a set")
        else:
            params = list(params)
        names = [f"{where}['params'][{j}]" for j in range(len(params))]
        for name, p in zip(names, params):
            _check_param(name, p)
        _check_no_overlap(self._params + params, self._param_names + names)
        for name, p in zip(names, params):
            self._refuse_written(p, name, "a parameter")

        group = {"params": params}
        group.update((k, v) for k, v in param_group.items() if k != "params")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self._check_group(group, where)

        state_names = self._state_names(group)
        first = len(self._params)
        indices = list(range(first, first + len(params)))
        by_dtype: dict[tuple[np.dtype, str], list[int]] = {}
        for name, p in zip(names, params):
            self._check_state_format(name, p)
        for i, p in zip(indices, params):
            self.state[i] = {
                name: self._new_state(p, name, self._initial_value(group, name))
                for name in state_names
            }
            kind = _state_kind(self.state[i][state_names[0]]) if state_names else ""
            by_dtype.setdefault((p.dtype, kind), []).append(i)
        buckets = [
            _Bucket(idx, [params[i - first] for i in idx],
                    {name: [self.state[i][name] for i in idx] for name in state_names})
            for idx in by_dtype.values()
        ]

        states = [(arr, f"state[{i}][{name!r}]") for i in indices
                  for name, st in self.state[i].items() for arr in _state_arrays(st)]
        written = [(*_span(p), name) for p, name in zip(params, names)]
        written += [(*_span(arr), name) for arr, name in states]
        # the arrays owning the written memory: a state may be a view of a larger buffer (Note
        # [state placement]), whose owner, not the view, is what a gradient's owner is matched to
        owners = [_owner(a) for a in params] + [_owner(arr) for arr, _ in states]

        self._written = sorted(self._written + [w for w in written if w[0] != w[1]])
        self._written_lo = [lo for lo, _, _ in self._written]
        hmax = 0
        self._written_hmax = [hmax := max(hmax, hi) for _, hi, _ in self._written]
        if self._written_owners is not None:
            if any(owner is None for owner in owners):
                self._written_owners = None
            else:
                self._written_owners.update(map(id, owners))
        named: list[tuple[Any, str]] = [(st, f"state[{i}][{name!r}]") for i in indices
                                        for name, st in self.state[i].items()]
        self._absmaxes += [(st.absmax, name) for st, name in named
                           if isinstance(st, QuantizedState)]
        self._params += params
        self._meta += [(np.ndarray, p.dtype, p.shape, p.strides) for p in params]
        self._num_calls += len(buckets)
        self._param_names += names
        self._group_indices.append(indices)
        self._allocated.append(state_names)
        self._buckets.append(buckets)
        self._steps.append(0)
        self.param_groups.append(group)

    # -- state storage (Note [State dtypes]) ------------------------------------------------------

    def _check_state_format(self, where: str, p: np.ndarray) -> None:
        sd = self._state_dtype
        if (sd in ("int8", "int4") and p.size >= MIN_QUANTIZED_SIZE
                and p.dtype != np.float32 and p.dtype.name != "bfloat16"):
            raise TypeError(f"{where} has dtype {p.dtype}; state_dtype={sd!r} needs float32 "
                            f"or bfloat16 params (quantized states with float16 or float64 "
                            f"params are not implemented)")
        low = p.dtype in (np.float32, np.float16) or p.dtype.name == "bfloat16"
        if sd == "float32" and not low:
            raise TypeError(f"{where} has dtype {p.dtype}; state_dtype='float32' needs float32, "
                            f"bfloat16 or float16 params")
        if sd == "bfloat16" and p.dtype != np.float32 and p.dtype.name != "bfloat16":
            raise TypeError(f"{where} has dtype {p.dtype}; state_dtype='bfloat16' needs float32 "
                            f"or bfloat16 params")

    def _new_state(self, p: np.ndarray, name: str, init: float) -> Any:
        # Note [state placement] (_placement.py): large states start off the param's page offset
        sd = self._state_dtype
        if sd is None:
            return _placement.full_like(p, name, init)
        if sd in ("int8", "int4"):
            if p.size < MIN_QUANTIZED_SIZE:
                return np.full(p.shape, init, dtype=np.float32)
            return QuantizedState.from_float(np.full(p.shape, init, np.float32),
                                             8 if sd == "int8" else 4,
                                             name in _non_negative_names())
        if sd == "bfloat16":
            import ml_dtypes
            return _placement.full_like(p, name, np.float32(init), ml_dtypes.bfloat16)
        return _placement.full_like(p, name, init, np.float32)

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer states (codes and absmax of quantized states)."""
        return sum(arr.nbytes for entry in self.state.values() for st in entry.values()
                   for arr in _state_arrays(st))

    # -- step -----------------------------------------------------------------------------------

    def step(self, grads: Sequence[np.ndarray] | np.ndarray) -> None:
        """One update of every parameter, in place.

        ``grads`` is a list (or tuple) with one gradient per parameter, in the order of
        ``param_groups`` and of each group's ``"params"``; a single array is accepted when
        there is exactly one parameter. Gradients are read only.
        """
        n = len(self._params)
        if isinstance(grads, np.ndarray):
            if n != 1:
                raise TypeError(
                    f"step() got a single array but the optimizer has {n} parameters; "
                    f"pass a list of {n} gradients"
                )
            grads = [grads]
        elif not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of numpy arrays, got {type(grads).__name__}")
        if len(grads) != n:
            raise ValueError(
                f"step() expects {n} gradients (one per parameter, in param_groups order), "
                f"got {len(grads)}"
            )

        hps = []
        for g, group in enumerate(self.param_groups):
            where = f"param_groups[{g}]"
            key = _hyper_key(group, self._hyper)
            if key is None or self._checked.get(g) != key:  # Note [Hyperparameters checked once]
                self._check_group(group, where)
                missing = [s for s in self._state_names(group) if s not in self._allocated[g]]
                if missing:
                    raise ValueError(
                        f"{where} now needs the states {missing}, which were not allocated at "
                        "construction; create the optimizer with these options instead"
                    )
                if key is not None:
                    self._checked[g] = key
            hp = {name: group[name] for name in self._hyper}
            lr = hp["lr"]
            if callable(lr):
                t = self._steps[g]
                lr = lr(t)
                _check_nonneg(f"{where}['lr']({t})", lr)
            hp["lr"] = float(lr)
            hps.append(hp)

        if self._num_calls > 1:
            # Note [All or nothing]: every call's checks before the first call writes.
            try:
                same = list(map(_grad_meta, grads)) == self._meta
            except AttributeError:
                same = False
            if not same:
                self._check_grads(grads)
            self._check_aliases(grads)
            self._check_absmaxes()
        elif set(map(type, grads)) != {np.ndarray}:
            self._check_grads(grads)  # a subclass: refuse masked arrays, name the rest
        self._prepare(hps)

        for g, hp in enumerate(hps):
            step = self._steps[g] + 1
            for bucket in self._buckets[g]:
                self._update(hp, step, bucket.params, bucket.grads(grads), bucket.states)
            self._steps[g] = step

    def _check_grads(self, grads: Sequence[np.ndarray]) -> None:
        for i, (p, grad) in enumerate(zip(self._params, grads)):
            if not isinstance(grad, np.ndarray):
                raise TypeError(f"grads[{i}] must be a numpy.ndarray, got {type(grad).__name__}")
            if isinstance(grad, np.ma.MaskedArray):
                raise TypeError(f"grads[{i}] is a numpy.ma.MaskedArray; fastoptim reads every "
                                f"element and cannot honour a mask (pass .filled(0) or .data)")
            if grad.dtype != p.dtype:
                raise TypeError(
                    f"grads[{i}] has dtype {grad.dtype} but its parameter has dtype {p.dtype}"
                )
            if grad.shape != p.shape:
                raise ValueError(
                    f"grads[{i}] has shape {grad.shape} but its parameter has shape {p.shape}"
                )
            if not grad.flags.c_contiguous:
                raise ValueError(f"grads[{i}] is not C-contiguous")

    def _check_absmaxes(self) -> None:
        """The kernels' check of a quantized state (every absmax finite and >= 0), for all
        calls of a step before the first: a NaN or Inf that reached a block of a state in an
        earlier step (its absmax is then NaN) would otherwise fail a later call after earlier
        ones wrote."""
        if not self._absmaxes:
            return
        # one concatenation and two reductions: per array, NumPy's call overhead made the
        # check 6-8% of a 72-tensor int8 step (2^16 elements each); this is about 0.5%
        every = np.concatenate([absmax for absmax, _ in self._absmaxes])
        if not every.size or (every.min() >= 0 and every.max() < np.inf):
            return
        for absmax, name in self._absmaxes:
            if absmax.size and not (absmax.min() >= 0 and absmax.max() < np.inf):
                b = int(np.flatnonzero(~((absmax >= 0) & (absmax < np.inf)))[0])
                raise ValueError(
                    f"{name}.absmax[{b}] is {absmax[b]}; every absmax must be finite and >= 0 "
                    "(a NaN absmax means a NaN or Inf reached that block of the state)"
                )

    def _check_aliases(self, grads: Sequence[np.ndarray]) -> None:
        """No gradient may share memory with a parameter or state that the step writes.

        The kernels check this within each call only; a gradient that is another group's
        parameter would otherwise be read after that group's call updated it. Addresses cost
        about a microsecond per array, so they are looked up only for a gradient that shares
        an owning ndarray with what the step writes, or whose memory's owner is unknown."""
        owners = self._written_owners
        if (owners is not None and all(map(operator.is_, map(_base, grads), repeat(None)))
                and all(map(_owns_data, grads)) and owners.isdisjoint(map(id, grads))):
            return  # the common case: every gradient owns its memory
        for i, grad in enumerate(grads):
            if owners is not None:
                owner = _owner(grad)
                if owner is not None and id(owner) not in owners:
                    continue
            self._refuse_written(grad, f"grads[{i}]", "a gradient")

    def _refuse_written(self, a: np.ndarray, where: str, what: str) -> None:
        """A ValueError naming ``where`` when ``a`` shares memory with a parameter or state
        that a step writes."""
        if not a.nbytes:
            return
        lo, hi = _span(a)
        k = bisect_left(self._written_lo, hi) - 1
        if k >= 0 and self._written_hmax[k] > lo:
            name = next(name for wlo, whi, name in self._written if wlo < hi and lo < whi)
            raise ValueError(
                f"{where} shares memory with {name}, which step() updates; {what} must not "
                "alias a parameter or an optimizer state (pass a copy)"
            )

    # -- state dict -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A deep copy in torch's layout::

            {"state": {index: {"step": int, <state name>: array, ...}},
             "param_groups": [{<hyperparameters>, "params": [index, ...]}]}

        Indices run over all groups in order. A callable lr is stored as is.
        """
        state: dict[int, dict[str, Any]] = {}
        groups = []
        for g, group in enumerate(self.param_groups):
            packed = {k: (v if callable(v) else copy.deepcopy(v))
                      for k, v in group.items() if k != "params"}
            packed["params"] = list(self._group_indices[g])
            groups.append(packed)
            for i in self._group_indices[g]:
                entry: dict[str, Any] = {"step": self._steps[g]}
                entry.update((name, arr.copy()) for name, arr in self.state[i].items())
                state[i] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load hyperparameters, steps and states saved by ``state_dict``.

        Parameters are matched by position (group by group). Values are copied INTO the
        existing state arrays. Everything is checked first (group and parameter counts, state
        names, shapes, dtypes, steps, hyperparameters); on error nothing is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry")
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("state_dict['state'] must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}"
            )

        new_groups: list[dict[str, Any]] = []
        new_steps: list[int] = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        seen: set[Any] = set()
        for g, saved in enumerate(saved_groups):
            where = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"{where} must be a dict with a 'params' entry")
            saved_indices = list(saved["params"])
            mine = self._group_indices[g]
            if len(saved_indices) != len(mine):
                raise ValueError(
                    f"{where} has {len(saved_indices)} parameters, param_groups[{g}] has "
                    f"{len(mine)}"
                )
            # Copied now, and the copies checked: a value that cannot be copied (or whose copy
            # is invalid) must fail before any state array or group is written.
            hyper = {k: (v if callable(v) else copy.deepcopy(v))
                     for k, v in saved.items() if k != "params"}
            self._check_group(hyper, where)
            allocated = self._allocated[g]
            missing = [s for s in self._state_names(hyper) if s not in allocated]
            if missing:
                raise ValueError(
                    f"{where} needs the states {missing}, which param_groups[{g}] did not "
                    "allocate at construction; create the optimizer with the same options"
                )

            steps = set()
            for si, i in zip(saved_indices, mine):
                ew = f"state_dict['state'][{si!r}]"
                if si in seen:
                    raise ValueError(f"parameter index {si!r} appears twice in state_dict")
                seen.add(si)
                entry = saved_state.get(si)
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{ew} is missing")
                step = entry.get("step")
                if not isinstance(step, numbers.Integral) or isinstance(step, (bool, np.bool_)):
                    raise TypeError(f"{ew}['step'] must be an integer, got {step!r}")
                if not 0 <= int(step) < _MAX_STEP:
                    raise ValueError(f"{ew}['step'] must be >= 0 and < 2**53 (the kernels "
                                     f"count steps exactly in float64), got {step}")
                steps.add(int(step))
                names = set(entry) - {"step"}
                if names != set(allocated):
                    raise ValueError(
                        f"{ew} has states {sorted(names)}, the optimizer has {sorted(allocated)}"
                    )
                for name in allocated:
                    src, dst = entry[name], self.state[i][name]
                    if isinstance(src, QuantizedState) or isinstance(dst, QuantizedState):
                        copies.append((dst, _converted(f"{ew}[{name!r}]", src, dst)))
                        continue
                    if not isinstance(src, np.ndarray):
                        raise TypeError(
                            f"{ew}[{name!r}] must be a numpy.ndarray, got {type(src).__name__}"
                        )
                    if src.dtype != dst.dtype:
                        raise TypeError(
                            f"{ew}[{name!r}] has dtype {src.dtype}, the optimizer's has "
                            f"{dst.dtype}"
                        )
                    if src.shape != dst.shape:
                        raise ValueError(
                            f"{ew}[{name!r}] has shape {src.shape}, the optimizer's has "
                            f"{dst.shape}"
                        )
                    copies.append((dst, src))
            if len(steps) > 1:
                raise ValueError(
                    f"{where}: its parameters have different steps {sorted(steps)}; the "
                    "optimizer keeps one step count per group"
                )
            new_steps.append(steps.pop() if steps else self._steps[g])
            new_groups.append(hyper)

        # Nothing has been written so far; from here on nothing can fail.
        for dst, src in copies:
            if isinstance(dst, QuantizedState):
                np.copyto(dst.codes, src.codes)
                np.copyto(dst.absmax, src.absmax)
            else:
                np.copyto(dst, src)
        for group, hyper in zip(self.param_groups, new_groups):
            params = group["params"]
            group.clear()
            group["params"] = params
            group.update(hyper)
        self._steps = new_steps

    def __repr__(self) -> str:
        text = type(self).__name__ + " ("
        for g, group in enumerate(self.param_groups):
            text += f"\nParameter Group {g}\n"
            for key in sorted(group):
                if key != "params":
                    text += f"    {key}: {group[key]}\n"
        return text + ")"


def _converted(where: str, src: Any, dst: Any) -> Any:
    """``src`` (a saved state: a QuantizedState or a float array) in ``dst``'s storage, checked
    (Note [State dtypes]); raises before anything is written."""
    if isinstance(src, QuantizedState):
        if src.shape != dst.shape:
            raise ValueError(f"{where} has shape {src.shape}, the optimizer's has {dst.shape}")
        if isinstance(dst, QuantizedState):
            if (src.bits, src.non_negative) != (dst.bits, dst.non_negative):
                raise ValueError(f"{where} is {src!r}, the optimizer's is {dst!r}")
            src = src.copy()  # checks codes and absmax again
            if not np.isfinite(src.absmax).all() or (src.absmax < 0).any():
                raise ValueError(f"{where}.absmax must be finite and >= 0")
            return src
        return src.to_float().astype(dst.dtype)
    if not isinstance(src, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray or a QuantizedState, got "
                        f"{type(src).__name__}")
    if src.shape != dst.shape:
        raise ValueError(f"{where} has shape {src.shape}, the optimizer's has {dst.shape}")
    if not _supported_dtype(src.dtype):
        raise TypeError(f"{where} has dtype {src.dtype}; must be a float dtype")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: refused just below
        x = src.astype(np.float32)
    if not np.isfinite(x).all():
        # the NaN absmax it would quantize to is refused by every later step
        raise ValueError(f"{where} has a NaN or Inf (as float32); a quantized state holds "
                         "finite values only")
    return QuantizedState.from_float(x, dst.bits, dst.non_negative)


class SGD(Optimizer):
    """Stochastic gradient descent (torch.optim.SGD), optionally with (Nesterov) momentum.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    State: ``momentum_buffer`` when ``momentum != 0``.
    """

    _hyper = {"lr": _check_lr, "momentum": _check_unit, "dampening": _check_unit,
              "weight_decay": _check_nonneg, "nesterov": _check_flag, "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-3,
                 momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, *, maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _check_cross(self, group: Mapping[str, Any], where: str) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{_key(where, 'nesterov')}=True requires momentum > 0 and dampening == 0"
            )

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        use_momentum = hp["momentum"] != 0
        F.sgd_(params, grads, states["momentum_buffer"] if use_momentum else None,
               step=step if use_momentum else None, lr=hp["lr"],
               momentum=float(hp["momentum"]), dampening=float(hp["dampening"]),
               nesterov=bool(hp["nesterov"]), weight_decay=float(hp["weight_decay"]),
               maximize=bool(hp["maximize"]))


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop).

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``square_avg``; ``momentum_buffer`` when ``momentum > 0``; ``grad_avg`` when
    ``centered``.
    """

    _hyper = {"lr": _check_lr, "alpha": _check_unit, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "momentum": _check_unit, "centered": _check_flag,
              "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-2,
                 alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
                 momentum: float = 0, centered: bool = False, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps,
                                  "weight_decay": weight_decay, "momentum": momentum,
                                  "centered": centered, "maximize": maximize},
                                  state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        momentum, centered = hp["momentum"], bool(hp["centered"])
        F.rmsprop_(params, grads, states["square_avg"],
                   states["grad_avg"] if centered else None,
                   states["momentum_buffer"] if momentum > 0 else None,
                   lr=hp["lr"], alpha=float(hp["alpha"]), eps=float(hp["eps"]),
                   weight_decay=float(hp["weight_decay"]), momentum=float(momentum),
                   centered=centered, maximize=bool(hp["maximize"]))


class Adam(Optimizer):
    """Adam (torch.optim.Adam): L2 weight decay added to the gradient, or with
    ``decoupled_weight_decay=True`` decoupled as in AdamW (``p *= 1 - lr*wd`` first).

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``exp_avg``, ``exp_avg_sq``; ``max_exp_avg_sq`` when ``amsgrad``.
    """

    _hyper = {"lr": _check_lr, "betas": _check_betas, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "amsgrad": _check_flag, "maximize": _check_flag,
              "decoupled_weight_decay": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "amsgrad": amsgrad,
                                  "maximize": maximize,
                                  "decoupled_weight_decay": decoupled_weight_decay},
                                  state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        amsgrad = bool(hp["amsgrad"])
        beta1, beta2 = hp["betas"]
        update = F.adamw_ if hp["decoupled_weight_decay"] else F.adam_
        update(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step, lr=hp["lr"],
               beta1=float(beta1), beta2=float(beta2), eps=float(hp["eps"]),
               weight_decay=float(hp["weight_decay"]), amsgrad=amsgrad,
               max_exp_avg_sqs=states["max_exp_avg_sq"] if amsgrad else None,
               maximize=bool(hp["maximize"]))


class AdamW(Adam):
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay, ``p *= 1 - lr*wd`` first.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``exp_avg``, ``exp_avg_sq``; ``max_exp_avg_sq`` when ``amsgrad``.
    """

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, state_dtype=state_dtype)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad): ``clr = lr / (1 + (step-1)*lr_decay)``.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    State: ``sum``, filled with ``initial_accumulator_value`` at construction.
    """

    _hyper = {"lr": _check_lr, "lr_decay": _check_nonneg, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "initial_accumulator_value": _check_nonneg,
              "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-2,
                 lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _initial_value(self, group: Mapping[str, Any], name: str) -> float:
        return float(group["initial_accumulator_value"])

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        F.adagrad_(params, grads, states["sum"], step=step, lr=hp["lr"],
                   lr_decay=float(hp["lr_decay"]), weight_decay=float(hp["weight_decay"]),
                   eps=float(hp["eps"]), maximize=bool(hp["maximize"]))


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta).

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``square_avg``, ``acc_delta``.
    """

    _hyper = {"lr": _check_lr, "rho": _check_unit, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1.0,
                 rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps,
                                  "weight_decay": weight_decay, "maximize": maximize},
                                  state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        F.adadelta_(params, grads, states["square_avg"], states["acc_delta"], lr=hp["lr"],
                    rho=float(hp["rho"]), eps=float(hp["eps"]),
                    weight_decay=float(hp["weight_decay"]), maximize=bool(hp["maximize"]))


# ---------------------------------------------------------------------------------------------
# NAdam, RAdam, Adamax, ASGD, Rprop.

def _check_not_nan(where: str, value: Any) -> None:
    _check_real(where, value)
    if math.isnan(value):
        raise ValueError(f"invalid {where}: {value!r} (must not be NaN)")


def _check_etas(where: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where} must be a pair (etaminus, etaplus), got {value!r}")
    _check_real(f"{where}[0]", value[0])
    _check_real(f"{where}[1]", value[1])
    if not 0 < value[0] < 1 < value[1] or not math.isfinite(value[1]):
        raise ValueError(f"invalid {where}: {value!r} (must satisfy 0 < etaminus < 1 < etaplus, "
                         "etaplus finite)")


def _check_step_sizes(where: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where} must be a pair (step_size_min, step_size_max), got {value!r}")
    _check_nonneg(f"{where}[0]", value[0])
    _check_nonneg(f"{where}[1]", value[1])


def _check_fixed_lr(where: str, value: Any) -> None:
    if callable(value):
        raise TypeError(f"{where} must be a number, not a schedule: Rprop's lr only sets the "
                        "initial step sizes, so a callable lr would have no effect")
    _check_nonneg(where, value)


# Note [Scalar states]
#     torch keeps NAdam's ``mu_product`` and ASGD's ``eta`` and ``mu`` as 0-d tensors per
#     parameter, in its scalar dtype (float32 unless its default dtype is float64). All
#     parameters of a group step together, so, like the step count, one value per group is kept
#     here, as a Python float (float64): ``state_dict`` writes it into every parameter's entry
#     and ``load_state_dict`` requires the entries of a group to agree. The values follow
#     torch's arithmetic (``mu_product *= mu`` before the update; ``eta`` and ``mu`` from
#     ``asgd_next`` after it), so they equal torch's exactly when torch's default dtype is
#     float64; with float32 they differ from torch's by its float32 rounding.

class _ScalarStates(Optimizer):
    """Base of the optimizers with per-step scalar states (NAdam's ``mu_product``, ASGD's
    ``eta`` and ``mu``); see Note [Scalar states].

    Subclasses define ``_scalar_checks`` (name -> check, in torch's order),
    ``_initial_scalars(group)`` and ``_scalar_step(hp, step, scalars)``, which returns the
    keyword arguments of this step's kernel call and the scalars after the step.
    """

    _scalar_checks: Mapping[str, Callable[[str, Any], None]] = {}

    def __init__(self, params: Params, defaults: Mapping[str, Any],
                 state_dtype: str | None = None) -> None:
        #: per group: {name: float}, the values after the group's last step.
        self._scalars: list[dict[str, float]] = []
        #: id(bucket.states) -> group index: how ``_update`` finds its group's scalars.
        self._bucket_group: dict[int, int] = {}
        #: per group, during ``step``: (kernel keyword arguments, scalars after the step).
        self._pending: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
        super().__init__(params, defaults, state_dtype)

    def _initial_scalars(self, group: Mapping[str, Any], where: str) -> dict[str, float]:
        raise NotImplementedError

    def _scalar_step(self, hp: dict[str, Any], step: int, scalars: Mapping[str, float]
                     ) -> tuple[dict[str, float], dict[str, float]]:
        raise NotImplementedError

    def _prepare(self, hps: list[dict[str, Any]]) -> None:
        # every group's scalars before the first call: one that overflows raises first
        for g, hp in enumerate(hps):
            try:
                self._pending[g] = self._scalar_step(hp, self._steps[g] + 1, self._scalars[g])
            except OverflowError:
                raise ValueError(
                    f"param_groups[{g}]: the per-step scalars {sorted(self._scalars[g])} "
                    f"overflow at step {self._steps[g] + 1} with these hyperparameters"
                ) from None

    def _scalar_args(self, hp: dict[str, Any], step: int,
                     states: dict[str, list[np.ndarray]]) -> dict[str, float]:
        """This step's scalar kernel arguments for the group that owns ``states`` (computed
        once per group and step by ``_prepare``, whatever the number of dtype buckets)."""
        return self._pending[self._bucket_group[id(states)]][0]

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        scalars: dict[str, float] = {}
        if isinstance(param_group, Mapping) and "params" in param_group:
            # Computed first, so that a failure leaves no half-added group.
            scalars = self._initial_scalars({**self.defaults, **param_group},
                                            f"param_groups[{len(self.param_groups)}]")
        super().add_param_group(param_group)
        self._scalars.append(scalars)
        for bucket in self._buckets[-1]:
            self._bucket_group[id(bucket.states)] = len(self._buckets) - 1

    def step(self, grads: Sequence[np.ndarray] | np.ndarray) -> None:
        steps = list(self._steps)
        self._pending = {}
        try:
            super().step(grads)
        finally:
            # A group's scalars advance exactly when its step count did.
            for g, (_, after) in self._pending.items():
                if self._steps[g] != steps[g]:
                    self._scalars[g] = after
            self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` with the group's scalar states (Python floats) in every
        parameter's entry, after ``step`` as in torch."""
        sd = super().state_dict()
        for g, indices in enumerate(self._group_indices):
            for i in indices:
                entry = sd["state"][i]
                sd["state"][i] = {"step": entry.pop("step"), **self._scalars[g], **entry}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """``Optimizer.load_state_dict``; the scalar states of a group's entries must agree
        (one value per group, like the step count) and are checked before anything is
        loaded. A 0-d array or tensor is taken by its value."""
        names = tuple(self._scalar_checks)
        saved_state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if (not isinstance(saved_state, Mapping) or not isinstance(saved_groups, Sequence)
                or len(saved_groups) != len(self.param_groups)):
            super().load_state_dict(state_dict)  # raises, naming the problem
            return
        new_scalars = []
        for g, saved in enumerate(saved_groups):
            found: dict[str, set[float]] = {name: set() for name in names}
            indices = saved.get("params", ()) if isinstance(saved, Mapping) else ()
            for si in indices:
                entry = saved_state.get(si)
                if not isinstance(entry, Mapping):
                    continue  # Optimizer.load_state_dict reports it
                for name, check in self._scalar_checks.items():
                    where = f"state_dict['state'][{si!r}][{name!r}]"
                    if name not in entry:
                        raise ValueError(f"{where} is missing")
                    value = _scalar_value(where, entry[name])
                    check(where, value)
                    found[name].add(value)
            for name, values in found.items():
                if len(values) > 1:
                    raise ValueError(
                        f"state_dict['param_groups'][{g}]: its parameters have different "
                        f"{name!r} values {sorted(values)}; the optimizer keeps one per group"
                    )
            new_scalars.append({name: found[name].pop() if found[name] else self._scalars[g][name]
                                for name in names})
        stripped = dict(state_dict)
        stripped["state"] = {
            si: ({k: v for k, v in entry.items() if k not in names}
                 if isinstance(entry, Mapping) else entry)
            for si, entry in saved_state.items()
        }
        super().load_state_dict(stripped)
        self._scalars = new_scalars


def _scalar_value(where: str, value: Any) -> float:
    """A scalar state as a float: a real number or anything 0-d with ``item()`` (an array or
    a tensor)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    _check_real(where, value)
    return float(value)


def _check_unit_open_value(where: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"invalid {where}: {value!r} (must be in [0, 1))")


def _check_unit_value(where: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"invalid {where}: {value!r} (must be in [0, 1])")


class NAdam(_ScalarStates):
    """NAdam (torch.optim.NAdam), with L2 or decoupled (``decoupled_weight_decay``) weight decay.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``exp_avg``, ``exp_avg_sq``; the scalar state ``mu_product`` (float64, one per
    group; Note [Scalar states]).
    """

    _hyper = {"lr": _check_lr, "betas": _check_betas, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "momentum_decay": _check_nonneg,
              "decoupled_weight_decay": _check_flag, "maximize": _check_flag}
    _scalar_checks = {"mu_product": _check_unit_open_value}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "momentum_decay": momentum_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _initial_scalars(self, group: Mapping[str, Any], where: str) -> dict[str, float]:
        return {"mu_product": 1.0}

    def _scalar_step(self, hp: dict[str, Any], step: int, scalars: Mapping[str, float]
                     ) -> tuple[dict[str, float], dict[str, float]]:
        # torch multiplies mu_product by this step's mu BEFORE the update and passes the product.
        mu_product = scalars["mu_product"] * F.nadam_mu(
            float(step), float(hp["betas"][0]), float(hp["momentum_decay"]))
        return {"mu_product": mu_product}, {"mu_product": mu_product}

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        beta1, beta2 = hp["betas"]
        F.nadam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step,
                 mu_product=self._scalar_args(hp, step, states)["mu_product"], lr=hp["lr"],
                 beta1=float(beta1),
                 beta2=float(beta2), eps=float(hp["eps"]),
                 weight_decay=float(hp["weight_decay"]),
                 momentum_decay=float(hp["momentum_decay"]),
                 decoupled_weight_decay=bool(hp["decoupled_weight_decay"]),
                 maximize=bool(hp["maximize"]))


class RAdam(Optimizer):
    """RAdam (torch.optim.RAdam), with L2 or decoupled (``decoupled_weight_decay``) weight decay.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``exp_avg``, ``exp_avg_sq``.
    """

    _hyper = {"lr": _check_lr, "betas": _check_betas, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "decoupled_weight_decay": _check_flag,
              "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        beta1, beta2 = hp["betas"]
        F.radam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step, lr=hp["lr"],
                 beta1=float(beta1), beta2=float(beta2), eps=float(hp["eps"]),
                 weight_decay=float(hp["weight_decay"]),
                 decoupled_weight_decay=bool(hp["decoupled_weight_decay"]),
                 maximize=bool(hp["maximize"]))


class Adamax(Optimizer):
    """Adamax (torch.optim.Adamax): Adam with the infinity norm.

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    States: ``exp_avg``, ``exp_inf``.
    """

    _hyper = {"lr": _check_lr, "betas": _check_betas, "eps": _check_nonneg,
              "weight_decay": _check_nonneg, "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, *, maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "maximize": maximize},
                                  state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        beta1, beta2 = hp["betas"]
        F.adamax_(params, grads, states["exp_avg"], states["exp_inf"], step=step, lr=hp["lr"],
                  beta1=float(beta1), beta2=float(beta2), eps=float(hp["eps"]),
                  weight_decay=float(hp["weight_decay"]), maximize=bool(hp["maximize"]))


class ASGD(_ScalarStates):
    """Averaged SGD (torch.optim.ASGD).

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]); it enters
    through ``eta``, torch's decayed step size. State: ``ax`` (the average); the scalar states
    ``eta`` (starts at the group's lr at construction, ``lr(0)`` for a callable) and ``mu``
    (starts at 1), float64, one per group (Note [Scalar states]).
    """

    _hyper = {"lr": _check_lr, "lambd": _check_nonneg, "alpha": _check_nonneg,
              "t0": _check_not_nan, "weight_decay": _check_nonneg, "maximize": _check_flag}
    _scalar_checks = {"eta": _check_nonneg, "mu": _check_unit_value}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-2,
                 lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
                 weight_decay: float = 0, *, maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0,
                                  "weight_decay": weight_decay, "maximize": maximize},
                                  state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("ax",)

    def _initial_scalars(self, group: Mapping[str, Any], where: str) -> dict[str, float]:
        lr = group["lr"]
        if callable(lr):
            lr = lr(0)
            _check_nonneg(f"{where}['lr'](0)", lr)
        else:
            _check_lr(_key(where, "lr"), lr)
        return {"eta": float(lr), "mu": 1.0}

    def _scalar_step(self, hp: dict[str, Any], step: int, scalars: Mapping[str, float]
                     ) -> tuple[dict[str, float], dict[str, float]]:
        # The update uses the current eta and mu; torch advances them after it.
        eta, mu = F.asgd_next(float(step), hp["lr"], float(hp["lambd"]), float(hp["alpha"]),
                              float(hp["t0"]))
        return dict(scalars), {"eta": float(eta), "mu": float(mu)}

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        scalars = self._scalar_args(hp, step, states)
        F.asgd_(params, grads, states["ax"], eta=scalars["eta"], mu=scalars["mu"],
                lambd=float(hp["lambd"]), weight_decay=float(hp["weight_decay"]),
                maximize=bool(hp["maximize"]))


class Rprop(Optimizer):
    """Rprop (torch.optim.Rprop): ``etas=(etaminus, etaplus)``, ``step_sizes=(min, max)``.

    ``lr`` must be a number: it only sets the initial step sizes (a callable is a TypeError).
    States: ``prev`` (zeros) and ``step_size``, filled with the group's lr when the states are
    allocated (at construction or ``add_param_group``; torch does it at the first step).
    """

    _hyper = {"lr": _check_fixed_lr, "etas": _check_etas, "step_sizes": _check_step_sizes,
              "maximize": _check_flag}

    def __init__(self, params: Params, lr: float = 1e-2,
                 etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "etas": etas, "step_sizes": step_sizes,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("prev", "step_size")

    def _initial_value(self, group: Mapping[str, Any], name: str) -> float:
        return float(group["lr"]) if name == "step_size" else 0.0

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        etaminus, etaplus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        F.rprop_(params, grads, states["prev"], states["step_size"], etaminus=float(etaminus),
                 etaplus=float(etaplus), step_size_min=float(step_size_min),
                 step_size_max=float(step_size_max), maximize=bool(hp["maximize"]))


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; see
    :func:`fastoptim.lion_`): the sign of an interpolated momentum, decoupled weight decay.
    torch.optim has no Lion; the arguments are the paper's (and lion-pytorch's).

    ``lr`` is a float or a callable ``lr(t)`` (see Note [Learning-rate schedules]).
    State: ``exp_avg``.
    """

    _hyper = {"lr": _check_lr, "betas": _check_betas, "weight_decay": _check_nonneg,
              "maximize": _check_flag}

    def __init__(self, params: Params, lr: float | Callable[[int], float] = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0, *,
                 maximize: bool = False,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                  "maximize": maximize}, state_dtype=state_dtype)

    def _state_names(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def _update(self, hp: dict[str, Any], step: int, params: list[np.ndarray],
                grads: Sequence[np.ndarray], states: dict[str, list[np.ndarray]]) -> None:
        beta1, beta2 = hp["betas"]
        F.lion_(params, grads, states["exp_avg"], lr=hp["lr"], beta1=float(beta1),
                beta2=float(beta2), weight_decay=float(hp["weight_decay"]),
                maximize=bool(hp["maximize"]))
