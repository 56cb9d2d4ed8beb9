"""The NumPy oracle (fastoptim.reference) equals torch.optim's single-tensor path.

Every case of the shared table runs 50 steps in torch (``foreach=False``, i.e.
``_single_tensor_<name>``) and in the reference on NumPy copies, with the same fresh random
gradient each step. After EVERY step, params and every entry of torch's per-parameter state
are compared: array states element by element, the step count and the 0-d scalar states
(NAdam's mu_product, ASGD's eta and mu, carried by optimizer_cases.step_kwargs) exactly.
"""

import numpy as np
import pytest

from fastoptim import reference
from optimizer_cases import (CASES as ALL_CASES, STATE_ARGS, active_states, case_id, full_hyper,
                             initial_scalars, initial_state, step_kwargs)

torch = pytest.importorskip("torch")

STEPS = 50
SHAPES = [(37,), (3, 5)]

# Tolerances, checked after every one of 50 steps. torch's CPU loops fuse some operations
# (add with alpha and lerp use fma) where NumPy rounds twice, so the two differ by an ulp or
# so per operation, and the differences carry over from step to step.
# float64: ulp ~1e-16, a few per step over 50 steps stays far below 1e-12.
# float32: ulp ~6e-8, a few per step over 50 steps stays below 1e-5.
RTOL = {np.float64: 1e-12, np.float32: 1e-5}
# atol, in ulps of the array's scale (atol_for): a value that cancels to near zero (params
# crossing zero, exp_avg / grad_avg / momentum_buffer / ax averaging signed values) carries
# the rounding error of its OPERANDS, which are as large as the array's values.
ATOL_ULPS = 16


def atol_for(expected):
    """ATOL_ULPS units of roundoff of the array's scale: max(1, largest finite |value|)."""
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    return ATOL_ULPS * np.finfo(expected.dtype).eps * scale


def random_params(rng, shape, dtype):
    return rng.uniform(-2.0, 2.0, shape).astype(dtype)


def random_grads(rng, shape, dtype):
    """Random sign, |grad| in [0.5, 2], every 7th exactly zero.

    With params in [-2, 2] and weight_decay <= 0.1, g = grad + weight_decay*p never cancels
    towards zero: torch rounds that sum once (fma), NumPy twice, and a cancelled g would feed
    a division by sqrt(v) + eps that amplifies the difference without bound (an
    ill-conditioned input, not a bug). Exact zeros exercise the eps-dominated 0/eps path
    (and Rprop's sign(0) = 0, which keeps the step size).
    """
    g = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    g.reshape(-1)[::7] = 0.0
    return g.astype(dtype)


# fastoptim argument name -> torch state name, per rule.
STATE_NAMES = {
    "sgd": {"momentum_buffers": "momentum_buffer"},
    "rmsprop": {"square_avgs": "square_avg", "grad_avgs": "grad_avg",
                "momentum_buffers": "momentum_buffer"},
    "adam": {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq",
             "max_exp_avg_sqs": "max_exp_avg_sq"},
    "adagrad": {"state_sums": "sum"},
    "adadelta": {"square_avgs": "square_avg", "acc_deltas": "acc_delta"},
    "nadam": {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq"},
    "adamax": {"exp_avgs": "exp_avg", "exp_infs": "exp_inf"},
    "asgd": {"axs": "ax"},
    "rprop": {"prevs": "prev", "step_sizes": "step_size"},
}
STATE_NAMES["adamw"] = STATE_NAMES["adam"]
STATE_NAMES["radam"] = STATE_NAMES["nadam"]

TORCH_CLASS = {"sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW",
               "adagrad": "Adagrad", "adadelta": "Adadelta", "nadam": "NAdam",
               "radam": "RAdam", "adamax": "Adamax", "asgd": "ASGD", "rprop": "Rprop"}

# torch.optim keeps a "step" in every state of these rules (SGD, RMSprop and Adadelta too).
TORCH_COUNTS_STEPS = set(TORCH_CLASS) - {"sgd"}

# The shared table of cases (optimizer_cases.py) without ema and lion, which torch.optim lacks
# (test_lion_matches_the_papers_algorithm checks lion).
CASES = [case for case in ALL_CASES if case[0] not in ("ema", "lion")]


def torch_kwargs(rule, hyper):
    """fastoptim hyperparameters -> torch.optim constructor arguments."""
    h = full_hyper(rule, hyper)
    kwargs = {k: v for k, v in hyper.items()
              if k not in ("beta1", "beta2", "etaminus", "etaplus", "step_size_min",
                           "step_size_max")}
    if "beta1" in hyper or "beta2" in hyper:
        kwargs["betas"] = (h["beta1"], h["beta2"])
    if rule == "rprop":
        kwargs["etas"] = (h["etaminus"], h["etaplus"])
        kwargs["step_sizes"] = (h["step_size_min"], h["step_size_max"])
    return kwargs


@pytest.fixture
def torch_scalar_dtype(dtype):
    """torch keeps step, mu_product, eta and mu in its default dtype (float32 unless set):
    float64 runs set float64 so that those match the reference's float64 scalars."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    yield dtype
    torch.set_default_dtype(saved)


def assert_close(actual, expected, dtype, where):
    assert actual.dtype == dtype and actual.shape == expected.shape, where
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=atol_for(expected),
                               err_msg=where)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_torch(case, dtype, torch_scalar_dtype):
    rule, hyper = case
    rng = np.random.default_rng(0)
    params = [random_params(rng, shape, dtype) for shape in SHAPES]
    states = {name: [np.full(shape, initial_state(rule, name, hyper), dtype) for shape in SHAPES]
              for name in active_states(rule, hyper)}
    scalars = initial_scalars(rule, hyper, torch_scalar_dtype)
    ref_hyper = {k: v for k, v in hyper.items() if k != "initial_accumulator_value"}
    update = getattr(reference, rule + "_")

    t_params = [torch.tensor(p) for p in params]
    optimizer = getattr(torch.optim, TORCH_CLASS[rule])(t_params, foreach=False,
                                                        **torch_kwargs(rule, hyper))
    expected_keys = {STATE_NAMES[rule][name] for name in states} | set(scalars)
    if rule in TORCH_COUNTS_STEPS:
        expected_keys.add("step")

    for step in range(1, STEPS + 1):
        grads = [random_grads(rng, shape, dtype) for shape in SHAPES]
        for p, g in zip(t_params, grads):
            p.grad = torch.tensor(g)
        optimizer.step()
        kwargs, scalars = step_kwargs(rule, hyper, step, scalars)
        update(params, grads, **states, **kwargs, **ref_hyper)

        for i, (t_param, param) in enumerate(zip(t_params, params)):
            where = f"{rule} step {step}"
            assert_close(param, t_param.numpy(), dtype, f"{where}: params[{i}]")
            torch_state = optimizer.state[t_param]
            assert set(torch_state) == expected_keys, where
            for name, arrays in states.items():
                assert_close(arrays[i], torch_state[STATE_NAMES[rule][name]].numpy(), dtype,
                             f"{where}: {name}[{i}]")
            for name, value in scalars.items():
                # The carried scalars must be torch's, bit for bit, in torch's dtype.
                t_value = torch_state[name]
                assert t_value.dtype == torch.from_numpy(value).dtype, f"{where}: {name}"
                assert t_value.item() == float(value), f"{where}: {name}"
            if "step" in torch_state:
                assert torch_state["step"].item() == step, where


@pytest.mark.parametrize("dtype", [np.float64], ids=["float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonfinite_grads_propagate_like_torch(case, dtype, torch_scalar_dtype):
    """NaN, +inf and -inf gradients (new positions each step) give torch's NaN/inf pattern in
    params and every state.

    Note [lerp with weight >= 0.5]: torch's lerp(self, end, w) computes
    ``end - (end - self)*(1 - w)`` when w >= 0.5, the reference (like the kernels)
    ``self + w*(end - self)``. With end = +-inf and w = 1 - beta1 >= 0.5 torch's exp_avg
    becomes NaN (inf - inf) where the reference's is +-inf; the params are NaN in both.
    Only that difference is allowed, only there.
    """
    rule, hyper = case
    rng = np.random.default_rng(5)
    params = [random_params(rng, (37,), dtype)]
    states = {name: [np.full((37,), initial_state(rule, name, hyper), dtype)]
              for name in active_states(rule, hyper)}
    scalars = initial_scalars(rule, hyper, torch_scalar_dtype)
    ref_hyper = {k: v for k, v in hyper.items() if k != "initial_accumulator_value"}
    t_param = torch.tensor(params[0])
    optimizer = getattr(torch.optim, TORCH_CLASS[rule])([t_param], foreach=False,
                                                        **torch_kwargs(rule, hyper))
    lerp_weight = 1 - full_hyper(rule, hyper).get("beta1", 0.9)
    for step in range(1, 5):
        grads = [random_grads(rng, (37,), dtype)]
        grads[0][[step, 9 + step, 35 - step]] = [np.nan, np.inf, -np.inf]
        t_param.grad = torch.tensor(grads[0])
        optimizer.step()
        kwargs, scalars = step_kwargs(rule, hyper, step, scalars)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            getattr(reference, rule + "_")(params, grads, **states, **kwargs, **ref_hyper)
        where = f"{rule} step {step}"
        with np.errstate(invalid="ignore"):
            assert_close(params[0], t_param.numpy(), dtype, f"{where}: params")
        for name, arrays in states.items():
            actual = arrays[0]
            expected = optimizer.state[t_param][STATE_NAMES[rule][name]].numpy()
            if name == "exp_avgs" and lerp_weight >= 0.5:
                actual = np.where(np.isnan(expected) & np.isinf(actual), np.nan, actual)
            with np.errstate(invalid="ignore"):
                assert_close(actual, expected, dtype, f"{where}: {name}")
    if rule == "rprop":
        # torch.sign(NaN) = 0 and inf moves by one step size (Note [Rprop and NaN]).
        assert np.isfinite(params[0]).all()
    else:
        assert not np.isfinite(params[0]).all(), "non-finite grads never reached params"


def test_cases_reach_every_branch():
    """The cases drive each rule through the branches the torch comparison must cover."""
    def radam_rectified(hyper, step):
        beta2 = full_hyper("radam", hyper)["beta2"]
        rho_inf = 2 / (1 - beta2) - 1
        return rho_inf - 2 * step * beta2**step / (1 - beta2**step) > 5.0

    for rule, hyper in CASES:
        if rule == "radam":
            branches = {radam_rectified(hyper, step) for step in range(1, STEPS + 1)}
            assert branches == {False, True}, hyper
        if rule == "asgd" and full_hyper(rule, hyper)["t0"] < STEPS - 2:
            scalars, mus = initial_scalars(rule, hyper), []
            for step in range(1, STEPS + 1):
                kwargs, scalars = step_kwargs(rule, hyper, step, scalars)
                mus.append(kwargs["mu"])
            assert mus[0] == 1.0 and min(mus) < 1.0, hyper
    # Rprop: step sizes reach both bounds (with the gradients the torch test uses).
    bounded = [(r, h) for r, h in CASES if r == "rprop" and "step_size_min" in h]
    assert bounded
    for rule, hyper in bounded:
        h = full_hyper(rule, hyper)
        rng = np.random.default_rng(0)
        params = [random_params(rng, shape, np.float64) for shape in SHAPES]
        prevs = [np.zeros(shape) for shape in SHAPES]
        step_sizes = [np.full(shape, h["lr"]) for shape in SHAPES]
        hit_min = hit_max = False
        for _ in range(STEPS):
            grads = [random_grads(rng, shape, np.float64) for shape in SHAPES]
            reference.rprop_(params, grads, prevs, step_sizes, **hyper)
            hit_min |= any((s == h["step_size_min"]).any() for s in step_sizes)
            hit_max |= any((s == h["step_size_max"]).any() for s in step_sizes)
        assert hit_min and hit_max, hyper


def test_every_rule_with_states_is_compared_with_torch():
    """Each rule of the table (except ema) has a torch class and a name for every state."""
    for rule in {rule for rule, _ in CASES}:
        assert rule in TORCH_CLASS
        assert set(STATE_NAMES.get(rule, {})) == set(STATE_ARGS[rule]), rule


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_ema_matches_torch_lerp(dtype):
    rng = np.random.default_rng(1)
    beta = 0.95
    average = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
    t_average = [torch.tensor(a) for a in average]
    for _ in range(STEPS):
        values = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
        for a, v in zip(t_average, values):
            a.lerp_(torch.tensor(v), 1 - beta)
        reference.ema_(average, values, beta=beta)
    for expected, actual in zip(t_average, average):
        np.testing.assert_allclose(actual, expected.numpy(), rtol=RTOL[dtype],
                                   atol=atol_for(expected.numpy()))


def test_single_array_equals_one_element_list():
    rng = np.random.default_rng(2)
    p, g = rng.standard_normal(11), rng.standard_normal(11)
    m, v = np.zeros(11), np.zeros(11)
    p_list, m_list, v_list = [p.copy()], [m.copy()], [v.copy()]
    reference.adam_(p, g, m, v, step=1, lr=0.1)
    reference.adam_(p_list, (g,), m_list, v_list, step=1, lr=0.1)
    for single, listed in [(p, p_list), (m, m_list), (v, v_list)]:
        assert np.array_equal(single, listed[0])


class _Float32Only(np.ndarray):
    """An ndarray whose every ufunc call asserts float32 operands and float32 results."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        def plain(x):
            return x.view(np.ndarray) if isinstance(x, np.ndarray) else x

        inputs = [plain(x) for x in inputs]
        for x in inputs + [plain(o) for o in out or ()]:
            if isinstance(x, (np.ndarray, np.generic)):
                assert x.dtype == np.float32, f"{ufunc.__name__} got a {x.dtype} operand"
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if result.dtype == np.bool_:
            # A comparison (Rprop's sign tests): its operands were checked above.
            return result
        assert result.dtype == np.float32, f"{ufunc.__name__} returned {result.dtype}"
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(_Float32Only)


@pytest.mark.parametrize("case", CASES + [("ema", {})], ids=case_id)
def test_reference_computes_float32_in_float32(case):
    """No intermediate of a float32 update is promoted to float64, even with NumPy scalars."""
    rule, hyper = case
    rng = np.random.default_rng(3)

    def array(fill=None):
        values = rng.standard_normal(13) if fill is None else np.full(13, fill)
        return values.astype(np.float32).view(_Float32Only)

    # NumPy float64 scalars would promote float32 arrays; the reference must not let them.
    hyper = {k: (np.float64(v) if isinstance(v, float) else v) for k, v in hyper.items()
             if k != "initial_accumulator_value"}
    if rule == "ema":
        average = array()
        reference.ema_(average, array(), beta=np.float64(0.9))
        assert average.dtype == np.float32
        return
    params = [array()]
    states = {name: [array(initial_state(rule, name, hyper))]
              for name in active_states(rule, hyper)}
    scalars = initial_scalars(rule, hyper, np.float32)
    for step in (1, 2):
        extra, scalars = step_kwargs(rule, hyper, step, scalars)
        extra = {k: (np.int64(v) if k == "step" else np.float64(v)) for k, v in extra.items()}
        getattr(reference, rule + "_")(params, [array()], **states, **extra, **hyper)
    for arrays in [params, *states.values()]:
        assert arrays[0].dtype == np.float32
        assert np.all(np.isfinite(arrays[0].view(np.ndarray)))


@pytest.mark.parametrize("rule, missing, hyper", [
    ("sgd", "momentum_buffers", dict(momentum=0.9, step=1)),
    ("rmsprop", "grad_avgs", dict(centered=True, square_avgs=[np.zeros(3)])),
    ("rmsprop", "momentum_buffers", dict(momentum=0.9, square_avgs=[np.zeros(3)])),
    ("adam", "max_exp_avg_sqs", dict(amsgrad=True, step=1, exp_avgs=[np.zeros(3)],
                                     exp_avg_sqs=[np.zeros(3)])),
    ("sgd", "step", dict(momentum=0.9, momentum_buffers=[np.zeros(3)])),
    ("adagrad", "step", dict(step=None, state_sums=[np.zeros(3)])),
    ("nadam", "mu_product", dict(step=1, mu_product=None, exp_avgs=[np.zeros(3)],
                                 exp_avg_sqs=[np.zeros(3)])),
    ("radam", "exp_avg_sqs", dict(step=1, exp_avgs=[np.zeros(3)], exp_avg_sqs=None)),
    ("adamax", "step", dict(step=0, exp_avgs=[np.zeros(3)], exp_infs=[np.zeros(3)])),
    ("asgd", "axs", dict(axs=None, eta=0.01, mu=1.0)),
    ("rprop", "step_sizes", dict(prevs=[np.zeros(3)], step_sizes=None)),
])
def test_missing_state_raises(rule, missing, hyper):
    with pytest.raises(ValueError, match=missing):
        getattr(reference, rule + "_")([np.zeros(3)], [np.ones(3)], **hyper)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("hyper", [h for r, h in ALL_CASES if r == "lion"],
                         ids=lambda h: case_id(("lion", h)))
def test_lion_matches_the_papers_algorithm(hyper, dtype):
    """Lion, Algorithm 2 of Chen et al. 2023, written a second time with torch ops the way
    lion-pytorch writes it (sign_ of the interpolation, decoupled decay), 50 steps, every
    element of params and exp_avg compared after each."""
    h = full_hyper("lion", hyper)
    rng = np.random.default_rng(11)
    p = rng.uniform(-2, 2, 1000).astype(dtype)
    m = np.zeros_like(p)
    tp, tm = torch.from_numpy(p.copy()), torch.zeros(1000, dtype=tp_dtype(dtype))
    for _ in range(50):
        grad = rng.standard_normal(1000).astype(dtype)
        grad[::9] = 0.0  # c = 0 on the first step there: sign(0) = 0
        reference.lion_(p, grad, m, **hyper)
        g = -torch.from_numpy(grad) if h["maximize"] else torch.from_numpy(grad)
        tp.mul_(1 - h["lr"] * h["weight_decay"])
        update = tm.clone().mul_(h["beta1"]).add(g, alpha=1 - h["beta1"]).sign_()
        tp.add_(update, alpha=-h["lr"])
        tm.mul_(h["beta2"]).add_(g, alpha=1 - h["beta2"])
        rtol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(p, tp.numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(m, tm.numpy(), rtol=rtol, atol=rtol)


def tp_dtype(dtype):
    return torch.float32 if dtype == np.float32 else torch.float64
