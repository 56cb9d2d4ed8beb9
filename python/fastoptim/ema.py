"""Exponentially weighted moving averages, with bias correction.

Both classes here average ``x_1, x_2, ...`` as

    avg_0 = 0,    avg_t = beta * avg_{t-1} + (1 - beta) * x_t,

so ``avg_t = (1 - beta) * sum_{i=1..t} beta**(t-i) * x_i``. Starting from zero biases the early
averages towards zero (the weights sum to ``1 - beta**t``, not 1); the bias-corrected average
(Kingma & Ba 2015, section 3; the deeplearning.ai course's "bias correction") divides that out:

    value_t = avg_t / (1 - beta**t).

:class:`EMA` averages a stream of numbers (a loss curve, a metric). :class:`ModelEMA` keeps
shadow copies of parameter arrays ("Polyak averaging" of the weights) and updates them in place
with the fused kernel :func:`fastoptim.ema_`, one call per dtype.
"""
from __future__ import annotations

import bisect
import numbers
from typing import Any, Sequence, Union

import numpy as np

from . import functional as F
from .optim import _check_float_array
from .schedules import _metric

__all__ = ["EMA", "ModelEMA"]


def _check_beta(beta: float) -> float:
    if not isinstance(beta, numbers.Real) or isinstance(beta, (bool, np.bool_)):
        raise TypeError(f"beta must be a real number, got {beta!r}")
    if not 0 <= beta < 1:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return float(beta)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


class EMA:
    """Exponentially weighted average of a stream of numbers.

    ``update(x)`` folds in one value and returns the current average: bias-corrected
    (``avg_t / (1 - beta**t)``) when ``bias_correction`` (the default), else the raw
    ``avg_t``. ``beta`` is in [0, 1); the average covers roughly the last ``1/(1-beta)``
    values.
    """

    def __init__(self, beta: float, bias_correction: bool = True) -> None:
        self.beta = _check_beta(beta)
        self.bias_correction = _check_flag("bias_correction", bias_correction)
        #: the raw (uncorrected) average ``avg_t``; 0.0 before the first update
        self.average = 0.0
        #: number of values folded in
        self.t = 0

    def update(self, x: float) -> float:
        """Fold in ``x``; returns :attr:`value`.

        ``x`` is a real number: a Python or NumPy scalar, or a 0-d array or tensor holding one
        (``TypeError`` otherwise, before anything changes).
        """
        x = _metric("x", x)
        self.average = self.beta * self.average + (1.0 - self.beta) * x
        self.t += 1
        return self.value

    @property
    def value(self) -> float:
        """The current average (bias-corrected when ``bias_correction``)."""
        if self.t == 0:
            raise RuntimeError("EMA has no value before the first update()")
        if self.bias_correction:
            return self.average / (1.0 - self.beta ** self.t)
        return self.average

    def reset(self) -> None:
        """Forget every value (back to ``avg_0 = 0``, ``t = 0``)."""
        self.average = 0.0
        self.t = 0

    def __repr__(self) -> str:
        return (f"EMA(beta={self.beta!r}, bias_correction={self.bias_correction!r}) "
                f"# t={self.t}, average={self.average!r}")


ArrayList = Union[np.ndarray, Sequence[np.ndarray]]


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    """The bytes [lo, hi) between a's first and last element, whatever its strides."""
    lo = hi = a.__array_interface__["data"][0]
    if a.size == 0:
        return lo, lo
    for n, stride in zip(a.shape, a.strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + a.itemsize


def _as_list(name: str, arrays: Any) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        return [arrays]
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{name} must be a numpy array or a list of them, got "
                        f"{type(arrays).__name__}")
    return list(arrays)


class ModelEMA:
    """Shadow averages of parameter arrays, updated in place by the fused :func:`fastoptim.ema_`.

    ``arrays`` (one array or a list; float32/float64, C-contiguous) are the parameters to
    track: the object keeps references to them, not copies, so an optimizer that updates them
    in place is followed automatically. Each ``update()`` folds their current values into
    :attr:`averages` (one zero-initialised shadow array per parameter, same shape and dtype):
    ``avg = beta*avg + (1-beta)*param``. ``corrected()`` returns the averages divided by
    ``1 - beta**t`` (copies of them when ``bias_correction=False``), and ``copy_to`` writes
    them into arrays of your choice, e.g. a second set of weights used for evaluation.

    Note [Correction precision]
        The division by ``1 - beta**t`` is done in float64 and each result rounded once to the
        average's dtype: rounding the divisor to float16 or bfloat16 first would cost up to a
        few units in the last place (with ``beta`` near 1 and small ``t`` it is even
        subnormal in float16).
    """

    def __init__(self, arrays: ArrayList, beta: float, bias_correction: bool = True) -> None:
        self.beta = _check_beta(beta)
        self.bias_correction = _check_flag("bias_correction", bias_correction)
        params = _as_list("arrays", arrays)
        if not params:
            raise ValueError("arrays is empty")
        for i, p in enumerate(params):
            _check_float_array(f"arrays[{i}]", p)
        #: the tracked parameter arrays (references)
        self.params = params
        #: the raw shadow averages ``avg_t`` (updated in place; zeros before the first update)
        self.averages = [np.zeros(p.shape, dtype=p.dtype) for p in params]
        #: number of updates so far
        self.t = 0
        # One fused call per dtype: the kernel takes lists whose arrays share one dtype.
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self._groups = list(by_dtype.values())

    def _check_like(self, name: str, arrays: ArrayList) -> list[np.ndarray]:
        arrays = _as_list(name, arrays)
        if len(arrays) != len(self.averages):
            raise ValueError(f"{name} has {len(arrays)} arrays, the EMA tracks "
                             f"{len(self.averages)}")
        for i, (a, avg) in enumerate(zip(arrays, self.averages)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name}[{i}] must be a numpy.ndarray, got {type(a).__name__}")
            if a.dtype != avg.dtype:
                raise TypeError(f"{name}[{i}] has dtype {a.dtype}, the average has {avg.dtype}")
            if a.shape != avg.shape:
                raise ValueError(f"{name}[{i}] has shape {a.shape}, the average has "
                                 f"{avg.shape}")
        return arrays

    def update(self, values: ArrayList | None = None) -> None:
        """Fold the current parameters (or ``values``, arrays like them) into the averages.

        Everything is checked before the first average is written.
        """
        values = self.params if values is None else self._check_like("values", values)
        for i, v in enumerate(values):
            if not v.flags.c_contiguous:
                raise ValueError(f"values[{i}] is not C-contiguous")
        for group in self._groups:
            F.ema_([self.averages[i] for i in group], [values[i] for i in group],
                   beta=self.beta)
        self.t += 1

    def _denominator(self) -> float:
        if self.t == 0:
            raise RuntimeError("ModelEMA has no average before the first update()")
        return 1.0 - self.beta ** self.t if self.bias_correction else 1.0

    def _divide(self, avg: np.ndarray, out: np.ndarray, denominator: float) -> None:
        # In float64, then rounded once to out's dtype (Note [Correction precision]); NumPy
        # casts in buffered chunks, so no float64 copy of the whole array is made.
        np.divide(avg, np.float64(denominator), out=out, dtype=np.float64)

    def corrected(self) -> list[np.ndarray]:
        """New arrays holding the averages, bias-corrected when ``bias_correction``."""
        denominator = self._denominator()
        corrected: list[np.ndarray] = []
        for avg in self.averages:
            out = np.empty_like(avg)
            self._divide(avg, out, denominator)
            corrected.append(out)
        return corrected

    def copy_to(self, arrays: ArrayList) -> None:
        """Write the (corrected) averages into ``arrays`` (same shapes and dtypes), in place.

        Everything is checked before the first array is written; an array that shares memory
        with :attr:`averages` (the averages themselves, or a view of them) is refused, since
        writing it would overwrite the raw averages.
        """
        targets = self._check_like("arrays", arrays)
        denominator = self._denominator()
        # The averages are C-contiguous and disjoint: sorted by address, the only ones that
        # can meet a target's bytes [lo, hi) are the last one starting at or before lo and the
        # next one.
        spans = sorted((*_byte_bounds(avg), j) for j, avg in enumerate(self.averages)
                       if avg.size)
        starts = [lo for lo, _, _ in spans]
        for i, t in enumerate(targets):
            if not t.flags.writeable:
                raise ValueError(f"arrays[{i}] is not writeable")
            lo, hi = _byte_bounds(t)
            k = bisect.bisect_right(starts, lo) - 1
            for a_lo, a_hi, j in spans[max(k, 0):k + 2]:
                if lo < hi and a_lo < hi and lo < a_hi:
                    raise ValueError(f"arrays[{i}] overlaps averages[{j}] in memory; copy_to "
                                     "would overwrite the raw averages (corrected() returns "
                                     "copies)")
        for avg, t in zip(self.averages, targets):
            self._divide(avg, t, denominator)

    def __repr__(self) -> str:
        return (f"ModelEMA(<{len(self.params)} arrays>, beta={self.beta!r}, "
                f"bias_correction={self.bias_correction!r}) # t={self.t}")
