"""Learning-rate schedules: small callables ``lr(step) -> float``.

Every schedule here is an object whose ``__call__`` takes ``step``, the number of updates
already taken (0 for the first update), and returns the learning rate for that update. This is
exactly how fastoptim's optimizer classes call a callable ``lr`` (see Note [Learning-rate
schedules] in :mod:`fastoptim.optim`), so any schedule can be passed as ``lr=``::

    from fastoptim import optim
    from fastoptim.schedules import CosineDecay, Warmup

    opt = optim.Adam(params, lr=Warmup(CosineDecay(1e-2, 1000), warmup_steps=100))

and it works the same way by hand inside a training loop (``lr = schedule(t)``).

Schedules the literature states per *epoch* (inverse-time decay, ``k/sqrt(epoch)``, step decay,
...) take the same integer: it counts whatever you count. Given to an optimizer directly, that
is updates; to decay once per epoch of ``n`` mini-batches, wrap the schedule in
``PerEpoch(schedule, steps_per_epoch=n)``, or pass the epoch number yourself.

Where torch.optim.lr_scheduler (torch 2.13), Keras 3 or optax has the same schedule, the
docstring names it and the arguments that make the two agree; tests/test_schedules.py checks
the torch ones over 200 steps. torch's schedulers are evaluated at ``last_epoch``, which after
``t`` calls of ``scheduler.step()`` (one per ``optimizer.step()``) is ``t``: the value torch
uses for the update numbered ``t`` here.

Note [Closed forms]
    Each schedule is a closed-form function of ``step`` (torch mostly updates ``lr``
    recursively, one multiplication per step); the two agree to rounding, about ``t`` units in
    the last place after ``t`` steps. Only :class:`ReduceLROnPlateau` has state: it depends on
    the metrics it has observed, not on ``step``.

Arguments are validated when a schedule is built: a wrong value raises ``ValueError`` naming
the argument, a value of the wrong type ``TypeError`` (a non-number where a number is expected,
a non-string for ``mode``, ...). A number that is not an integer where one is expected (``2.5``)
is a wrong value, and so is a number beyond the float range (``10**400``). ``step`` must be an
integer (``TypeError`` otherwise), ``>= 0`` and within the float range (``ValueError``).

Note [Overflow]
    A schedule that grows (``ExponentialDecay`` or ``StepDecay`` with a factor above 1) returns
    ``inf`` once its value leaves the float range, as IEEE arithmetic and torch's recursive
    update do, instead of raising Python's ``OverflowError``; an optimizer then refuses that
    lr with a ``ValueError`` naming the schedule call (``param_groups[0]['lr'](t)``).
"""
from __future__ import annotations

import bisect
import math
import numbers
import reprlib
from typing import Any, Callable, Sequence, Union

import numpy as np

__all__ = [
    "Schedule", "Constant", "InverseTimeDecay", "ExponentialDecay", "InverseSqrtDecay",
    "StepDecay", "MultiStepDecay", "PolynomialDecay", "CosineDecay", "CosineWarmRestarts",
    "Linear", "PiecewiseConstant", "OneCycle", "Warmup", "Join", "PerEpoch",
    "ReduceLROnPlateau",
]

#: What composite schedules accept: a schedule, any callable ``lr(step)``, or a constant.
ScheduleLike = Union["Schedule", Callable[[int], float], float]


# ---------------------------------------------------------------------------------------------
# Argument checks. Each takes the argument's name (for the message) and its value and returns
# the value converted to a plain Python float/int, so that a NumPy scalar argument never turns
# the schedule's arithmetic into float32.

def _show(value: object) -> str:
    """A short repr for messages: long lists and strings abridged, a huge int by its size (its
    repr could run to thousands of digits, or fail past Python's int-to-str limit)."""
    if isinstance(value, numbers.Integral) and abs(int(value)).bit_length() > 64:
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of {abs(int(value)).bit_length()} bits"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return reprlib.repr(value)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond the float range, like 10**400
        raise ValueError(f"{name} is too large for a float, got {_show(value)}") from None


def _real(name: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {_show(value)}")
    value = _float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _nonneg(name: str, value: object) -> float:
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _positive(name: str, value: object) -> float:
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def _int(name: str, value: Any, minimum: int) -> int:
    # A non-number is the wrong type; a number that is not an integer (2.5, 3.0), below
    # ``minimum`` or beyond the float range (the schedules compute in floats) a wrong value.
    if not _is_real(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {_show(value)}")
    if not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_show(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_show(value)}")
    _float(name, value)
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_show(value)}")
    return bool(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    # Only a str is compared: ``in`` on an array would compare elementwise and raise NumPy's
    # "truth value of an array is ambiguous".
    options = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {options}, got {_show(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {options}, got {_show(value)}")
    return str(value)


def _increasing_ints(name: str, values: Any, minimum: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of integers, got {_show(values)}")
    out = [_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values)]
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise ValueError(f"{name} must be strictly increasing, got {out}")
    return out


def _schedule(name: str, value: ScheduleLike) -> Callable[[int], float]:
    if callable(value):
        return value
    if not _is_real(value):
        raise TypeError(f"{name} must be a schedule, a callable lr(step) or a number, got "
                        f"{_show(value)}")
    return Constant(_nonneg(name, value))


def _check_step(step: Any) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (updates already taken), got {_show(step)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {_show(step)}")
    _float("step", step)
    return int(step)


def _metric(name: str, value: Any) -> float:
    """A real number (a Python or NumPy scalar, or a 0-d array or tensor holding one) as a
    float; NaN and inf are kept (a diverged loss is data, as in torch). Also ``EMA.update``'s
    check."""
    if not _is_real(value) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d array or tensor: its element, checked below
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {_show(value)}")
    return _float(name, value)


def _scaled_power(scale: float, base: float, exponent: float) -> float:
    """``scale * base ** exponent`` for ``scale >= 0``, ``base > 0``: ``inf`` past the float
    range (Note [Overflow]), where Python's ``**`` raises ``OverflowError``."""
    try:
        value: float = scale * base ** exponent
        return value
    except OverflowError:
        if scale == 0:
            return 0.0
    # base ** exponent alone is beyond the float range, scale * base ** exponent (scale < 1)
    # not necessarily: take the power in two halves and scale in between. A float product
    # past the range is inf.
    try:
        half: float = base ** (exponent / 2)
    except OverflowError:
        return math.inf
    return scale * half * half


# ---------------------------------------------------------------------------------------------

class Schedule:
    """Base class: ``schedule(step)`` checks ``step`` and returns ``float(self._value(step))``.

    Subclasses set ``_fields`` (the constructor's argument names, stored as attributes of the
    same names; ``__repr__`` prints them) and implement ``_value``.
    """

    _fields: tuple[str, ...] = ()

    def __call__(self, step: int) -> float:
        return float(self._value(_check_step(step)))

    def _value(self, step: int) -> float:
        raise NotImplementedError

    def lrs(self, num_steps: int) -> np.ndarray:
        """The learning rates of steps ``0 .. num_steps-1`` as a float64 array (for plots)."""
        num_steps = _int("num_steps", num_steps, 0)
        return np.array([self(t) for t in range(num_steps)], dtype=np.float64)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``lr(step) = lr`` (what a plain float means)."""

    _fields = ("lr",)

    def __init__(self, lr: float) -> None:
        self.lr = _nonneg("lr", lr)

    def _value(self, step: int) -> float:
        return self.lr


class InverseTimeDecay(Schedule):
    """Inverse-time decay: ``lr0 / (1 + decay_rate * epoch)``.

    ``epoch = step / time_interval``, or ``floor(step / time_interval)`` when ``staircase``
    (the lr then drops once every ``time_interval`` steps). With the defaults
    (``time_interval=1``) this is ``lr0 / (1 + decay_rate * step)``. Pass the epoch number as
    ``step`` (or use :class:`PerEpoch`) for the per-epoch form; ``staircase=True,
    time_interval=1000`` is the "fixed interval scheduling" of the deeplearning.ai course.

    Same numbers as Keras ``InverseTimeDecay(lr0, decay_steps=time_interval, decay_rate,
    staircase)``. Defaults: ``time_interval=1``, ``staircase=False``.
    """

    _fields = ("lr0", "decay_rate", "time_interval", "staircase")

    def __init__(self, lr0: float, decay_rate: float, time_interval: float = 1,
                 staircase: bool = False) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.decay_rate = _nonneg("decay_rate", decay_rate)
        self.time_interval = _positive("time_interval", time_interval)
        self.staircase = _flag("staircase", staircase)

    def _value(self, step: int) -> float:
        epoch = step / self.time_interval
        if self.staircase:
            epoch = math.floor(epoch)
        return self.lr0 / (1.0 + self.decay_rate * epoch)


class ExponentialDecay(Schedule):
    """Exponential decay: ``lr0 * decay_rate ** (step / decay_steps)``.

    With ``staircase`` the exponent is ``floor(step / decay_steps)``. Defaults:
    ``decay_steps=1``, ``staircase=False``.

    Same numbers as torch ``ExponentialLR(gamma=decay_rate)`` (``decay_steps=1``), torch
    ``StepLR(step_size=decay_steps, gamma=decay_rate)`` (``staircase=True``), Keras
    ``ExponentialDecay(lr0, decay_steps, decay_rate, staircase)`` and optax
    ``exponential_decay(lr0, transition_steps=decay_steps, decay_rate, staircase=staircase)``.
    """

    _fields = ("lr0", "decay_rate", "decay_steps", "staircase")

    def __init__(self, lr0: float, decay_rate: float, decay_steps: float = 1,
                 staircase: bool = False) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.decay_rate = _positive("decay_rate", decay_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.staircase = _flag("staircase", staircase)

    def _value(self, step: int) -> float:
        exponent = step / self.decay_steps
        if self.staircase:
            exponent = math.floor(exponent)
        return _scaled_power(self.lr0, self.decay_rate, exponent)


class InverseSqrtDecay(Schedule):
    """``k / sqrt(epoch_num)`` decay: ``lr0 / sqrt(1 + epoch)``.

    ``epoch = step / time_interval``, or ``floor(step / time_interval)`` when ``staircase``.
    ``1 + epoch`` is the course's 1-based ``epoch_num``, so the first update uses ``lr0``
    (the ``k`` of ``k / sqrt(epoch_num)``). Defaults: ``time_interval=1``, ``staircase=False``.
    No torch/Keras/optax class has this form; the tests compare it with the formula.
    """

    _fields = ("lr0", "time_interval", "staircase")

    def __init__(self, lr0: float, time_interval: float = 1, staircase: bool = False) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.time_interval = _positive("time_interval", time_interval)
        self.staircase = _flag("staircase", staircase)

    def _value(self, step: int) -> float:
        epoch = step / self.time_interval
        if self.staircase:
            epoch = math.floor(epoch)
        return self.lr0 / math.sqrt(1.0 + epoch)


class StepDecay(Schedule):
    """Step decay: ``lr0 * gamma ** floor(step / step_size)``. Default ``gamma=0.1``.

    Same numbers as torch ``StepLR(step_size, gamma)``.
    """

    _fields = ("lr0", "step_size", "gamma")

    def __init__(self, lr0: float, step_size: int, gamma: float = 0.1) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.step_size = _int("step_size", step_size, 1)
        self.gamma = _positive("gamma", gamma)

    def _value(self, step: int) -> float:
        return _scaled_power(self.lr0, self.gamma, step // self.step_size)


class MultiStepDecay(Schedule):
    """Multi-step decay: ``lr0 * gamma ** (number of milestones <= step)``.

    ``milestones`` is a strictly increasing list of integers >= 1; the lr is multiplied by
    ``gamma`` at each. Default ``gamma=0.1``. Same numbers as torch
    ``MultiStepLR(milestones, gamma)``.
    """

    _fields = ("lr0", "milestones", "gamma")

    def __init__(self, lr0: float, milestones: Sequence[int], gamma: float = 0.1) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.milestones = _increasing_ints("milestones", milestones, 1)
        self.gamma = _positive("gamma", gamma)

    def _value(self, step: int) -> float:
        return _scaled_power(self.lr0, self.gamma, bisect.bisect_right(self.milestones, step))


class PolynomialDecay(Schedule):
    """Polynomial decay from ``lr0`` to ``end_value`` over ``decay_steps`` steps:

    ``(lr0 - end_value) * (1 - min(step, decay_steps) / decay_steps) ** power + end_value``,
    then ``end_value``. With ``cycle=True`` the decay restarts instead: ``decay_steps`` is
    replaced by ``decay_steps * ceil(step / decay_steps)`` (1 multiple at step 0), as in Keras.
    Defaults: ``end_value=0.0``, ``power=1.0`` (linear), ``cycle=False``.

    Same numbers as torch ``PolynomialLR(total_iters=decay_steps, power)`` (``end_value=0``,
    no cycle), Keras ``PolynomialDecay(lr0, decay_steps, end_learning_rate=end_value, power,
    cycle)`` (whose ``end_learning_rate`` defaults to 1e-4, not 0) and optax
    ``polynomial_schedule(lr0, end_value, power, transition_steps=decay_steps)``.
    """

    _fields = ("lr0", "decay_steps", "end_value", "power", "cycle")

    def __init__(self, lr0: float, decay_steps: int, end_value: float = 0.0,
                 power: float = 1.0, cycle: bool = False) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.decay_steps = _int("decay_steps", decay_steps, 1)
        self.end_value = _nonneg("end_value", end_value)
        self.power = _positive("power", power)
        self.cycle = _flag("cycle", cycle)

    def _value(self, step: int) -> float:
        if self.cycle:
            periods = max(1, -(-step // self.decay_steps))  # ceil, and 1 at step 0
            fraction = step / (self.decay_steps * periods)
        else:
            fraction = min(step, self.decay_steps) / self.decay_steps
        lr: float = (self.lr0 - self.end_value) * (1.0 - fraction) ** self.power + self.end_value
        return lr


class CosineDecay(Schedule):
    """Cosine decay from ``lr0`` to ``min_lr`` over ``decay_steps`` steps, then ``min_lr``:

    ``min_lr + (lr0 - min_lr) * (1 + cos(pi * step / decay_steps)) / 2`` for
    ``step < decay_steps``. Default ``min_lr=0.0``.

    Same numbers as torch ``CosineAnnealingLR(T_max=decay_steps, eta_min=min_lr)`` for
    ``step <= decay_steps`` (past ``T_max`` torch's lr climbs back up along the cosine; this
    schedule stays at ``min_lr``, as Keras and optax do: use :class:`CosineWarmRestarts` for
    a periodic lr), Keras ``CosineDecay(lr0, decay_steps, alpha=min_lr/lr0)`` and optax
    ``cosine_decay_schedule(lr0, decay_steps, alpha=min_lr/lr0)``.
    """

    _fields = ("lr0", "decay_steps", "min_lr")

    def __init__(self, lr0: float, decay_steps: int, min_lr: float = 0.0) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.decay_steps = _int("decay_steps", decay_steps, 1)
        self.min_lr = _nonneg("min_lr", min_lr)

    def _value(self, step: int) -> float:
        if step >= self.decay_steps:
            return self.min_lr
        cosine = 1.0 + math.cos(math.pi * step / self.decay_steps)
        return self.min_lr + (self.lr0 - self.min_lr) * cosine / 2.0


class CosineWarmRestarts(Schedule):
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter 2017).

    The lr follows ``min_lr + (lr0 - min_lr) * (1 + cos(pi * t_cur / t_i)) / 2`` where ``t_i``
    is the length of the current period (``period``, then multiplied by ``period_mult`` after
    each restart) and ``t_cur`` the steps since the last restart; at a restart it jumps back
    to ``lr0``. Defaults: ``period_mult=1``, ``min_lr=0.0``.

    Same numbers as torch ``CosineAnnealingWarmRestarts(T_0=period, T_mult=period_mult,
    eta_min=min_lr)``. (Keras ``CosineDecayRestarts`` defaults to ``t_mul=2.0``.)
    """

    _fields = ("lr0", "period", "period_mult", "min_lr")

    def __init__(self, lr0: float, period: int, period_mult: int = 1,
                 min_lr: float = 0.0) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.period = _int("period", period, 1)
        self.period_mult = _int("period_mult", period_mult, 1)
        self.min_lr = _nonneg("min_lr", min_lr)

    def _value(self, step: int) -> float:
        if self.period_mult == 1:
            t_cur, t_i = step % self.period, self.period
        else:
            # Walk the periods in integers (a float log could land on the wrong side of a
            # restart); there are only O(log step) of them.
            start, t_i = 0, self.period
            while step >= start + t_i:
                start += t_i
                t_i *= self.period_mult
            t_cur = step - start
        cosine = 1.0 + math.cos(math.pi * t_cur / t_i)
        return self.min_lr + (self.lr0 - self.min_lr) * cosine / 2.0


class Linear(Schedule):
    """Linear ramp from ``start_value`` to ``end_value`` over ``steps`` steps, then
    ``end_value``: ``start_value + (end_value - start_value) * min(step, steps) / steps``.

    Same numbers as optax ``linear_schedule(start_value, end_value, transition_steps=steps)``
    and torch ``LinearLR(start_factor, end_factor, total_iters=steps)`` on base lr ``lr0``
    with ``start_value = lr0*start_factor``, ``end_value = lr0*end_factor``.
    """

    _fields = ("start_value", "end_value", "steps")

    def __init__(self, start_value: float, end_value: float, steps: int) -> None:
        self.start_value = _nonneg("start_value", start_value)
        self.end_value = _nonneg("end_value", end_value)
        self.steps = _int("steps", steps, 1)

    def _value(self, step: int) -> float:
        fraction = min(step, self.steps) / self.steps
        return self.start_value + (self.end_value - self.start_value) * fraction


class PiecewiseConstant(Schedule):
    """``values[i]`` from step ``boundaries[i-1]`` (inclusive) to ``boundaries[i]``
    (exclusive): ``values[0]`` before ``boundaries[0]``, ``values[-1]`` from ``boundaries[-1]``.

    ``boundaries`` are strictly increasing integers >= 1 and ``len(values) ==
    len(boundaries) + 1``. The switch happens AT the boundary, as in torch ``MultiStepLR`` and
    optax ``piecewise_constant_schedule``; Keras ``PiecewiseConstantDecay`` switches one step
    later (for ``step > boundary``), so pass its boundaries plus one to reproduce it.
    """

    _fields = ("boundaries", "values")

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]) -> None:
        self.boundaries = _increasing_ints("boundaries", boundaries, 1)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"values must be a list of numbers, got {_show(values)}")
        if len(values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(values)}"
            )
        self.values = [_nonneg(f"values[{i}]", v) for i, v in enumerate(values)]

    def _value(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]


class OneCycle(Schedule):
    """The 1cycle policy (Smith & Topin 2018), torch's ``OneCycleLR`` learning rates.

    Starts at ``initial = max_lr / div_factor``, anneals up to ``max_lr`` over the first
    ``pct_start * total_steps - 1`` steps, then down to ``initial / final_div_factor`` at
    step ``total_steps - 1``; after that it stays there (torch raises past ``total_steps``).
    ``anneal_strategy`` is ``"cos"`` (``end + (start - end) * (1 + cos(pi * pct)) / 2``) or
    ``"linear"``. With ``three_phase=True`` the second phase goes back down to ``initial`` by
    step ``2 * pct_start * total_steps - 2`` and the third anneals to the minimum.
    Defaults: ``pct_start=0.3``, ``anneal_strategy="cos"``, ``div_factor=25.0``,
    ``final_div_factor=1e4``, ``three_phase=False``.

    Same numbers as torch ``OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy,
    div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase)`` for
    ``step < total_steps``; torch also cycles momentum, which a schedule of lr cannot.
    """

    _fields = ("max_lr", "total_steps", "pct_start", "anneal_strategy", "div_factor",
               "final_div_factor", "three_phase")

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False) -> None:
        self.max_lr = _positive("max_lr", max_lr)
        self.total_steps = _int("total_steps", total_steps, 2)
        self.pct_start = _real("pct_start", pct_start)
        self.anneal_strategy = _choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.div_factor = _positive("div_factor", div_factor)
        self.final_div_factor = _positive("final_div_factor", final_div_factor)
        self.three_phase = _flag("three_phase", three_phase)

        # torch's phase boundaries (floats); every phase must have positive length, else
        # torch divides by zero or runs a phase backwards.
        up_end = self.pct_start * self.total_steps - 1
        initial = self.max_lr / self.div_factor
        minimum = initial / self.final_div_factor
        if three_phase:
            down_end = 2 * self.pct_start * self.total_steps - 2
            self._phases = [(up_end, initial, self.max_lr), (down_end, self.max_lr, initial),
                            (self.total_steps - 1, initial, minimum)]
        else:
            self._phases = [(up_end, initial, self.max_lr),
                            (self.total_steps - 1, self.max_lr, minimum)]
        start = 0.0
        for end, _, _ in self._phases:
            if not end > start:
                raise ValueError(
                    f"pct_start={self.pct_start!r} with total_steps={self.total_steps} leaves "
                    "a phase of the cycle with no steps (need pct_start * total_steps > 1 and "
                    + ("pct_start < (total_steps + 1) / (2 * total_steps))" if three_phase
                       else "pct_start < 1)")
                )
            start = end

    def _value(self, step: int) -> float:
        step = min(step, self.total_steps - 1)
        start = 0.0
        for i, (end, lr_start, lr_end) in enumerate(self._phases):
            if step <= end or i == len(self._phases) - 1:
                pct = (step - start) / (end - start)
                if self.anneal_strategy == "cos":
                    return lr_end + (lr_start - lr_end) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (lr_end - lr_start) * pct + lr_start
            start = end
        raise AssertionError("unreachable")


class Join(Schedule):
    """``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``, each one started
    from its own step 0: at step ``t >= boundaries[i-1]`` the value is
    ``schedules[i](t - boundaries[i-1])``.

    ``boundaries`` are strictly increasing integers >= 1, one fewer than ``schedules``; a
    schedule may be any callable ``lr(step)`` or a number (a constant). Same numbers as optax
    ``join_schedules(schedules, boundaries)`` and torch ``SequentialLR(schedulers,
    milestones=boundaries)``.
    """

    _fields = ("schedules", "boundaries")

    def __init__(self, schedules: Sequence[ScheduleLike], boundaries: Sequence[int]) -> None:
        if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
            raise TypeError(f"schedules must be a list of schedules, got {_show(schedules)}")
        self.boundaries = _increasing_ints("boundaries", boundaries, 1)
        if len(schedules) != len(self.boundaries) + 1:
            raise ValueError(
                f"schedules must have len(boundaries) + 1 = {len(self.boundaries) + 1} "
                f"entries, got {len(schedules)}"
            )
        self.schedules = [_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]

    def _value(self, step: int) -> float:
        i = bisect.bisect_right(self.boundaries, step)
        return self.schedules[i](step - self.boundaries[i - 1] if i else step)


class Warmup(Schedule):
    """Linear warmup in front of any schedule.

    For ``step < warmup_steps``: ``start_value + (peak - start_value) * step / warmup_steps``
    with ``peak = schedule(0)``; from then on ``schedule(step - warmup_steps)``, so the wrapped
    schedule starts at its own step 0 when the warmup ends (optax's ``join_schedules``,
    torch's ``SequentialLR``). ``schedule`` may be any callable ``lr(step)`` or a number.
    Default ``start_value=0.0``.

    ``Warmup(Linear(lr0, 0, total - w), w)`` is the "linear schedule with warmup" of
    Hugging Face transformers; torch's ``SequentialLR([LinearLR(start_factor=s/lr0,
    total_iters=w), main], milestones=[w])`` gives the same numbers for ``start_value = s > 0``.
    """

    _fields = ("schedule", "warmup_steps", "start_value")

    def __init__(self, schedule: ScheduleLike, warmup_steps: int,
                 start_value: float = 0.0) -> None:
        self.schedule = _schedule("schedule", schedule)
        self.warmup_steps = _int("warmup_steps", warmup_steps, 1)
        self.start_value = _nonneg("start_value", start_value)

    def _value(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.schedule(step - self.warmup_steps)
        peak = self.schedule(0)
        return self.start_value + (peak - self.start_value) * (step / self.warmup_steps)


class PerEpoch(Schedule):
    """Turns a per-epoch schedule into a per-update one: ``schedule(step // steps_per_epoch)``.

    For an optimizer that takes ``steps_per_epoch`` mini-batch updates per epoch, so that an
    epoch-based schedule (inverse-time decay, step decay, ...) changes once per epoch.
    """

    _fields = ("schedule", "steps_per_epoch")

    def __init__(self, schedule: ScheduleLike, steps_per_epoch: int) -> None:
        self.schedule = _schedule("schedule", schedule)
        self.steps_per_epoch = _int("steps_per_epoch", steps_per_epoch, 1)

    def _value(self, step: int) -> float:
        return self.schedule(step // self.steps_per_epoch)


class ReduceLROnPlateau(Schedule):
    """Reduce the lr when a metric stops improving (torch's ``ReduceLROnPlateau``).

    Call ``observe(metric)`` (or its alias ``step(metric)``) once per evaluation, e.g. with the
    validation loss after every epoch; ``schedule(step)`` and ``schedule.lr`` return the
    current lr (``step`` is ignored), so the object can be the ``lr=`` of an optimizer.

    A metric is an improvement when it beats the best so far by the threshold
    (``mode="min"``: ``metric < best * (1 - threshold)`` in ``"rel"`` threshold mode,
    ``metric < best - threshold`` in ``"abs"``; ``"max"`` mirrors it). After more than
    ``patience`` observations in a row without improvement the lr becomes
    ``max(lr * factor, min_lr)`` (skipped when that changes it by ``eps`` or less), and the
    next ``cooldown`` observations are not counted. Defaults (torch's): ``mode="min"``,
    ``factor=0.1``, ``patience=10``, ``threshold=1e-4``, ``threshold_mode="rel"``,
    ``cooldown=0``, ``min_lr=0.0``, ``eps=1e-8``.

    Same numbers as torch ``ReduceLROnPlateau(optimizer with lr=lr0, mode, factor, patience,
    threshold, threshold_mode, cooldown, min_lr, eps)`` fed the same metrics.
    """

    _fields = ("lr0", "mode", "factor", "patience", "threshold", "threshold_mode",
               "cooldown", "min_lr", "eps")

    def __init__(self, lr0: float, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, eps: float = 1e-8) -> None:
        self.lr0 = _nonneg("lr0", lr0)
        self.mode = _choice("mode", mode, ("min", "max"))
        self.factor = _real("factor", factor)
        if not 0 <= self.factor < 1:
            raise ValueError(f"factor must be in [0, 1), got {factor!r}")
        self.patience = _int("patience", patience, 0)
        self.threshold = _nonneg("threshold", threshold)
        self.threshold_mode = _choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = _int("cooldown", cooldown, 0)
        self.min_lr = _nonneg("min_lr", min_lr)
        self.eps = _nonneg("eps", eps)
        #: the current learning rate
        self.lr = self.lr0
        #: best metric so far (``inf`` in min mode, ``-inf`` in max mode before the first)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        #: how many metrics have been observed
        self.num_observations = 0

    def _is_better(self, metric: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return metric < self.best * (1.0 - self.threshold)
            return metric < self.best - self.threshold
        if self.threshold_mode == "rel":
            return metric > self.best * (1.0 + self.threshold)
        return metric > self.best + self.threshold

    def observe(self, metric: float) -> float:
        """Record one value of the monitored metric; returns the (possibly reduced) lr.

        ``metric`` is a real number: a Python or NumPy scalar, or a 0-d array or tensor holding
        one (``TypeError`` otherwise, before anything is recorded).
        """
        metric = _metric("metric", metric)
        self.num_observations += 1
        if self._is_better(metric):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.lr

    step = observe

    def _value(self, step: int) -> float:
        return self.lr
