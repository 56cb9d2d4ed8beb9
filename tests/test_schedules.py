"""fastoptim.schedules: each schedule against its published formula and, where torch has the same
schedule, against torch.optim.lr_scheduler over 200 steps.

Tolerances. Against a formula written out independently below (NumPy, vectorised) the two
computations differ only in rounding order, a few units in the last place: rtol 1e-13. Against
torch, rtol 1e-12 as the task asks: torch updates most lrs recursively (one multiplication per
step), which drifts by about one ulp per step from the closed form, ~200 * 1.1e-16 = 2e-14 after
200 steps; the worst case is the cosine near its end, where torch's ratio
``(1 + cos(pi t/T)) / (1 + cos(pi (t-1)/T))`` loses about ``(T/pi)**2`` ulps to cancellation,
~1e-13 for T = 200.
"""
import math

import numpy as np
import pytest

import fastoptim
from fastoptim import optim
from fastoptim import schedules as S

N = 200
LR0 = 0.1
STEPS = np.arange(N)
FORMULA_RTOL = 1e-13
TORCH_RTOL = 1e-12


def lrs(schedule, n=N):
    return np.array([schedule(t) for t in range(n)])


# ---------------------------------------------------------------------------------------------
# Formulas (Keras/optax/course where no torch class exists; every schedule is covered here).

t = STEPS.astype(np.float64)

FORMULA_CASES = [
    ("inverse_time", S.InverseTimeDecay(LR0, 0.5), LR0 / (1 + 0.5 * t)),
    ("inverse_time_interval", S.InverseTimeDecay(LR0, 0.3, time_interval=7),
     LR0 / (1 + 0.3 * t / 7)),
    ("inverse_time_staircase", S.InverseTimeDecay(LR0, 0.3, time_interval=7, staircase=True),
     LR0 / (1 + 0.3 * np.floor(t / 7))),
    ("exponential", S.ExponentialDecay(LR0, 0.96, decay_steps=10), LR0 * 0.96 ** (t / 10)),
    ("exponential_staircase", S.ExponentialDecay(LR0, 0.5, decay_steps=30, staircase=True),
     LR0 * 0.5 ** np.floor(t / 30)),
    ("inverse_sqrt", S.InverseSqrtDecay(LR0), LR0 / np.sqrt(t + 1)),
    ("inverse_sqrt_staircase", S.InverseSqrtDecay(LR0, time_interval=10, staircase=True),
     LR0 / np.sqrt(np.floor(t / 10) + 1)),
    ("step", S.StepDecay(LR0, 30, gamma=0.5), LR0 * 0.5 ** np.floor(t / 30)),
    ("multistep", S.MultiStepDecay(LR0, [10, 50, 120], gamma=0.3),
     LR0 * 0.3 ** ((t >= 10).astype(int) + (t >= 50) + (t >= 120))),
    ("polynomial", S.PolynomialDecay(LR0, 150, end_value=1e-3, power=2.0),
     (LR0 - 1e-3) * (1 - np.minimum(t, 150) / 150) ** 2 + 1e-3),
    # Keras PolynomialDecay(cycle=True): decay_steps * ceil(step / decay_steps), 1 at step 0.
    ("polynomial_cycle", S.PolynomialDecay(LR0, 40, end_value=1e-3, power=0.5, cycle=True),
     (LR0 - 1e-3) * (1 - t / (40 * np.maximum(1, np.ceil(t / 40)))) ** 0.5 + 1e-3),
    # Keras CosineDecay(lr0, decay_steps, alpha): lr0 * ((1 - alpha) * cos_part + alpha).
    ("cosine", S.CosineDecay(LR0, 120, min_lr=0.2 * LR0),
     LR0 * (0.8 * 0.5 * (1 + np.cos(np.pi * np.minimum(t, 120) / 120)) + 0.2)),
    ("cosine_restarts", S.CosineWarmRestarts(LR0, 10, period_mult=2, min_lr=1e-3),
     None),  # filled in below: its formula needs the period bookkeeping
    ("linear", S.Linear(0.0, LR0, 50), LR0 * np.minimum(t, 50) / 50),
    # Keras PiecewiseConstantDecay([10, 100], v) switches for step > boundary: ours at
    # boundaries + 1.
    ("piecewise", S.PiecewiseConstant([11, 101], [0.1, 0.05, 0.01]),
     np.where(t <= 10, 0.1, np.where(t <= 100, 0.05, 0.01))),
    ("warmup", S.Warmup(S.ExponentialDecay(LR0, 0.9), 20, start_value=0.01),
     np.where(t < 20, 0.01 + (LR0 - 0.01) * t / 20, LR0 * 0.9 ** (t - 20))),
    ("join", S.Join([0.01, S.Linear(LR0, 0.0, 100), 0.001], [30, 130]),
     np.where(t < 30, 0.01, np.where(t < 130, LR0 * (1 - (t - 30) / 100), 0.001))),
    ("per_epoch", S.PerEpoch(S.InverseTimeDecay(LR0, 1.0), 8), LR0 / (1 + np.floor(t / 8))),
    ("constant", S.Constant(LR0), np.full(N, LR0)),
]


def _restarts_formula(lr0, period, mult, min_lr, steps):
    out = []
    for step in steps:
        # n = number of completed periods: period * (mult**n - 1) / (mult - 1) <= step.
        n, start = 0, 0
        while start + period * mult ** n <= step:
            start += period * mult ** n
            n += 1
        t_i = period * mult ** n
        out.append(min_lr + (lr0 - min_lr) * (1 + math.cos(math.pi * (step - start) / t_i)) / 2)
    return np.array(out)


FORMULA_CASES = [
    (name, s, _restarts_formula(LR0, 10, 2, 1e-3, STEPS) if want is None else want)
    for name, s, want in FORMULA_CASES
]


@pytest.mark.parametrize("name, schedule, want", FORMULA_CASES, ids=[c[0] for c in FORMULA_CASES])
def test_formula(name, schedule, want):
    got = lrs(schedule)
    np.testing.assert_allclose(got, want, rtol=FORMULA_RTOL, atol=0)
    assert all(type(v) is float for v in got.tolist())


def test_course_formulas():
    # deeplearning.ai: lr = lr0 / (1 + decay_rate * epoch_num) and the fixed-interval form
    # lr0 / (1 + decay_rate * floor(epoch_num / time_interval)), epoch_num passed as step.
    assert S.InverseTimeDecay(0.5, 1.0)(2) == 0.5 / 3
    s = S.InverseTimeDecay(0.5, 0.3, time_interval=1000, staircase=True)
    assert s(999) == 0.5 and s(1000) == 0.5 / 1.3 and s(2500) == 0.5 / 1.6


def test_one_cycle_formula():
    # torch's phases with total 100, pct_start 0.3: up over steps 0..29, down over 29..99.
    s = S.OneCycle(1.0, 100)
    assert s(0) == pytest.approx(1.0 / 25, rel=1e-15)
    assert s(29) == pytest.approx(1.0, rel=1e-15)
    assert s(99) == pytest.approx(1.0 / 25 / 1e4, rel=1e-12)
    assert s(150) == s(99)  # held at the minimum after the cycle
    assert S.OneCycle(1.0, 100, anneal_strategy="linear")(15) == pytest.approx(
        0.04 + (1 - 0.04) * 15 / 29, rel=1e-15)


def test_cosine_holds_after_decay_steps():
    s = S.CosineDecay(LR0, 10, min_lr=0.01)
    assert s(10) == s(11) == s(10_000) == 0.01
    assert S.PolynomialDecay(LR0, 10)(50) == 0.0


def test_lrs_helper():
    s = S.StepDecay(1.0, 2)
    np.testing.assert_array_equal(s.lrs(5), [1.0, 1.0, 0.1, 0.1, 0.1**2])
    assert s.lrs(0).shape == (0,)


# ---------------------------------------------------------------------------------------------
# torch.optim.lr_scheduler: the value torch's optimizer would use at each of 200 steps.

def torch_lrs(make, n=N, lr=LR0):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)  # momentum: OneCycleLR cycles it
    sched = make(opt, torch.optim.lr_scheduler)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


TORCH_CASES = [
    ("StepLR", S.StepDecay(LR0, 7, gamma=0.5), lambda o, L: L.StepLR(o, 7, gamma=0.5)),
    ("StepLR_default", S.StepDecay(LR0, 30), lambda o, L: L.StepLR(o, 30)),
    ("StepLR_staircase_exp", S.ExponentialDecay(LR0, 0.7, decay_steps=9, staircase=True),
     lambda o, L: L.StepLR(o, 9, gamma=0.7)),
    ("MultiStepLR", S.MultiStepDecay(LR0, [10, 50, 120], gamma=0.3),
     lambda o, L: L.MultiStepLR(o, [10, 50, 120], gamma=0.3)),
    ("MultiStepLR_default", S.MultiStepDecay(LR0, [1, 199]),
     lambda o, L: L.MultiStepLR(o, [1, 199])),
    ("ExponentialLR", S.ExponentialDecay(LR0, 0.97), lambda o, L: L.ExponentialLR(o, 0.97)),
    ("PolynomialLR_default", S.PolynomialDecay(LR0, 5), lambda o, L: L.PolynomialLR(o)),
    ("PolynomialLR", S.PolynomialDecay(LR0, 150, power=2.0),
     lambda o, L: L.PolynomialLR(o, total_iters=150, power=2.0)),
    ("PolynomialLR_sqrt", S.PolynomialDecay(LR0, 199, power=0.5),
     lambda o, L: L.PolynomialLR(o, total_iters=199, power=0.5)),
    ("CosineAnnealingLR", S.CosineDecay(LR0, 199),
     lambda o, L: L.CosineAnnealingLR(o, T_max=199)),
    ("CosineAnnealingLR_eta_min", S.CosineDecay(LR0, 120, min_lr=1e-3),
     lambda o, L: L.CosineAnnealingLR(o, T_max=120, eta_min=1e-3)),
    ("CosineAnnealingLR_short", S.CosineDecay(LR0, 7),
     lambda o, L: L.CosineAnnealingLR(o, T_max=7)),
    ("CosineAnnealingWarmRestarts", S.CosineWarmRestarts(LR0, 10),
     lambda o, L: L.CosineAnnealingWarmRestarts(o, T_0=10)),
    ("CosineAnnealingWarmRestarts_mult", S.CosineWarmRestarts(LR0, 7, 2, min_lr=1e-3),
     lambda o, L: L.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=1e-3)),
    ("CosineAnnealingWarmRestarts_mult3", S.CosineWarmRestarts(LR0, 5, 3),
     lambda o, L: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=3)),
    ("OneCycleLR", S.OneCycle(1.0, N), lambda o, L: L.OneCycleLR(o, max_lr=1.0, total_steps=N)),
    ("OneCycleLR_linear", S.OneCycle(0.5, N, pct_start=0.25, anneal_strategy="linear",
                                     div_factor=10.0, final_div_factor=100.0),
     lambda o, L: L.OneCycleLR(o, max_lr=0.5, total_steps=N, pct_start=0.25,
                               anneal_strategy="linear", div_factor=10.0,
                               final_div_factor=100.0)),
    ("OneCycleLR_three_phase", S.OneCycle(0.3, N, pct_start=0.35, three_phase=True),
     lambda o, L: L.OneCycleLR(o, max_lr=0.3, total_steps=N, pct_start=0.35,
                               three_phase=True)),
    ("LinearLR", S.Linear(LR0 * 0.25, LR0, 40),
     lambda o, L: L.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=40)),
    ("LinearLR_default", S.Linear(LR0 / 3, LR0, 5), lambda o, L: L.LinearLR(o)),
    ("LinearLR_down", S.Linear(LR0, LR0 * 0.1, 150),
     lambda o, L: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=150)),
    ("SequentialLR_warmup_cosine", S.Warmup(S.CosineDecay(LR0, 180), 20, start_value=LR0 / 10),
     lambda o, L: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=20),
                                     L.CosineAnnealingLR(o, T_max=180)], milestones=[20])),
    ("SequentialLR_join", S.Join([S.Linear(LR0 * 0.5, LR0, 30), S.ExponentialDecay(LR0, 0.98),
                                  S.StepDecay(LR0, 10, 0.5)], [50, 120]),
     lambda o, L: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.5, total_iters=30),
                                     L.ExponentialLR(o, 0.98), L.StepLR(o, 10, 0.5)],
                                 milestones=[50, 120])),
]


@pytest.mark.parametrize("name, schedule, make", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(name, schedule, make):
    want = torch_lrs(make)
    n = N
    if name.startswith("CosineAnnealingLR"):
        # Past T_max torch climbs back along the cosine; CosineDecay holds min_lr (docstring).
        n = min(N, schedule.decay_steps + 1)
    np.testing.assert_allclose(lrs(schedule, n), want[:n], rtol=TORCH_RTOL, atol=0)


def _metrics(seed, n=N):
    # Improving, then noisy plateaus, then a dip: exercises patience, cooldown and min_lr.
    rng = np.random.default_rng(seed)
    base = np.concatenate([np.linspace(1.0, 0.5, 40), np.full(60, 0.5), np.full(50, 0.3),
                           np.full(n - 150, 0.29)])
    return (base + 0.01 * rng.standard_normal(n)).tolist()


PLATEAU_CASES = [
    dict(),
    dict(mode="min", factor=0.5, patience=3),
    dict(mode="min", factor=0.5, patience=0, cooldown=4, min_lr=1e-3),
    dict(mode="min", factor=0.3, patience=5, threshold=0.02, threshold_mode="abs"),
    dict(mode="max", factor=0.5, patience=2, threshold=1e-3),
    dict(mode="max", factor=0.5, patience=2, threshold=0.01, threshold_mode="abs", cooldown=2),
    dict(factor=0.5, patience=1, min_lr=0.04, eps=1e-3),
]


@pytest.mark.parametrize("kwargs", PLATEAU_CASES)
def test_reduce_on_plateau_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    metrics = _metrics(len(kwargs))
    if kwargs.get("mode") == "max":
        metrics = [-m for m in metrics]
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=LR0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    ours = S.ReduceLROnPlateau(LR0, **kwargs)
    got, want = [], []
    for k, m in enumerate(metrics):
        got.append(ours(k))
        want.append(opt.param_groups[0]["lr"])
        ref.step(m)
        assert ours.observe(m) == ours.lr
    assert len(set(want)) > 1  # the metrics did trigger reductions
    np.testing.assert_allclose(got, want, rtol=TORCH_RTOL, atol=0)
    assert ours.best == ref.best and ours.num_bad_epochs == ref.num_bad_epochs


def test_reduce_on_plateau_step_alias_and_counts():
    s = S.ReduceLROnPlateau(1.0, patience=1, factor=0.5)
    assert s.step(1.0) == 1.0 and s.step(1.0) == 1.0  # one bad observation: patience 1
    assert s.step(1.0) == 0.5 and s.lr == 0.5 and s(123) == 0.5
    assert s.num_observations == 3


# ---------------------------------------------------------------------------------------------
# As the lr of the optimizer classes.

@pytest.mark.parametrize("schedule", [
    S.Warmup(S.CosineDecay(0.1, 30), 5),
    S.PerEpoch(S.InverseTimeDecay(0.1, 0.5), 4),
    S.OneCycle(0.2, 40),
], ids=repr)
def test_as_optimizer_lr(schedule):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(7)
    ours = p.copy()
    opt = optim.SGD([ours], lr=schedule, momentum=0.9)
    buf = np.zeros_like(p)
    for k in range(40):
        g = rng.standard_normal(7)
        opt.step([g])
        fastoptim.sgd_(p, g, buf, step=k + 1, lr=schedule(k), momentum=0.9)
    np.testing.assert_array_equal(ours, p)


def test_plateau_as_optimizer_lr():
    sched = S.ReduceLROnPlateau(0.1, patience=0, factor=0.5)
    p = np.zeros(3)
    opt = optim.SGD([p], lr=sched)
    g = np.ones(3)
    opt.step([g])
    np.testing.assert_allclose(p, -0.1)
    sched.observe(1.0)
    sched.observe(2.0)  # worse: patience 0 -> halve
    opt.step([g])
    np.testing.assert_allclose(p, -0.15)


# ---------------------------------------------------------------------------------------------
# repr, step checks, argument checks.

@pytest.mark.parametrize("schedule", [c[1] for c in FORMULA_CASES] + [
    S.OneCycle(0.1, 50, three_phase=True, pct_start=0.2), S.ReduceLROnPlateau(0.1, patience=3)],
    ids=lambda s: type(s).__name__)
def test_repr_round_trips(schedule):
    text = repr(schedule)
    assert text.startswith(type(schedule).__name__ + "(")
    again = eval(text, {name: getattr(S, name) for name in S.__all__})
    np.testing.assert_array_equal(lrs(again, 60), lrs(schedule, 60))


@pytest.mark.parametrize("step, exc", [(-1, ValueError), (1.5, TypeError), (2.0, TypeError),
                                       (True, TypeError), ("3", TypeError), (None, TypeError)])
def test_bad_step(step, exc):
    with pytest.raises(exc, match="step"):
        S.ExponentialDecay(0.1, 0.9)(step)


def test_numpy_integer_step_and_scalar_args():
    s = S.ExponentialDecay(np.float32(0.1), np.float32(0.5))
    assert s(np.int64(3)) == pytest.approx(float(np.float32(0.1)) * float(np.float32(0.5)) ** 3)
    assert type(s(np.int32(1))) is float


BAD_ARGS = [
    (S.Constant, dict(lr=-1.0), ValueError, "lr"),
    (S.InverseTimeDecay, dict(lr0=0.1, decay_rate=-0.5), ValueError, "decay_rate"),
    (S.InverseTimeDecay, dict(lr0=0.1, decay_rate=0.5, time_interval=0), ValueError,
     "time_interval"),
    (S.InverseTimeDecay, dict(lr0=float("nan"), decay_rate=0.5), ValueError, "lr0"),
    (S.InverseTimeDecay, dict(lr0="0.1", decay_rate=0.5), TypeError, "lr0"),
    (S.InverseTimeDecay, dict(lr0=0.1, decay_rate=0.5, staircase=1), TypeError, "staircase"),
    (S.ExponentialDecay, dict(lr0=0.1, decay_rate=0.0), ValueError, "decay_rate"),
    (S.ExponentialDecay, dict(lr0=0.1, decay_rate=0.9, decay_steps=-2), ValueError,
     "decay_steps"),
    (S.InverseSqrtDecay, dict(lr0=-0.1), ValueError, "lr0"),
    (S.StepDecay, dict(lr0=0.1, step_size=0), ValueError, "step_size"),
    (S.StepDecay, dict(lr0=0.1, step_size=2.5), ValueError, "step_size"),
    (S.StepDecay, dict(lr0=0.1, step_size=3, gamma=-0.1), ValueError, "gamma"),
    (S.MultiStepDecay, dict(lr0=0.1, milestones=[5, 3]), ValueError, "milestones"),
    (S.MultiStepDecay, dict(lr0=0.1, milestones=[0, 3]), ValueError, r"milestones\[0\]"),
    (S.MultiStepDecay, dict(lr0=0.1, milestones=5), TypeError, "milestones"),
    (S.PolynomialDecay, dict(lr0=0.1, decay_steps=0), ValueError, "decay_steps"),
    (S.PolynomialDecay, dict(lr0=0.1, decay_steps=10, power=0), ValueError, "power"),
    (S.PolynomialDecay, dict(lr0=0.1, decay_steps=10, end_value=-1), ValueError, "end_value"),
    (S.CosineDecay, dict(lr0=0.1, decay_steps=10, min_lr=-1e-3), ValueError, "min_lr"),
    (S.CosineDecay, dict(lr0=0.1, decay_steps=10.0), ValueError, "decay_steps"),
    (S.CosineWarmRestarts, dict(lr0=0.1, period=10, period_mult=0), ValueError, "period_mult"),
    (S.CosineWarmRestarts, dict(lr0=0.1, period=0), ValueError, "period"),
    (S.Linear, dict(start_value=0.0, end_value=0.1, steps=0), ValueError, "steps"),
    (S.PiecewiseConstant, dict(boundaries=[10, 20], values=[0.1, 0.01]), ValueError, "values"),
    (S.PiecewiseConstant, dict(boundaries=[10, 10], values=[1, 2, 3]), ValueError,
     "boundaries"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=100, pct_start=1.0), ValueError, "pct_start"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=10, pct_start=0.05), ValueError, "pct_start"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=100, pct_start=0.6, three_phase=True),
     ValueError, "pct_start"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=100, anneal_strategy="exp"), ValueError,
     "anneal_strategy"),
    (S.OneCycle, dict(max_lr=0.0, total_steps=100), ValueError, "max_lr"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=1), ValueError, "total_steps"),
    (S.OneCycle, dict(max_lr=0.1, total_steps=100, div_factor=0), ValueError, "div_factor"),
    (S.Warmup, dict(schedule=0.1, warmup_steps=0), ValueError, "warmup_steps"),
    (S.Warmup, dict(schedule=-0.1, warmup_steps=5), ValueError, "schedule"),
    (S.Join, dict(schedules=[0.1, 0.2], boundaries=[]), ValueError, "schedules"),
    (S.Join, dict(schedules=[0.1, 0.2], boundaries=[0]), ValueError, "boundaries"),
    (S.PerEpoch, dict(schedule=0.1, steps_per_epoch=0), ValueError, "steps_per_epoch"),
    (S.ReduceLROnPlateau, dict(lr0=0.1, factor=1.0), ValueError, "factor"),
    (S.ReduceLROnPlateau, dict(lr0=0.1, mode="minimum"), ValueError, "mode"),
    (S.ReduceLROnPlateau, dict(lr0=0.1, threshold_mode="relative"), ValueError,
     "threshold_mode"),
    (S.ReduceLROnPlateau, dict(lr0=0.1, patience=-1), ValueError, "patience"),
    (S.ReduceLROnPlateau, dict(lr0=0.1, cooldown=1.5), ValueError, "cooldown"),
]


@pytest.mark.parametrize("cls, kwargs, exc, name", BAD_ARGS,
                         ids=[f"{c[0].__name__}-{c[3]}" for c in BAD_ARGS])
def test_bad_arguments(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kwargs)
