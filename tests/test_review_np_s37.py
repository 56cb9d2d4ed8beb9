"""Regression tests for what a review of the NumPy-facing API found (stop 37): steps of the
NumPy classes that wrote some groups and then failed, arguments that reached the kernel or
NumPy unchecked, and errors that named nothing. Each test failed before its fix."""

import numpy as np
import pytest

import fastoptim
from fastoptim.quant import MIN_QUANTIZED_SIZE, QuantizedState

N = MIN_QUANTIZED_SIZE  # large enough for quantized states


def two_groups(cls, **kw):
    params = [np.ones(N, np.float32), np.ones(N, np.float32)]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], **kw)
    return opt, params


def snapshot(opt, params):
    states = {i: {k: (v.codes.copy(), v.absmax.copy()) if isinstance(v, QuantizedState)
                  else v.copy() for k, v in s.items()} for i, s in opt.state.items()}
    return [p.copy() for p in params], states, list(opt._steps)


def assert_unchanged(opt, params, before):
    ps, states, steps = before
    for p, q in zip(params, ps):
        np.testing.assert_array_equal(p, q)
    for i, s in opt.state.items():
        for k, v in s.items():
            if isinstance(v, QuantizedState):
                np.testing.assert_array_equal(v.codes, states[i][k][0])
                np.testing.assert_array_equal(v.absmax, states[i][k][1])
            else:
                np.testing.assert_array_equal(v, states[i][k])
    assert list(opt._steps) == steps


# ---- a step is all or nothing across groups --------------------------------------------------

def test_nan_absmax_in_a_later_group_refuses_the_whole_step():
    """A NaN gradient makes a block's absmax NaN; the next step refused it only when group 1's
    call ran, after group 0 had been updated (steps [2, 1])."""
    opt, params = two_groups(fastoptim.Adam, lr=0.1, state_dtype="int8")
    g = [np.full(N, 0.5, np.float32), np.full(N, 0.5, np.float32)]
    g[1][7] = np.nan
    opt.step(g)
    assert np.isnan(opt.state[1]["exp_avg"].absmax[0])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\]\.absmax\[0\] is nan"):
        opt.step([np.full(N, 0.5, np.float32), np.full(N, 0.5, np.float32)])
    assert_unchanged(opt, params, before)


def test_asgd_scalars_that_overflow_refuse_the_whole_step():
    """eta = lr / (1 + lambd*lr*t)**alpha overflowed in Python's ** for group 1 after group
    0 had been updated, as a bare OverflowError."""
    params = [np.ones(8, np.float32), np.ones(8, np.float32)]
    opt = fastoptim.ASGD([{"params": [params[0]]},
                          {"params": [params[1]], "lambd": 1e100, "alpha": 4.0}], lr=0.1)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*overflow at step 1"):
        opt.step([np.ones(8, np.float32), np.ones(8, np.float32)])
    assert_unchanged(opt, params, before)
    # the scalars of group 0 did not advance either: a later step is the same as the first
    opt.param_groups[1]["lambd"] = 1e-4
    opt.param_groups[1]["alpha"] = 0.75
    ref = fastoptim.ASGD([{"params": [np.ones(8, np.float32)]},
                          {"params": [np.ones(8, np.float32)]}], lr=0.1)
    ref.step([np.ones(8, np.float32), np.ones(8, np.float32)])
    opt.step([np.ones(8, np.float32), np.ones(8, np.float32)])
    for p, q in zip(params, ref.param_groups):
        np.testing.assert_array_equal(p, q["params"][0])


def test_loaded_step_at_the_kernels_bound_is_refused_at_load():
    """load_state_dict took step = 2**53; the next step updated group 0, then the kernel
    refused step 2**53 + 1 for group 1."""
    opt, params = two_groups(fastoptim.Adam, lr=0.1)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = 2**53
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"\['step'\] must be >= 0 and < 2\*\*53"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, before)
    for entry in sd["state"].values():
        entry["step"] = 2**53 - 1  # the last step count that leaves room for one more
    opt.load_state_dict(sd)
    opt.step([np.ones(N, np.float32), np.ones(N, np.float32)])
    assert opt._steps == [2**53, 2**53]


def test_a_param_group_may_not_alias_another_groups_state():
    """add_param_group checked new params against params only: a state given as a param was
    then written twice a step."""
    p = np.ones(16, np.float32)
    opt = fastoptim.Adam([p], lr=0.1)
    with pytest.raises(ValueError, match=r"shares memory with state\[0\]\['exp_avg'\]"):
        opt.add_param_group({"params": [opt.state[0]["exp_avg"]]})
    with pytest.raises(ValueError, match=r"shares memory with state\[0\]\['exp_avg_sq'\]"):
        opt.add_param_group({"params": [opt.state[0]["exp_avg_sq"][4:8]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [np.ones(16, np.float32)]})  # an array of its own is fine


def test_float_state_with_nan_is_refused_when_loaded_into_a_quantized_state():
    """A float array with a NaN was quantized on load to a NaN absmax that every later step
    refused; a saved QuantizedState with a NaN absmax was refused at load already."""
    opt, params = two_groups(fastoptim.Adam, lr=0.1, state_dtype="int8")
    sd = opt.state_dict()
    x = np.zeros(N, np.float32)
    x[3] = np.nan
    sd["state"][1]["exp_avg"] = x
    with pytest.raises(ValueError, match=r"\[1\]\['exp_avg'\] has a NaN or Inf"):
        opt.load_state_dict(sd)
    sd["state"][1]["exp_avg"] = np.full(N, 1e300)  # float64 that overflows float32
    with pytest.raises(ValueError, match=r"\[1\]\['exp_avg'\] has a NaN or Inf"):
        opt.load_state_dict(sd)
    sd["state"][1]["exp_avg"] = np.full(N, 0.25)
    opt.load_state_dict(sd)
    np.testing.assert_allclose(opt.state[1]["exp_avg"].to_float(), 0.25)


# ---- scalar arguments ------------------------------------------------------------------------

def test_huge_integer_hyperparameters_name_the_argument():
    p = [np.ones(4, np.float32)]
    with pytest.raises(ValueError, match="invalid lr: too large for a float"):
        fastoptim.SGD(p, lr=10**400)
    with pytest.raises(ValueError, match="invalid t0: too large for a float"):
        fastoptim.ASGD(p, t0=10**400)
    with pytest.raises(ValueError, match=r"invalid etas\[1\]: too large for a float"):
        fastoptim.Rprop(p, etas=(0.5, 10**400))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "x"}, "asgd_: lr must be a real number, got str"),
    ({"lr": float("nan")}, "asgd_: lr must be a finite number >= 0, got nan"),
    ({"alpha": None}, "asgd_: alpha must be a real number, got NoneType"),
    ({"alpha": -1.0}, "asgd_: alpha must be a finite number >= 0, got -1.0"),
    ({"t0": float("nan")}, "asgd_: t0 must not be NaN"),
    ({"t0": True}, "asgd_: t0 must be a real number, got bool"),
])
def test_asgd_checks_the_arguments_it_does_not_read(kwargs, match):
    p, g, ax = np.ones(8, np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        fastoptim.asgd_(p, g, ax, eta=0.1, mu=1.0, **kwargs)
    np.testing.assert_array_equal(p, 1.0)


def test_rprop_checks_lr():
    p, g = np.ones(8, np.float32), np.ones(8, np.float32)
    prev, sizes = np.zeros(8, np.float32), np.full(8, 0.01, np.float32)
    with pytest.raises(ValueError, match="rprop_: lr must be a finite number >= 0, got nan"):
        fastoptim.rprop_(p, g, prev, sizes, lr=float("nan"))
    np.testing.assert_array_equal(p, 1.0)
    fastoptim.rprop_(p, g, prev, sizes, lr=0.5)
    assert (p < 1.0).all()


@pytest.mark.parametrize("lr", [np.array(True), np.array("0.1"), np.array("0.1", dtype=object),
                                np.timedelta64(1), np.datetime64(1, "s"), np.array([True])],
                         ids=["bool0d", "str0d", "object0d", "timedelta", "datetime", "bool1"])
def test_numpy_objects_that_are_not_real_numbers_are_refused(lr):
    """NumPy gives these a __float__ (np.array("0.1") converts to 0.1); they were taken as
    numbers."""
    p, g = np.ones(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(TypeError, match="sgd_: lr must be a real number, got numpy"):
        fastoptim.sgd_(p, g, None, lr=lr)
    np.testing.assert_array_equal(p, 1.0)


def test_numpy_and_torch_bool_refused_as_numbers_elsewhere_too():
    torch = pytest.importorskip("torch")
    a, v = np.ones(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="ema_: beta must be a real number, got numpy.ndarray"):
        fastoptim.ema_(a, v, beta=np.array(True))
    with pytest.raises(TypeError, match="ema_: beta must be a real number, got Tensor"):
        fastoptim.ema_(a, v, beta=torch.tensor(True))
    np.testing.assert_array_equal(a, 1.0)


@pytest.mark.parametrize("make", [lambda x: np.array([x]), lambda x: np.array([[x]]),
                                  lambda x: np.array(x), lambda x: np.float32(x)],
                         ids=["1-d", "2-d", "0-d", "scalar"])
def test_one_element_arrays_are_numbers(make):
    """docs/api.md: found_inf may be a 0-d or 1-element array; a 1-element 1-d array was a
    TypeError (NumPy 2's __float__ takes 0-d arrays only)."""
    p, g = np.ones(8, np.float32), np.ones(8, np.float32)
    fastoptim.sgd_(p, g, None, lr=0.5, found_inf=make(1.0))
    np.testing.assert_array_equal(p, 1.0)  # skipped
    fastoptim.sgd_(p, g, None, lr=make(0.5), found_inf=make(0.0))
    np.testing.assert_array_equal(p, 0.5)


@pytest.mark.parametrize("step", [np.array([3]), np.array(2.0), np.array([1, 2])])
def test_step_that_is_an_array_but_not_an_integer_names_step(step):
    p, g = np.ones(8, np.float32), np.ones(8, np.float32)
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="adam_: step must be an integer >= 1, got numpy.ndarray"):
        fastoptim.adam_(p, g, m, v, step=step)
    np.testing.assert_array_equal(p, 1.0)


# ---- quantized state objects -----------------------------------------------------------------

def test_quantized_state_with_huge_bits_names_it():
    p, g = np.ones(N, np.float32), np.ones(N, np.float32)
    m = QuantizedState.zeros(p.shape, bits=8)
    v = QuantizedState.zeros(p.shape, bits=8, non_negative=True)
    m.bits = 2**70
    with pytest.raises(ValueError, match=r"exp_avgs\.bits must be 8 or 4"):
        fastoptim.adam_(p, g, m, v, step=1)
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("shape", [(30, 20), (600,), (20, 30, 1)])
def test_quantized_state_of_another_shape_is_refused(shape):
    """Only the code and absmax lengths were checked: a state of 600 elements in another
    shape was taken for a (20, 30) param (a float state of that shape is refused)."""
    p, g = np.ones((20, 30), np.float32), np.ones((20, 30), np.float32)
    m = QuantizedState.zeros(shape, bits=8)
    v = QuantizedState.zeros((20, 30), bits=8, non_negative=True)
    with pytest.raises(ValueError, match=r"exp_avgs has shape \(.*\) but params has shape "
                                         r"\(20, 30\)"):
        fastoptim.adam_(p, g, m, v, step=1)
    np.testing.assert_array_equal(p, 1.0)
    m = QuantizedState.zeros((20, 30), bits=8)
    fastoptim.adam_(p, g, m, v, step=1)
    assert (p < 1.0).all()


def test_global_norm_dtype_error_names_grads():
    with pytest.raises(TypeError, match="all grads of one call share one dtype"):
        fastoptim.global_norm([np.ones(4, np.float32), np.ones(4, np.float64)])
