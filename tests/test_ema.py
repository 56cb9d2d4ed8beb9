"""fastoptim.ema (EMA, ModelEMA) and the fused kernel fastoptim.ema_ it is built on.

Tolerances, with their reasons:

* Kernel against the NumPy reference: the kernel computes ``fma(1-beta, v - avg, avg)`` (one
  rounding), NumPy rounds ``(1-beta)*(v-avg)`` and the sum separately: at most an ulp or two
  of the operands per step, and earlier differences are damped by ``beta`` each step. rtol 1e-6
  (float32) / 1e-13 (float64), plus an atol of 8 ulps of the values' scale where the average
  cancels to near zero.

* Bias-corrected average of a constant stream ``c``. Exactly, ``avg_t = c * (1 - beta**t)`` and
  the corrected value is ``c``. Each update adds at most ~2 roundings of size ``u*|c|`` (``u``
  the unit roundoff, eps/2) to the error of ``avg_t``, and each step multiplies the error
  carried so far by ``beta``: so ``|avg_t - c*(1-beta**t)| <= 2u|c| * (1-beta**t)/(1-beta)``.
  Dividing by ``1 - beta**t`` leaves ``2u/(1-beta)``, plus ~3u for the division and the
  denominator (``1-beta`` rounded to the array's dtype in the kernel, ``beta**t`` in float64).
  Hence ``rtol = eps * (1/(1-beta) + 2)``: a few ulps, not growing with ``t``. At step 1 the
  value is ``fl(fl(a*c)/a)`` with ``a = fl(1-beta)``: within one ulp of ``c``.

* Uncorrected average against the closed form ``(1-beta) * sum_i beta**(t-i) * x_i`` (float64):
  the same error propagation with ``|x_i| <= X``: absolute error ``eps * X * (1/(1-beta) + 2)``.
"""
import math

import numpy as np
import pytest

import fastoptim
from fastoptim import optim, reference
from fastoptim.ema import EMA, ModelEMA

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 4099, 2**20 + 3]
BETAS = [0.0, 0.5, 0.9, 0.99, 0.999]
KERNEL_RTOL = {np.float32: 1e-6, np.float64: 1e-13}


def eps(dtype):
    return float(np.finfo(dtype).eps)


def constant_rtol(dtype, beta):
    return eps(dtype) * (1.0 / (1.0 - beta) + 2.0)


@pytest.fixture(params=fastoptim.backend_info()["isas_supported"])
def isa(request):
    before = fastoptim.backend_info()["isa"]
    fastoptim.set_isa(request.param)
    yield request.param
    fastoptim.set_isa(before)


# ---------------------------------------------------------------------------------------------
# The kernel.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_kernel_matches_reference(isa, dtype, size):
    rng = np.random.default_rng(size)
    steps = 3 if size > 10_000 else 12
    values = [rng.standard_normal(size).astype(dtype) * 3 for _ in range(steps)]
    scale = max(1.0, max((float(np.abs(v).max()) for v in values if v.size), default=1.0))
    for beta in (0.3, 0.9, 0.999):
        got = np.zeros(size, dtype)
        want = np.zeros(size, dtype)
        for v in values:
            fastoptim.ema_(got, v, beta=beta)
            reference.ema_(want, v, beta=beta)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=KERNEL_RTOL[dtype],
                                   atol=8 * eps(dtype) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_list_of_arrays(dtype):
    rng = np.random.default_rng(1)
    shapes = [(3, 5), (17,), (1,), (0,), (2, 3, 4)]
    avgs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    vals = [rng.standard_normal(s).astype(dtype) for s in shapes]
    want = [a.copy() for a in avgs]
    fastoptim.ema_(avgs, vals, beta=0.8)
    reference.ema_(want, vals, beta=0.8)
    for a, w in zip(avgs, want):
        np.testing.assert_allclose(a, w, rtol=KERNEL_RTOL[dtype], atol=8 * eps(dtype) * 4)


# ---------------------------------------------------------------------------------------------
# EMA of a stream of numbers.

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("c", [3.7, -1e5, 1e-3, 1.0])
def test_ema_constant_stream_is_the_constant(beta, c):
    ema = EMA(beta)
    rtol = constant_rtol(np.float64, beta) * 2  # two roundings in beta*avg + (1-beta)*x
    for t in range(1, 3001):
        value = ema.update(c)
        if t == 1:
            assert value == pytest.approx(c, rel=eps(np.float64), abs=0)
        assert math.isclose(value, c, rel_tol=rtol, abs_tol=0), (t, value)
    assert ema.t == 3000 and ema.value == value


@pytest.mark.parametrize("beta", BETAS)
def test_ema_uncorrected_closed_form(beta):
    rng = np.random.default_rng(3)
    xs = rng.uniform(-2, 5, size=400)
    ema = EMA(beta, bias_correction=False)
    corrected = EMA(beta)
    for t, x in enumerate(xs, start=1):
        got = ema.update(x)
        w = (1 - beta) * beta ** (t - np.arange(1, t + 1))  # weights of x_1..x_t
        want = float(np.dot(w, xs[:t]))
        assert abs(got - want) <= 2 * eps(np.float64) * 5 * (1 / (1 - beta) + 2), t
        corr = corrected.update(x)
        assert corr == pytest.approx(want / (1 - beta ** t), rel=1e-12,
                                     abs=1e-12 / (1 - beta ** t))


def test_ema_bias_correction_matters_early():
    ema, raw = EMA(0.9), EMA(0.9, bias_correction=False)
    for x in (10.0, 10.0):
        ema.update(x)
        raw.update(x)
    assert ema.value == pytest.approx(10.0) and raw.value == pytest.approx(1.9)


def test_ema_errors_and_reset():
    with pytest.raises(RuntimeError, match="update"):
        EMA(0.9).value
    for bad in (1.0, -0.1, float("nan"), 2):
        with pytest.raises(ValueError, match="beta"):
            EMA(bad)
    with pytest.raises(TypeError, match="beta"):
        EMA("0.9")
    with pytest.raises(TypeError, match="bias_correction"):
        EMA(0.9, bias_correction=1)
    ema = EMA(0.5)
    ema.update(4.0)
    ema.reset()
    assert ema.t == 0 and ema.average == 0.0 and ema.update(2.0) == 2.0
    assert "beta=0.5" in repr(ema)


# ---------------------------------------------------------------------------------------------
# ModelEMA.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99, 0.999])
def test_model_ema_constant_is_the_constant(dtype, beta):
    c = np.array([3.7, -1e5, 1e-3, 1.0, 0.1, 7.0, -2.5, 1e4, 0.3], dtype=dtype)
    params = [c.copy(), c[:5].copy()]
    ema = ModelEMA(params, beta)
    for t in range(1, 201):
        ema.update()
        corrected = ema.corrected()
        if t == 1:
            np.testing.assert_allclose(corrected[0], c, rtol=eps(dtype), atol=0)
        np.testing.assert_allclose(corrected[0], c, rtol=constant_rtol(dtype, beta), atol=0)
        np.testing.assert_allclose(corrected[1], c[:5], rtol=constant_rtol(dtype, beta),
                                   atol=0)
        assert corrected[0].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_model_ema_uncorrected_closed_form(dtype, beta):
    rng = np.random.default_rng(7)
    xs = rng.uniform(-1, 1, size=(60, 33))
    p = np.zeros(33, dtype)
    ema = ModelEMA(p, beta, bias_correction=False)
    for t in range(1, len(xs) + 1):
        p[...] = xs[t - 1]  # the tracked array changes in place
        ema.update()
        w = (1 - beta) * beta ** (t - np.arange(1, t + 1))
        want = w @ xs[:t].astype(dtype).astype(np.float64)
        atol = eps(dtype) * 1.0 * (1 / (1 - beta) + 2)
        np.testing.assert_allclose(ema.averages[0], want, rtol=0, atol=atol)
        np.testing.assert_array_equal(ema.corrected()[0], ema.averages[0])


def test_model_ema_mixed_dtypes_follow_an_optimizer():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal(2).astype(np.float32)]
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    ema = ModelEMA(params, 0.95)
    shadow = [np.zeros_like(p) for p in params]
    for t in range(1, 31):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
        ema.update()
        reference.ema_(shadow[:1] + shadow[2:], params[:1] + params[2:], beta=0.95)
        reference.ema_(shadow[1], params[1], beta=0.95)
        assert ema.t == t
    for avg, s, p in zip(ema.averages, shadow, params):
        assert avg.dtype == p.dtype and avg.shape == p.shape
        np.testing.assert_allclose(avg, s, rtol=KERNEL_RTOL[p.dtype.type],
                                   atol=64 * eps(p.dtype))
    targets = [np.empty_like(p) for p in params]
    ema.copy_to(targets)
    for tgt, s in zip(targets, shadow):
        np.testing.assert_allclose(tgt, s / (1 - 0.95 ** 30), rtol=1e-5, atol=1e-5)


def test_model_ema_update_with_values():
    p = np.ones(4)
    ema = ModelEMA([p], 0.5)
    ema.update([np.full(4, 3.0)])
    np.testing.assert_array_equal(ema.averages[0], 1.5)
    np.testing.assert_array_equal(ema.corrected()[0], 3.0)
    np.testing.assert_array_equal(p, 1.0)  # the tracked array is only read


def test_model_ema_errors_write_nothing():
    params = [np.zeros(3, np.float32), np.zeros(2)]
    ema = ModelEMA(params, 0.9)
    with pytest.raises(RuntimeError, match="update"):
        ema.corrected()
    bad_calls = [
        ([np.ones(3, np.float32)], ValueError, "values has 1 arrays"),
        ([np.ones(3, np.float32), np.ones(3)], ValueError, r"values\[1\] has shape"),
        ([np.ones(3, np.float32), np.ones(2, np.float32)], TypeError, r"values\[1\] has dtype"),
        ([np.ones(3, np.float32), np.ones(4)[::2]], ValueError, r"values\[1\].*C-contiguous"),
        ([np.ones(3, np.float32), [1.0, 2.0]], TypeError, r"values\[1\]"),
        ("abc", TypeError, "values"),
    ]
    for values, exc, match in bad_calls:
        with pytest.raises(exc, match=match):
            ema.update(values)
        assert ema.t == 0
        for avg in ema.averages:
            assert not avg.any()  # the float32 group was not written before the check failed
    ema.update()
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"arrays\[0\] is not writeable"):
        ema.copy_to([ro, np.zeros(2)])


def test_model_ema_constructor_errors():
    with pytest.raises(ValueError, match="beta"):
        ModelEMA([np.zeros(2)], 1.0)
    with pytest.raises(TypeError, match=r"arrays\[0\] has dtype int64"):
        ModelEMA([np.zeros(2, np.int64)], 0.9)
    with pytest.raises(ValueError, match=r"arrays\[1\] is not C-contiguous"):
        ModelEMA([np.zeros(2), np.zeros((3, 4)).T], 0.9)
    with pytest.raises(TypeError, match=r"arrays\[0\] must be a numpy.ndarray"):
        ModelEMA([[1.0, 2.0]], 0.9)
    with pytest.raises(ValueError, match="empty"):
        ModelEMA([], 0.9)
    single = ModelEMA(np.zeros(2), 0.9)
    assert len(single.averages) == 1 and "beta=0.9" in repr(single)
