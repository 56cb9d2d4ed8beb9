"""Review fixes for the training toolkit (schedules, data, ema): argument types and values,
overflow, and the precision and aliasing of ModelEMA's bias correction.

Expected values come from the published definitions (IEEE arithmetic for the overflowing
schedules, exact fractions for the bias correction) or from torch.optim.lr_scheduler.
"""
from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from fastoptim import optim
from fastoptim import schedules as S
from fastoptim.data import iter_mini_batches, random_mini_batches
from fastoptim.ema import EMA, ModelEMA

# --------------------------------------------------------------------------------------------
# Finding 1: the metric of ReduceLROnPlateau.observe and the value of EMA.update are real numbers

NOT_REAL = ["0.5", "abc", None, [0.5], True, np.bool_(False), np.array(True), np.array([0.5]),
            1 + 2j]


@pytest.mark.parametrize("bad", NOT_REAL, ids=repr)
def test_observe_refuses_non_real_metric_before_recording(bad):
    sched = S.ReduceLROnPlateau(0.1, patience=0)
    sched.observe(1.0)
    with pytest.raises(TypeError, match="metric"):
        sched.observe(bad)
    # nothing was recorded: the state is that of one observation of 1.0
    assert (sched.num_observations, sched.best, sched.num_bad_epochs, sched.lr) == (1, 1.0, 0, 0.1)
    with pytest.raises(TypeError, match="metric"):
        sched.step(bad)  # the alias


def test_observe_accepts_real_scalars_and_0d_arrays():
    # torch ReduceLROnPlateau(patience=0, factor=0.5): the lr halves after each observation
    # that does not beat the best (1.0) by the relative threshold 1e-4.
    sched = S.ReduceLROnPlateau(0.8, patience=0, factor=0.5)
    assert sched.observe(np.array(1.0)) == 0.8
    assert sched.observe(np.float32(2.0)) == 0.4
    assert sched.observe(np.int64(3)) == 0.2
    assert sched.observe(np.array(5, dtype=np.int16)) == 0.1
    assert sched.observe(Fraction(1, 2)) == 0.1 and sched.best == 0.5
    with pytest.raises(ValueError, match="metric"):
        sched.observe(10**400)
    assert sched.num_observations == 5


@pytest.mark.parametrize("bad", NOT_REAL, ids=repr)
def test_ema_update_refuses_non_real_value_before_changing_state(bad):
    ema = EMA(0.5)
    ema.update(4.0)
    with pytest.raises(TypeError, match=r"\bx\b"):
        ema.update(bad)
    assert (ema.t, ema.average, ema.value) == (1, 2.0, 4.0)


def test_ema_update_accepts_real_scalars_and_0d_arrays():
    ema = EMA(0.5)
    # avg_1 = 0.5*2 = 1, avg_2 = 0.5*1 + 0.5*4 = 2.5, avg_3 = 1.25 + 0.5*8 = 5.25; value_3 =
    # 5.25 / (1 - 0.125) = 6
    ema.update(np.array(2.0))
    ema.update(np.float16(4.0))
    assert ema.update(np.array(8, dtype=np.int32)) == 6.0
    assert type(ema.average) is float
    with pytest.raises(ValueError, match=r"\bx\b"):
        ema.update(10**400)
    assert ema.t == 3


def test_0d_tensors_are_numbers_too():
    """A loss tensor, as torch's ReduceLROnPlateau takes it (float(metrics)); a bool tensor
    is not a number."""
    torch = pytest.importorskip("torch")
    sched = S.ReduceLROnPlateau(0.8, patience=0, factor=0.5)
    assert sched.observe(torch.tensor(1.0)) == 0.8
    assert sched.observe(torch.tensor(2.0, dtype=torch.float64)) == 0.4
    ema = EMA(0.5)
    assert ema.update(torch.tensor(2.0)) == 2.0
    for bad in (torch.tensor(True), torch.tensor([1.0])):
        with pytest.raises(TypeError, match="metric"):
            sched.observe(bad)
        with pytest.raises(TypeError, match=r"\bx\b"):
            ema.update(bad)
    assert (sched.num_observations, ema.t) == (2, 1)


# --------------------------------------------------------------------------------------------
# Finding 2 (and 4): the wrong TYPE for an integer or a choice is TypeError, a wrong value
# ValueError, for every such argument; both name the argument.

INT_ARGS = [
    (S.StepDecay, dict(lr0=0.1), "step_size"),
    (S.PolynomialDecay, dict(lr0=0.1), "decay_steps"),
    (S.CosineDecay, dict(lr0=0.1), "decay_steps"),
    (S.CosineWarmRestarts, dict(lr0=0.1), "period"),
    (S.CosineWarmRestarts, dict(lr0=0.1, period=3), "period_mult"),
    (S.Linear, dict(start_value=0.0, end_value=0.1), "steps"),
    (S.OneCycle, dict(max_lr=0.1), "total_steps"),
    (S.Warmup, dict(schedule=0.1), "warmup_steps"),
    (S.PerEpoch, dict(schedule=0.1), "steps_per_epoch"),
    (S.ReduceLROnPlateau, dict(lr0=0.1), "patience"),
    (S.ReduceLROnPlateau, dict(lr0=0.1), "cooldown"),
]


@pytest.mark.parametrize("cls, kwargs, name", INT_ARGS, ids=lambda v: getattr(v, "__name__", v))
def test_integer_arguments_wrong_type_is_typeerror_wrong_value_valueerror(cls, kwargs, name):
    pattern = rf"^{name} must be an integer"
    for bad in (None, "3", [3], 3 + 0j, True):
        with pytest.raises(TypeError, match=pattern):
            cls(**kwargs, **{name: bad})
    for bad in (2.5, 3.0, np.float64(4.0), -1, 10**400):
        with pytest.raises(ValueError, match=rf"^{name} "):
            cls(**kwargs, **{name: bad})


@pytest.mark.parametrize("make, name", [
    (lambda v: S.MultiStepDecay(0.1, [2, v]), r"milestones\[1\]"),
    (lambda v: S.PiecewiseConstant([v], [0.1, 0.2]), r"boundaries\[0\]"),
    (lambda v: S.Join([0.1, 0.2], [v]), r"boundaries\[0\]"),
    (lambda v: S.Constant(0.1).lrs(v), "num_steps"),
], ids=["milestones", "PiecewiseConstant", "Join", "lrs"])
def test_integer_list_entries_and_num_steps(make, name):
    for bad in (None, "3", [3]):
        with pytest.raises(TypeError, match=name):
            make(bad)
    for bad in (2.5, 10**400):
        with pytest.raises(ValueError, match=name):
            make(bad)


@pytest.mark.parametrize("make, name", [
    (lambda v: S.ReduceLROnPlateau(0.1, mode=v), "mode"),
    (lambda v: S.ReduceLROnPlateau(0.1, threshold_mode=v), "threshold_mode"),
    (lambda v: S.OneCycle(0.1, 100, anneal_strategy=v), "anneal_strategy"),
], ids=["mode", "threshold_mode", "anneal_strategy"])
def test_choice_arguments_wrong_type_is_typeerror(make, name):
    for bad in (np.array(["min", "max"]), np.array(["cos", "linear", "rel"]), None, 3, ["min"],
                b"min"):
        with pytest.raises(TypeError, match=rf"^{name} must be a str"):
            make(bad)
    with pytest.raises(ValueError, match=rf"^{name} must be one of"):
        make("neither")


def test_schedule_argument_that_is_neither_callable_nor_number():
    for bad in (None, "0.1", [0.1]):
        with pytest.raises(TypeError, match="^schedule must be a schedule, a callable"):
            S.Warmup(bad, 3)
        with pytest.raises(TypeError, match=r"^schedules\[1\] must be a schedule, a callable"):
            S.Join([0.1, bad], [3])


# --------------------------------------------------------------------------------------------
# Finding 3: numbers beyond the float range


@pytest.mark.parametrize("make, name", [
    (lambda v: S.Constant(v), "lr"),
    (lambda v: S.InverseTimeDecay(0.1, v), "decay_rate"),
    (lambda v: S.ExponentialDecay(0.1, 0.5, decay_steps=v), "decay_steps"),
    (lambda v: S.StepDecay(v, 3), "lr0"),
    (lambda v: S.OneCycle(0.1, 100, pct_start=v), "pct_start"),
    (lambda v: S.ReduceLROnPlateau(0.1, factor=v), "factor"),
    (lambda v: S.PiecewiseConstant([3], [0.1, v]), r"values\[1\]"),
    (lambda v: S.Warmup(v, 3), "schedule"),
], ids=["Constant", "InverseTimeDecay", "ExponentialDecay", "StepDecay", "OneCycle",
        "ReduceLROnPlateau", "PiecewiseConstant", "Warmup"])
def test_real_argument_beyond_float_range_is_valueerror(make, name):
    for bad in (10**400, -10**400, 10**5000):  # 10**5000 has no str() under Python's limit
        with pytest.raises(ValueError, match=rf"^{name} "):
            make(bad)


def test_integer_argument_beyond_float_range_refused_at_construction():
    # CosineDecay(0.1, 10**400) used to be built and to fail with OverflowError when called
    with pytest.raises(ValueError, match="^decay_steps .*float"):
        S.CosineDecay(0.1, 10**400)
    with pytest.raises(ValueError, match="^total_steps .*float"):
        S.OneCycle(0.1, 10**400)
    # the largest integers a float holds are still fine
    big = 2**1023
    assert S.CosineDecay(0.1, big)(3) == pytest.approx(0.1, rel=1e-15)
    assert S.PolynomialDecay(0.1, big)(big) == 0.0


def test_step_beyond_float_range_is_valueerror():
    for sched in (S.ExponentialDecay(0.1, 0.9), S.InverseTimeDecay(0.1, 0.5),
                  S.InverseSqrtDecay(0.1), S.StepDecay(0.1, 3), S.Constant(0.1)):
        with pytest.raises(ValueError, match="^step "):
            sched(10**400)
    assert S.ExponentialDecay(0.1, 0.9)(2**1023) == 0.0


def test_growing_schedules_overflow_to_inf():
    # IEEE arithmetic: 0.1 * 1.5**2000 and 0.1 * 2.0**2000 are beyond the float range: inf
    assert S.ExponentialDecay(0.1, 1.5)(2000) == math.inf
    assert S.ExponentialDecay(0.1, 1.5, decay_steps=2, staircase=True)(4000) == math.inf
    assert S.StepDecay(0.1, 1, 2.0)(2000) == math.inf
    assert S.MultiStepDecay(0.1, list(range(1, 1500)), 2.0)(2000) == math.inf
    # lr0 = 0 stays 0 (0 * 1.5**2000 = 0; torch multiplies 0 by 1.5 each step)
    assert S.ExponentialDecay(0.0, 1.5)(2000) == 0.0
    assert S.StepDecay(0.0, 1, 2.0)(2000) == 0.0
    # still finite just below the overflow: 0.1 * 2**1000
    assert S.StepDecay(0.1, 1, 2.0)(1000) == 0.1 * 2.0**1000
    # finite although the power alone is not: 2**1027 / 10 and 1.5**1753 / 10 (about 1.4e308)
    exact = float(Fraction(2**1027, 10))
    assert S.StepDecay(0.1, 1, 2.0)(1027) == pytest.approx(exact, rel=1e-15)
    assert S.MultiStepDecay(0.1, list(range(1, 1028)), 2.0)(1027) == pytest.approx(exact,
                                                                                  rel=1e-15)
    exact = float(Fraction(3, 2) ** 1753 / 10)
    assert S.ExponentialDecay(0.1, 1.5)(1753) == pytest.approx(exact, rel=1e-13)


def test_growing_schedules_overflow_like_torch():
    torch = pytest.importorskip("torch")
    lr_scheduler = torch.optim.lr_scheduler
    cases = [
        (S.ExponentialDecay(0.1, 1.5), lambda o: lr_scheduler.ExponentialLR(o, gamma=1.5)),
        (S.StepDecay(0.1, 3, 2.0), lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=2.0)),
        (S.MultiStepDecay(0.1, list(range(1, 1500)), 2.0),
         lambda o: lr_scheduler.MultiStepLR(o, milestones=list(range(1, 1500)), gamma=2.0)),
    ]
    for ours, make in cases:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = make(opt)
        for t in range(3100):  # every step: also those just below the overflow
            theirs = opt.param_groups[0]["lr"]
            assert ours(t) == pytest.approx(theirs, rel=1e-10), (ours, t)
            opt.step()
            sched.step()
        assert theirs == math.inf


def test_optimizer_refuses_the_inf_of_an_overflowing_schedule():
    p, g = np.zeros(3), np.ones(3)
    # lr(t) = 1e-100 * 1e200**t: 1e-100, 1e100, 1e300 (though 1e200**2 alone overflows), inf
    opt = optim.SGD([p], lr=S.ExponentialDecay(1e-100, 1e200))
    for _ in range(3):
        opt.step([g])
    np.testing.assert_allclose(p, -(1e-100 + 1e100 + 1e300), rtol=1e-12)
    before = p.copy()
    with pytest.raises(ValueError, match=r"lr'\]\(3\): inf"):
        opt.step([g])
    np.testing.assert_array_equal(p, before)


# --------------------------------------------------------------------------------------------
# Finding 5: data

X4, Y4 = np.arange(8.0).reshape(4, 2), np.arange(4)
BATCHERS = [random_mini_batches, lambda *a, **k: list(iter_mini_batches(*a, **k))]


@pytest.mark.parametrize("fn", BATCHERS, ids=["random", "iter"])
def test_negative_seed_is_valueerror_naming_seed(fn):
    for bad in (-1, np.int64(-7), -10**400):
        with pytest.raises(ValueError, match="^seed must be >= 0"):
            fn(X4, Y4, 2, seed=bad)


@pytest.mark.parametrize("fn", BATCHERS, ids=["random", "iter"])
def test_ragged_or_non_array_data_named(fn):
    with pytest.raises(ValueError, match="^X "):
        fn([[1.0], [1.0, 2.0]], [0, 1], 1, seed=0)
    with pytest.raises(ValueError, match="^Y "):
        fn(X4, [[0], [1, 2], [3], [4]], 1, seed=0)
    for bad, what in ((None, "NoneType"), ({"a": 1}, "dict"), ((i for i in range(4)), "generator"),
                      ("abcd", "str"), ({1, 2, 3, 4}, "set")):
        with pytest.raises(TypeError, match=f"^X .*got {what}"):
            fn(bad, Y4, 2, seed=0)
        with pytest.raises(TypeError, match=f"^Y .*got {what}"):
            fn(X4, bad, 2, seed=0)
    with pytest.raises(ValueError, match="scalar"):  # a number is still a wrong value
        fn(3.0, Y4, 2, seed=0)


@pytest.mark.parametrize("fn", BATCHERS, ids=["random", "iter"])
def test_masked_arrays_refused_like_model_ema(fn):
    Xm = np.ma.masked_array(X4, mask=np.zeros_like(X4, dtype=bool))
    Xm[1, 0] = np.ma.masked
    Ym = np.ma.masked_array(Y4, mask=[0, 0, 1, 0])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(TypeError, match="^X is a numpy.ma.MaskedArray"):
        fn(Xm, Y4, 2, seed=rng)
    with pytest.raises(TypeError, match="^Y is a numpy.ma.MaskedArray"):
        fn(X4, Ym, 2, seed=rng)
    assert rng.bit_generator.state == state  # refused before drawing anything
    with pytest.raises(TypeError, match="MaskedArray"):  # ModelEMA refuses them too
        ModelEMA(np.ma.masked_array(np.zeros(3)), 0.9)


# --------------------------------------------------------------------------------------------
# Finding 6: the bias correction of a float16/bfloat16 ModelEMA is rounded once, from the exact
# quotient


def _exact_quotient(avg: float, beta: float, t: int) -> Fraction:
    return Fraction(avg) / (1 - Fraction(beta) ** t)


def _assert_rounded_once(result: np.ndarray, averages: np.ndarray, beta: float, t: int) -> None:
    """Each result is the value of its 16-bit dtype nearest to the exact quotient of the stored
    average by 1 - beta**t: no nearer than either neighbour (next bit pattern up and down),
    up to 1e-12 relative (the float64 divisor)."""
    bits = result.view(np.uint16).ravel()
    for k, (r, a) in enumerate(zip(result.ravel(), averages.ravel())):
        exact = _exact_quotient(float(a), beta, t)
        assert float(r) != 0.0 and math.isfinite(float(r))
        err = abs(Fraction(float(r)) - exact)
        for step in (1, -1):  # for a 16-bit float of either sign, +-1 on the bits moves by 1 ulp
            n = np.array([int(bits[k]) + step], dtype=np.uint16).view(result.dtype)[0]
            assert err <= abs(Fraction(float(n)) - exact) + abs(exact) * Fraction(1, 10**12), (
                float(r), float(exact), float(n))


def test_model_ema_float16_correction_with_subnormal_divisor():
    # beta = 0.99999, t = 1: the divisor 1 - beta = 1e-5 is subnormal in float16; a constant 7
    # came back as 6.99 (4 units in the last place below 7)
    p = np.full(4, 7.0, np.float16)
    ema = ModelEMA(p, 0.99999)
    ema.update()
    corrected = ema.corrected()[0]
    _assert_rounded_once(corrected, ema.averages[0], 0.99999, 1)
    # the stored average 7e-5 is itself rounded to float16: 7 comes back within 1 ulp
    assert abs(float(corrected[0]) - 7.0) <= float(np.spacing(np.float16(7.0)))
    out = np.zeros_like(p)
    ema.copy_to(out)
    np.testing.assert_array_equal(out, corrected)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_model_ema_correction_rounded_once(dtype):
    rng = np.random.default_rng(37)
    for beta, steps in ((0.99999, 1), (0.999, 3), (0.9, 2), (0.99, 7)):
        p = rng.uniform(-50, 50, size=64).astype(dtype)
        ema = ModelEMA(p, beta)
        for _ in range(steps):
            ema.update()
        out = np.full_like(p, 123)
        ema.copy_to(out)
        corrected = ema.corrected()[0]
        assert corrected.dtype == np.dtype(dtype)
        _assert_rounded_once(corrected, ema.averages[0], beta, steps)
        np.testing.assert_array_equal(out.view(np.uint16), corrected.view(np.uint16))


# --------------------------------------------------------------------------------------------
# Finding 7: copy_to refuses the averages (or views of them) as targets


def test_copy_to_refuses_the_averages_and_views_of_them():
    params = [np.full(6, 2.0), np.full((2, 3), 4.0)]
    ema = ModelEMA(params, 0.5)
    ema.update()
    raw = [a.copy() for a in ema.averages]
    fresh = np.full(6, -1.0)
    for targets, i, j in [
        (ema.averages, 0, 0),
        ([ema.averages[0][:], np.zeros((2, 3))], 0, 0),
        ([ema.averages[0][::-1], np.zeros((2, 3))], 0, 0),
        ([fresh, ema.averages[1][::-1, ::-1]], 1, 1),
        ([ema.averages[1].reshape(6), np.zeros((2, 3))], 0, 1),
        ([fresh, ema.averages[0].reshape(2, 3)], 1, 0),
        ([np.lib.stride_tricks.as_strided(ema.averages[0]), np.zeros((2, 3))], 0, 0),
    ]:
        with pytest.raises(ValueError, match=rf"arrays\[{i}\] overlaps averages\[{j}\]"):
            ema.copy_to(targets)
        for a, r in zip(ema.averages, raw):
            np.testing.assert_array_equal(a, r)
        np.testing.assert_array_equal(fresh, -1.0)  # nothing written before the refusal
    # writing into the tracked parameters (or any other arrays) is still fine: 2 and 4 come back
    ema.copy_to(params)
    np.testing.assert_array_equal(params[0], 2.0)
    np.testing.assert_array_equal(params[1], 4.0)
    ema.update()
    np.testing.assert_array_equal(ema.corrected()[0], 2.0)
