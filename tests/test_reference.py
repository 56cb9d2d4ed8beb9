"""The NumPy oracle (fastoptim.reference) equals torch.optim's single-tensor path.

Every optimizer runs 30 steps in torch (``foreach=False``, i.e. ``_single_tensor_<name>``) and
in the reference on NumPy copies, with the same fresh random gradient each step; params and
every state buffer are compared element by element.
"""

import numpy as np
import pytest

from fastoptim import reference
from optimizer_cases import CASES as ALL_CASES, active_states, case_id

torch = pytest.importorskip("torch")

STEPS = 30
SHAPES = [(37,), (3, 5)]

# Tolerances after 30 steps. torch's CPU loops fuse some operations (add with alpha and lerp
# use fma) where NumPy rounds twice, so the two differ by an ulp or so per operation.
# float64: ulp ~1e-16, a few per step over 30 steps stays far below 1e-12.
# float32: ulp ~6e-8, a few per step over 30 steps stays below 1e-5.
RTOL = {np.float64: 1e-12, np.float32: 1e-5}
# atol, in ulps of the array's scale (atol_for): a value that cancels to near zero (params
# crossing zero, exp_avg / grad_avg / momentum_buffer averaging signed gradients) carries
# the rounding error of its OPERANDS, which are as large as the array's values.
ATOL_ULPS = 16


def atol_for(expected):
    """ATOL_ULPS units of roundoff of the array's scale: max(1, largest |value|)."""
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    return ATOL_ULPS * np.finfo(expected.dtype).eps * scale


def random_params(rng, shape, dtype):
    return rng.uniform(-2.0, 2.0, shape).astype(dtype)


def random_grads(rng, shape, dtype):
    """Random sign, |grad| in [0.5, 2], every 7th exactly zero.

    With params in [-2, 2] and weight_decay <= 0.1, g = grad + weight_decay*p never cancels
    towards zero: torch rounds that sum once (fma), NumPy twice, and a cancelled g would feed
    a division by sqrt(v) + eps that amplifies the difference without bound (an
    ill-conditioned input, not a bug). Exact zeros exercise the eps-dominated 0/eps path.
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
}
STATE_NAMES["adamw"] = STATE_NAMES["adam"]

TORCH_CLASS = {"sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW",
               "adagrad": "Adagrad", "adadelta": "Adadelta"}

# The shared table of cases (optimizer_cases.py) without ema, which torch.optim lacks.
CASES = [case for case in ALL_CASES if case[0] != "ema"]






def torch_kwargs(hyper):
    """fastoptim hyperparameters -> torch.optim constructor arguments."""
    kwargs = {k: v for k, v in hyper.items() if k not in ("beta1", "beta2")}
    if "beta1" in hyper or "beta2" in hyper:
        kwargs["betas"] = (hyper.get("beta1", 0.9), hyper.get("beta2", 0.999))
    return kwargs


def initial_state(rule, name, shape, dtype, hyper):
    """The state torch starts from (zeros, or ``initial_accumulator_value`` for Adagrad)."""
    if rule == "adagrad":
        return np.full(shape, hyper.get("initial_accumulator_value", 0.0), dtype)
    if rule == "sgd":
        # torch has no buffer before step 1; NaN proves the reference overwrites it on step 1.
        return np.full(shape, np.nan, dtype)
    return np.zeros(shape, dtype)


def run_both(rule, hyper, dtype, seed=0):
    """Run torch and the reference for STEPS steps; return (torch_result, reference_result).

    Each result is a dict: "params" -> list of arrays, state name -> list of arrays.
    """
    rng = np.random.default_rng(seed)
    params0 = [random_params(rng, shape, dtype) for shape in SHAPES]
    grads = [[random_grads(rng, shape, dtype) for shape in SHAPES] for _ in range(STEPS)]
    states = active_states(rule, hyper)

    t_params = [torch.tensor(p) for p in params0]
    optimizer = getattr(torch.optim, TORCH_CLASS[rule])(t_params, foreach=False,
                                                        **torch_kwargs(hyper))
    for step_grads in grads:
        for p, g in zip(t_params, step_grads):
            p.grad = torch.tensor(g)
        optimizer.step()
    torch_result = {"params": [p.numpy() for p in t_params]}
    for name in states:
        torch_name = STATE_NAMES[rule][name]
        torch_result[name] = [optimizer.state[p][torch_name].numpy() for p in t_params]

    ref_hyper = {k: v for k, v in hyper.items() if k != "initial_accumulator_value"}
    ref_result = {"params": [p.copy() for p in params0]}
    for name in states:
        ref_result[name] = [initial_state(rule, name, s, dtype, hyper) for s in SHAPES]
    update = getattr(reference, rule + "_")
    for step, step_grads in enumerate(grads, start=1):
        state_args = {name: ref_result[name] for name in states}
        if rule in ("sgd", "adam", "adamw", "adagrad"):
            state_args["step"] = step
        update(ref_result["params"], step_grads, **state_args, **ref_hyper)
    return torch_result, ref_result


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_torch(case, dtype):
    rule, hyper = case
    torch_result, ref_result = run_both(rule, hyper, dtype)
    assert torch_result.keys() == ref_result.keys()
    for name, torch_arrays in torch_result.items():
        for i, (expected, actual) in enumerate(zip(torch_arrays, ref_result[name])):
            assert actual.dtype == dtype
            np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype],
                                       atol=atol_for(expected), err_msg=f"{rule} {name}[{i}]")


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
    states = {name: [array(0.0)] for name in active_states(rule, hyper)}
    for step in (1, 2):
        extra = {"step": np.int64(step)} if rule in ("sgd", "adam", "adamw", "adagrad") else {}
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
])
def test_missing_state_raises(rule, missing, hyper):
    with pytest.raises(ValueError, match=missing):
        getattr(reference, rule + "_")([np.zeros(3)], [np.ones(3)], **hyper)
