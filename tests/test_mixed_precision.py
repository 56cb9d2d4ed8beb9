"""Mixed-precision options of every update (kernel_api.h, Note [load/store options]):
torch.amp's grad_scale and found_inf, stochastic rounding of bfloat16 params, Kahan-compensated
bfloat16 params; and the fused reductions global_norm and unscale_and_check_.

The reference (fastoptim.reference) implements each option from its definition: grads times
float32(1/grad_scale) at load, found_inf skips the call, the counter-based stochastic rounding
written in NumPy, compensation added before and refreshed after the update.
"""

import numpy as np
import pytest

import fastoptim
import optimizer_cases as cases
from fastoptim import reference
from optimizer_cases import CASES, case_id
from test_formats import (BF16, F16, F32, FULL_CASES, assert_format_close, copy_state,
                          first_name, make_grads, make_state, ulp, usable_backends)

F64 = np.dtype(np.float64)


def run(module, rule, hyper, state, grads, step, **options):
    kwargs = {name: arrays for name, arrays in state.items() if name != first_name(rule)}
    kwargs.update(cases.scalar_kwargs(rule, hyper, step))
    getattr(module, rule + "_")(state[first_name(rule)], grads, **kwargs, **hyper, **options)


def same_bits(a, b):
    return all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def assert_state_equal(a, b, where=""):
    for name in a:
        assert same_bits(a[name], b[name]), f"{where}: {name} differs"


def scaled(grads, scale):
    out = []
    for g in grads:
        s = (g.astype(np.float64) * scale).astype(g.dtype)
        s.flags.writeable = False
        out.append(s)
    return out


# ---- grad_scale -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "f32-bf16grads"])
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_grad_scale_power_of_two_equals_unscaled_grads_bitwise(case, fmt):
    """GradScaler's scales are powers of two: grads * 2^k with grad_scale=2^k must give
    exactly the unscaled update, in every array."""
    rule, hyper = case
    rng = np.random.default_rng(1)
    fmt_key = "bfloat16" if fmt == "bfloat16" else fmt
    if fmt == "float32":
        state = {k: [a.astype(np.float32) for a in v]
                 for k, v in make_state(rule, hyper, "bf16-f32states", [(257,)], rng).items()}
        grads = [g.astype(np.float32) for g in make_grads(rule, "bf16-f32states", [(257,)], rng)]
    else:
        state = make_state(rule, hyper, fmt_key, [(257,)], rng)
        grads = make_grads(rule, fmt_key, [(257,)], rng)
    plain, with_scale = copy_state(state), copy_state(state)
    run(fastoptim, rule, hyper, plain, grads, 1)
    run(fastoptim, rule, hyper, with_scale, scaled(grads, 2.0**12), 1, grad_scale=2.0**12)
    assert_state_equal(plain, with_scale, f"{rule} {fmt}")


@pytest.mark.parametrize("fmt", ["bfloat16", "f32-f16grads"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grad_scale_matches_reference(case, fmt):
    """A scale that is not a power of two: the kernel multiplies by float32(1/scale), as the
    reference does."""
    rule, hyper = case
    rng = np.random.default_rng(3)
    state = make_state(rule, hyper, fmt, [(131,)], rng)
    for step in (1, 2):
        grads = scaled(make_grads(rule, fmt, [(131,)], rng), 3.0)
        kernel = copy_state(state)
        run(fastoptim, rule, hyper, kernel, grads, step, grad_scale=3.0)
        run(reference, rule, hyper, state, grads, step, grad_scale=3.0)
        for name in state:
            for a, e in zip(kernel[name], state[name]):
                assert_format_close(a, e, f"{rule} {fmt} step {step}: {name}")
        state = kernel


@pytest.mark.parametrize("found_inf", [1.0, float("inf"), float("nan"), np.float32(2.0),
                                       np.array(1.0, np.float32)])
def test_found_inf_writes_nothing(found_inf):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(100).astype(np.float32)
    g = rng.standard_normal(100).astype(np.float32)
    m, v = np.zeros(100, np.float32), np.zeros(100, np.float32)
    before = [a.copy() for a in (p, m, v)]
    fastoptim.adam_(p, g, m, v, step=1, grad_scale=1024.0, found_inf=found_inf)
    assert same_bits(before, (p, m, v))
    # found_inf == 0 runs the update
    fastoptim.adam_(p, g, m, v, step=1, found_inf=0.0)
    assert not np.array_equal(p, before[0])


def test_found_inf_still_validates_everything():
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="lr"):
        fastoptim.adam_(p, g, m, v, step=1, lr=-1.0, found_inf=1.0)
    with pytest.raises(ValueError, match=r"exp_avgs.*shape"):
        fastoptim.adam_(p, g, np.zeros(3, np.float32), v, step=1, found_inf=1.0)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"grad_scale": 0.0}, ValueError, "grad_scale must be finite and > 0"),
    ({"grad_scale": -2.0}, ValueError, "grad_scale must be finite and > 0"),
    ({"grad_scale": float("inf")}, ValueError, "grad_scale must be finite"),
    ({"grad_scale": float("nan")}, ValueError, "grad_scale must be finite"),
    ({"grad_scale": "2"}, TypeError, "grad_scale"),
    ({"grad_scale": True}, TypeError, "grad_scale"),
    ({"found_inf": "yes"}, TypeError, "found_inf"),
    ({"stochastic_rounding": 3}, TypeError, "stochastic_rounding must be None or a tuple"),
    ({"stochastic_rounding": (1,)}, TypeError, "stochastic_rounding must be None or a tuple"),
    ({"stochastic_rounding": (1.5, 2)}, TypeError, "stochastic_rounding seed must be an int"),
    ({"stochastic_rounding": (1, -2)}, ValueError, r"counter must be in \[0, 2\*\*64\)"),
    ({"stochastic_rounding": (2**64, 0)}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ({"stochastic_rounding": (1, 2)}, ValueError, "stochastic_rounding rounds bfloat16 params"),
    ({"stochastic_rounding": (1, 2, 3, 4)}, TypeError, r"\(seed, counter, first_index\), got tuple of 4"),
    ({"stochastic_rounding": (1, 2, 0.5)}, TypeError, "stochastic_rounding first_index must be an int"),
    ({"stochastic_rounding": (1, 2, -1)}, ValueError, r"first_index must be in \[0, 2\*\*64\)"),
    ({"compensation": np.zeros(6, BF16)}, TypeError, "compensation bfloat16"),
    ({"bogus": 1}, TypeError, "unexpected keyword argument 'bogus'"),
])
def test_bad_options_raise_and_write_nothing(kwargs, exc, match):
    p, g = np.ones(6, np.float32), np.full(6, 0.5, np.float32)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(exc, match=match):
        fastoptim.adam_(p, g, m, v, step=1, **kwargs)
    assert same_bits(before, (p, m, v))


# ---- stochastic rounding --------------------------------------------------------------------

def test_stochastic_rounding_hash_matches_reference_definition():
    """sr_key_of/sr_hash in NumPy are the definitions; the kernel's SGD store (p - lr*g, one
    rounding in float32) must produce exactly reference.round_bf16_stochastic of the float32
    result, for every element of several tensors (indices continue across tensors)."""
    rng = np.random.default_rng(5)
    shapes = [(1000,), (3, 7), (1,), (4099,)]
    p = [rng.uniform(-3, 3, s).astype(BF16) for s in shapes]
    g = [rng.uniform(-1, 1, s).astype(BF16) for s in shapes]
    expected, offset = [], 0
    key = reference.sr_key_of(123, 456)
    for pi, gi in zip(p, g):
        x = pi.astype(np.float32) + np.float32(-0.01) * gi.astype(np.float32)
        expected.append(reference.round_bf16_stochastic(x, key, offset))
        offset += pi.size
    fastoptim.sgd_(p, g, lr=0.01, stochastic_rounding=(123, 456))
    for pi, e in zip(p, expected):
        assert pi.view(np.uint16).tobytes() == e.astype(np.uint16).tobytes()


@pytest.mark.parametrize("fmt", ["bfloat16", "bf16-f32states"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stochastic_rounding_matches_reference(case, fmt):
    rule, hyper = case
    rng = np.random.default_rng(7)
    state = make_state(rule, hyper, fmt, [(300,), (5,)], rng)
    for step in (1, 2, 3):
        grads = make_grads(rule, fmt, [(300,), (5,)], rng)
        kernel = copy_state(state)
        run(fastoptim, rule, hyper, kernel, grads, step, stochastic_rounding=(9, step))
        run(reference, rule, hyper, state, grads, step, stochastic_rounding=(9, step))
        for name in state:
            for a, e in zip(kernel[name], state[name]):
                assert_format_close(a, e, f"{rule} {fmt} step {step}: {name}")
        state = kernel


@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_stochastic_rounding_bitwise_across_isas_threads_and_runs(case):
    rule, hyper = case
    rng = np.random.default_rng(2)
    shapes = [(4099,), (17,), (0,), (2**18 + 3,)]
    initial = make_state(rule, hyper, "bfloat16", shapes, rng)
    grads = [make_grads(rule, "bfloat16", shapes, rng) for _ in range(2)]
    info = fastoptim.backend_info()
    saved = info["isa"], fastoptim.get_num_threads()
    results = []
    try:
        for isa, threads in usable_backends() + usable_backends()[:1]:  # the first one twice
            fastoptim.set_isa(isa)
            fastoptim.set_num_threads(threads)
            state = copy_state(initial)
            for step, g in enumerate(grads, start=1):
                run(fastoptim, rule, hyper, state, g, step, stochastic_rounding=(77, step))
            results.append(((isa, threads), state))
    finally:
        fastoptim.set_isa(saved[0])
        fastoptim.set_num_threads(saved[1])
    first = results[0][1]
    for backend, state in results[1:]:
        assert_state_equal(first, state, f"{rule} {backend}")


def test_stochastic_rounding_is_unbiased_and_keyed():
    """x = 1 + 2^-10 lies 1/8 of the way from 1 to the next bfloat16 (1 + 2^-7): round to
    nearest always gives 1, stochastic rounding gives 1 + 2^-7 for about 1/8 of the elements,
    a different set for another counter, the same set for the same key."""
    n = 1 << 16
    g = np.full(n, -(2.0**-10), np.float32).astype(BF16)
    assert float(g[0]) == -(2.0**-10)

    def once(key):
        p = np.ones(n, BF16)
        fastoptim.sgd_(p, g, lr=1.0, stochastic_rounding=key)
        return p.astype(np.float32)

    nearest = np.ones(n, BF16)
    fastoptim.sgd_(nearest, g, lr=1.0)
    assert np.all(nearest.astype(np.float32) == 1.0)
    a, b, c = once((1, 1)), once((1, 2)), once((1, 1))
    assert set(np.unique(a)) <= {1.0, 1.0 + 2.0**-7}
    up = np.mean(a > 1.0)
    assert abs(up - 0.125) < 0.01, up  # ~8 sigma (sigma = 0.0013)
    assert np.array_equal(a, c)
    assert not np.array_equal(a, b)
    assert abs(np.mean(b > 1.0) - 0.125) < 0.01
    assert abs(np.mean(a) - (1 + 2.0**-10)) < 2.0**-10 * 0.1  # the expectation is kept


def test_stochastic_rounding_first_index_continues_a_split_call():
    """A list of bf16 params split into two calls, the second with first_index = the first
    call's element count, gets the bits of one call over the whole list (fp32 states in one
    part, int8 states in the other, as fastoptim.torch splits a group); the reference agrees
    at the top of the index range (the last element's index 2**64 - 1), where one more element
    is refused before anything is written."""
    from fastoptim.quant import QuantizedState
    rng = np.random.default_rng(12)
    shapes = [(300,), (5000,), (7,)]
    p = [rng.uniform(-3, 3, s).astype(BF16) for s in shapes]
    g = [rng.uniform(-1, 1, s).astype(BF16) for s in shapes]
    whole = [x.copy() for x in p]
    fastoptim.sgd_(whole, g, lr=0.01, stochastic_rounding=(5, 6))
    split = [x.copy() for x in p]
    fastoptim.sgd_(split[:1], g[:1], lr=0.01, stochastic_rounding=(5, 6))
    fastoptim.sgd_(split[1:], g[1:], lr=0.01, stochastic_rounding=(5, 6, 300))
    assert same_bits(whole, split)
    unshifted = [x.copy() for x in p[1:]]
    fastoptim.sgd_(unshifted, g[1:], lr=0.01, stochastic_rounding=(5, 6))
    assert not same_bits(whole[1:], unshifted)  # the index, not just the key, decides
    # with quantized states: the part after the first call is the same update with int8 states
    m = [np.zeros(300, np.float32), QuantizedState.zeros((5000,), 8), QuantizedState.zeros((7,), 8)]
    v = [np.zeros(300, np.float32)] + [QuantizedState.zeros(s, 8, non_negative=True) for s in shapes[1:]]
    fp = [np.zeros(s, np.float32) for s in shapes]
    a = [x.copy() for x in p]
    b = [x.copy() for x in p]
    fastoptim.adam_(a, g, fp, [np.zeros(s, np.float32) for s in shapes], step=1, lr=0.01,
                    stochastic_rounding=(5, 6))
    fastoptim.adam_(b[:1], g[:1], m[:1], v[:1], step=1, lr=0.01, stochastic_rounding=(5, 6))
    fastoptim.adam_(b[1:], g[1:], m[1:], v[1:], step=1, lr=0.01, stochastic_rounding=(5, 6, 300))
    assert same_bits(a, b)  # from zero states, int8 and fp32 states give the same first step
    top = 2**64 - 7
    k = p[2].copy()
    fastoptim.sgd_(k, g[2], lr=0.01, stochastic_rounding=(5, 6, top))
    x = p[2].astype(np.float32) + np.float32(-0.01) * g[2].astype(np.float32)
    want = reference.round_bf16_stochastic(x, reference.sr_key_of(5, 6), top)
    assert k.view(np.uint16).tobytes() == want.astype(np.uint16).tobytes()
    r = p[2].copy()
    reference.sgd_(r, g[2], lr=0.01, stochastic_rounding=(5, 6, top))
    assert same_bits([k], [r])
    before = k.copy()
    with pytest.raises(ValueError, match=r"first_index 18446744073709551610 plus the call's 7 "
                                         r"elements passes 2\*\*64 - 1"):
        fastoptim.sgd_(k, g[2], lr=0.01, stochastic_rounding=(5, 6, top + 1))
    assert same_bits([k], [before])


def test_stochastic_rounding_keeps_exact_values_inf_and_nan():
    p = np.array([1.0, -2.5, np.inf, -np.inf, np.nan, 0.0, 3.0e38, -3.0e38], np.float32).astype(BF16)
    g = np.zeros(p.size, BF16)
    out = p.copy()
    fastoptim.sgd_(out, g, lr=0.1, stochastic_rounding=(3, 4))
    a, e = out.astype(np.float32), p.astype(np.float32)
    assert np.array_equal(np.isnan(a), np.isnan(e))
    assert np.array_equal(a[~np.isnan(e)], e[~np.isnan(e)])


def test_stochastic_rounding_refused_for_float16_and_compensation():
    p, g = np.ones(4, F16), np.ones(4, F16)
    with pytest.raises(ValueError, match="stochastic_rounding rounds bfloat16 params"):
        fastoptim.sgd_(p, g, lr=0.1, stochastic_rounding=(0, 0))
    p, g, c = np.ones(4, BF16), np.ones(4, BF16), np.zeros(4, BF16)
    before = p.copy()
    with pytest.raises(ValueError, match="without compensation"):
        fastoptim.sgd_(p, g, lr=0.1, stochastic_rounding=(0, 0), compensation=c)
    assert p.tobytes() == before.tobytes()


# ---- Kahan compensation ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compensation_matches_reference(case):
    rule, hyper = case
    rng = np.random.default_rng(11)
    state = make_state(rule, hyper, "bfloat16", [(300,), (9,)], rng)
    state["compensation"] = [np.zeros(s, BF16) for s in [(300,), (9,)]]
    for step in (1, 2, 3):
        grads = make_grads(rule, "bfloat16", [(300,), (9,)], rng)
        kernel = copy_state(state)
        for st, mod in ((kernel, fastoptim), (state, reference)):
            comp = st.pop("compensation")
            run(mod, rule, hyper, st, grads, step, compensation=comp)
            st["compensation"] = comp
        first = first_name(rule)
        for name in state:
            if name == "compensation":
                continue
            for a, e in zip(kernel[name], state[name]):
                assert_format_close(a, e, f"{rule} step {step}: {name}")
        # Where the float32 result lies within one float32 rounding of a bfloat16 midpoint,
        # the two may store neighbouring bfloat16 params, and then compensations of opposite
        # sign: compare the compensated values p + compensation, which agree within the
        # compensation's own bfloat16 rounding.
        for i, (pk, ck, pr, cr) in enumerate(zip(kernel[first], kernel["compensation"],
                                                  state[first], state["compensation"])):
            tk = pk.astype(np.float64) + ck.astype(np.float64)
            tr = pr.astype(np.float64) + cr.astype(np.float64)
            tol = ulp(pr, BF16) * 2.0**-7 + 16 * np.finfo(np.float32).eps * np.maximum(1, abs(tr))
            assert np.all(np.abs(tk - tr) <= tol), f"{rule} step {step}: p + compensation [{i}]"
        state = kernel


def test_compensation_keeps_updates_that_bfloat16_loses():
    """1,000 SGD steps of -1e-4 on a bfloat16 param of 1.0: each is below half a bfloat16 ulp
    (2^-8), so plain bfloat16 never moves; with compensation the param tracks the float32
    result (0.9) within one bfloat16 ulp, and param + compensation within a quarter of one
    (the compensation itself is bfloat16, so it keeps 8 bits of the residual)."""
    n = 64
    g = np.full(n, 1.0, np.float32).astype(BF16)
    plain = np.ones(n, BF16)
    kahan, comp = np.ones(n, BF16), np.zeros(n, BF16)
    exact = np.ones(n, np.float32)
    for _ in range(1000):
        fastoptim.sgd_(plain, g, lr=1e-4)
        fastoptim.sgd_(kahan, g, lr=1e-4, compensation=comp)
        fastoptim.sgd_(exact, g.astype(np.float32), lr=1e-4)
    assert np.all(plain.astype(np.float32) == 1.0)
    assert np.all(np.abs(kahan.astype(np.float32) - exact) <= 2.0**-8)
    total = kahan.astype(np.float32) + comp.astype(np.float32)
    assert np.all(np.abs(total - exact) < 2.0**-10)


@pytest.mark.parametrize("comp, exc, match", [
    (np.zeros(6, np.float32), TypeError, "compensation float32"),
    (np.zeros(5, BF16), ValueError, r"compensation has shape \(5,\)"),
    ([np.zeros(6, BF16)] * 2, ValueError, "compensation has 2 array"),
    ("x", TypeError, "compensation"),
])
def test_bad_compensation_raises_and_writes_nothing(comp, exc, match):
    p, g = np.ones(6, BF16), np.ones(6, BF16)
    m, v = np.zeros(6, BF16), np.zeros(6, BF16)
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(exc, match=match):
        fastoptim.adam_(p, g, m, v, step=1, compensation=comp)
    assert same_bits(before, (p, m, v))


def test_compensation_and_param_copies_exclude_each_other():
    p, g = np.ones(6, np.float32), np.ones(6, BF16)
    with pytest.raises(ValueError, match="param_copies and compensation exclude each other"):
        fastoptim.sgd_(p, g, lr=0.1, param_copies=np.zeros(6, BF16),
                       compensation=np.zeros(6, BF16))


def test_compensation_overlapping_a_param_is_refused():
    buf = np.zeros(12, BF16)
    p, comp = buf[:6], buf[4:10]
    with pytest.raises(ValueError, match="overlaps"):
        fastoptim.sgd_(p, np.ones(6, BF16), lr=0.1, compensation=comp)


# ---- global_norm and unscale_and_check_ ----------------------------------------------------

DTYPES = [F32, F64, BF16, F16]


def grads_of(dtype, rng, shapes=((4099,), (17,), (0,), (3, 5), (2**16 + 5,))):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_norm_matches_reference_and_is_bitwise_stable(dtype):
    rng = np.random.default_rng(4)
    g = grads_of(dtype, rng)
    expected = reference.global_norm(g)
    info = fastoptim.backend_info()
    saved = info["isa"], fastoptim.get_num_threads()
    got = []
    try:
        for isa, threads in usable_backends():
            fastoptim.set_isa(isa)
            fastoptim.set_num_threads(threads)
            got.append(fastoptim.global_norm(g))
    finally:
        fastoptim.set_isa(saved[0])
        fastoptim.set_num_threads(saved[1])
    assert len(set(got)) == 1, got
    assert got[0] == pytest.approx(expected, rel=1e-12)


def test_global_norm_edge_cases():
    assert fastoptim.global_norm([]) == 0.0
    assert fastoptim.global_norm(np.zeros(0, np.float32)) == 0.0
    assert fastoptim.global_norm(np.array([3.0, 4.0], np.float32)) == 5.0
    assert fastoptim.global_norm([np.array([3.0], np.float32), np.array([4.0], np.float32)]) == 5.0
    assert fastoptim.global_norm(np.array([1.0, np.inf], np.float32)) == np.inf
    assert np.isnan(fastoptim.global_norm(np.array([1.0, np.nan], np.float32)))
    big = np.full(10, 3e38, np.float32)  # float32 squares would overflow; float64 does not
    assert fastoptim.global_norm(big) == pytest.approx(3e38 * np.sqrt(10), rel=1e-7)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float64 but grads\[0\] has dtype float32"):
        fastoptim.global_norm([np.ones(3, np.float32), np.ones(3, np.float64)])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype int64"):
        fastoptim.global_norm([np.ones(3, np.int64)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_and_check_matches_reference(dtype):
    rng = np.random.default_rng(6)
    g = grads_of(dtype, rng)
    for x in g:
        x *= 1000
    expected = [x.copy() for x in g]
    assert fastoptim.unscale_and_check_(g, 1 / 3) is False
    assert reference.unscale_and_check_(expected, 1 / 3) is False
    assert same_bits(g, expected)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_unscale_and_check_finds_non_finite_in_any_array_and_still_unscales(bad):
    rng = np.random.default_rng(8)
    for where in (0, 4):
        g = grads_of(F32, rng)
        g[where].reshape(-1)[-1] = bad
        assert fastoptim.unscale_and_check_(g, 0.5) is True
    g = grads_of(BF16, rng)
    before = [x.astype(np.float32) for x in g]
    g[1][3] = bad
    assert fastoptim.unscale_and_check_(g, 0.5) is True
    assert np.array_equal(g[0].astype(np.float32), before[0] * 0.5)


def test_unscale_and_check_bad_arguments_write_nothing():
    g = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="inv_scale must be finite"):
        fastoptim.unscale_and_check_(g, float("inf"))
    with pytest.raises(TypeError, match="inv_scale"):
        fastoptim.unscale_and_check_(g, "0.5")
    ro = np.ones(5, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\[1\] is read-only"):
        fastoptim.unscale_and_check_([g, ro], 0.5)
    assert np.all(g == 1.0)


def test_global_norm_folded_into_grad_scale_clips_in_one_pass():
    """Global-norm clipping: norm, then the update with grad_scale = 1/clip_factor, equals
    clipping the grads first (clip factor applied by multiplication in float32)."""
    rng = np.random.default_rng(9)
    p = [rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    g = [rng.standard_normal(100).astype(np.float32) * 10 for _ in range(3)]
    m = [np.zeros(100, np.float32) for _ in range(3)]
    v = [np.zeros(100, np.float32) for _ in range(3)]
    norm = fastoptim.global_norm(g)
    factor = 1.0 / norm  # max_norm = 1
    inv = np.float32(1.0 / (1.0 / factor))  # what the kernel multiplies by: fp32(1/grad_scale)
    clipped = [x * inv for x in g]
    p2, m2, v2 = [x.copy() for x in p], [x.copy() for x in m], [x.copy() for x in v]
    fastoptim.adam_(p, g, m, v, step=1, grad_scale=1.0 / factor)
    fastoptim.adam_(p2, clipped, m2, v2, step=1)
    assert same_bits(p, p2) and same_bits(m, m2) and same_bits(v, v2)


def test_bf16_stores_of_subnormals_and_nan_agree_on_every_isa():
    """kernels.h, Note [native bf16 stores]: the avx512bf16 path's instruction flushes
    subnormals and keeps NaN payloads, so vectors holding either take the integer code. Results
    that are subnormal, NaN, inf or zero, sprinkled through normal ones, store the same bits on
    every ISA and as the reference (ml_dtypes' rounding of the float32 result)."""
    rng = np.random.default_rng(12)
    n = 4099
    values = rng.standard_normal(n).astype(np.float32)
    special = rng.choice(n, 300, replace=False)
    values[special] = rng.choice(np.array([1e-39, -3e-40, 2.0**-130, np.nan, np.inf, -np.inf,
                                           0.0, -0.0, 3e38], np.float32), 300)
    values[:64] = np.float32(1.5e-39)  # whole vectors of subnormals
    values = values.astype(BF16)
    expected = np.zeros(n, BF16)
    reference.ema_(expected, values, beta=0.25)
    saved = fastoptim.backend_info()["isa"]
    try:
        for isa in fastoptim.backend_info()["isas_supported"]:
            fastoptim.set_isa(isa)
            avg = np.zeros(n, BF16)
            fastoptim.ema_(avg, values, beta=0.25)
            assert avg.tobytes() == expected.tobytes(), isa
    finally:
        fastoptim.set_isa(saved)


def _bf16_patterns(n, rng):
    """n bfloat16 values: random bits of every exponent, with zeros, subnormals, the largest
    finite values, infinities and NaN (quiet and signalling payloads) sprinkled through."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    specials = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0,
                         0xFFC1, 0x7F81, 0x3F80, 0xBF80], np.uint16)
    where = rng.choice(n, n // 4, replace=False)
    bits[where] = rng.choice(specials, where.size)
    return bits.view(BF16)


def _nan_blind(x):
    """x's bits with every NaN made 0x7FC0: where two NaNs of opposite signs meet in one
    operation (here p + compensation, both NaN), which of them comes out depends on the
    operand order the compiler chose for that path (x86 returns the first operand's NaN), so
    the NaN's sign may differ between ISAs; its position may not (README, non-finite values)."""
    bits = x.view(np.uint16).copy()
    bits[np.isnan(x.astype(np.float32))] = 0x7FC0
    return bits


def _on_every_isa(fn):
    saved = fastoptim.backend_info()["isa"]
    try:
        return {isa: (fastoptim.set_isa(isa), fn())[1]
                for isa in fastoptim.backend_info()["isas_supported"]}
    finally:
        fastoptim.set_isa(saved)


@pytest.mark.parametrize("mode", ["nearest", "stochastic", "stochastic near 2**32",
                                  "compensation"])
def test_paired_bf16_lanes_every_kind_of_value_at_every_position(mode):
    """vec.h, Note [paired bf16 lanes]: an all-bfloat16 span's vector body loads and stores
    two lane groups at a time, de-interleaved (element 2j in lane j of one group, 2j+1 in the
    other). Params, grads and results of every kind (zeros, subnormals, values that round to
    or past the largest finite bfloat16, ties, infinities, NaN) at every position of a pair,
    with every head length before the aligned body (slices at offsets 0-33) and odd tails:
    SGD stores the reference's bits (the float32 result p - lr*g rounded by
    fastoptim.reference: ml_dtypes, or the counter-based stochastic rounding whose element
    indices here cross 2^32 inside a pair), on every ISA. With compensation, the ISAs agree
    bit for bit (the scalar ISA has no pairs), with the param bfloat16(x) and the compensation
    bfloat16(x - param) of the float32 result x = (p + compensation) - lr*g wherever the
    param is finite."""
    rng = np.random.default_rng(31)
    p0, g0 = _bf16_patterns(300, rng), _bf16_patterns(300, rng)
    c0 = (rng.standard_normal(300) * 2.0**-12).astype(BF16)
    index0 = 2**32 - 140 if mode == "stochastic near 2**32" else 0
    options = {} if mode in ("nearest", "compensation") else {"stochastic_rounding": (3, 9, index0)}
    for offset in range(34):
        p, g = p0[offset:offset + 251], g0[offset:offset + 251]
        if mode == "compensation":
            def step(p=p, g=g, c=c0[offset:offset + 251]):
                out, comp = p.copy(), c.copy()
                fastoptim.sgd_(out, g, lr=0.75, compensation=comp)
                return out, comp
            got = _on_every_isa(step)
            scalar = got["scalar"]
            for isa, (out, comp) in got.items():
                assert same_bits([out, comp], list(scalar)), f"{isa} offset {offset}"
            with np.errstate(all="ignore"):
                x = (p.astype(np.float32) + c0[offset:offset + 251].astype(np.float32)) + \
                    np.float32(-0.75) * g.astype(np.float32)
                stored = x.astype(BF16)
                residual = (x - stored.astype(np.float32)).astype(BF16)
            finite = np.isfinite(stored.astype(np.float32))
            assert scalar[0][finite].tobytes() == stored[finite].tobytes(), f"offset {offset}"
            assert scalar[1][finite].tobytes() == residual[finite].tobytes(), f"offset {offset}"
            continue

        def step(p=p, g=g):
            out = p.copy()
            fastoptim.sgd_(out, g, lr=0.75, **options)
            return out
        want = p.copy()
        with np.errstate(all="ignore"):
            reference.sgd_(want, g, lr=0.75, **options)
        for isa, out in _on_every_isa(step).items():
            assert out.tobytes() == want.tobytes(), f"{isa} {mode} offset {offset}"


def _paired_steps_on_every_backend(initial):
    """All-bfloat16 AdamW (amsgrad) with scaled grads and stochastic rounding, SGD with
    Nesterov momentum, and AdamW with Kahan compensation, two steps each, from `initial` on
    every ISA and thread count: [((isa, threads), arrays)]."""
    saved = fastoptim.backend_info()["isa"], fastoptim.get_num_threads()
    results = []
    try:
        for isa, threads in usable_backends():
            fastoptim.set_isa(isa)
            fastoptim.set_num_threads(threads)
            a = {k: v.copy() for k, v in initial.items()}
            with np.errstate(all="ignore"):
                for t in (1, 2):
                    fastoptim.adamw_(a["p"], a["g"], a["m"], a["v"], max_exp_avg_sqs=a["vmax"],
                                     amsgrad=True, step=t, lr=1e-2, weight_decay=0.1,
                                     grad_scale=np.float32(4.0), stochastic_rounding=(1, t))
                    fastoptim.sgd_(a["p"], a["g"], a["buf"], momentum=0.9, nesterov=True,
                                   step=t, lr=0.5)
                    fastoptim.adamw_(a["p"], a["g"], a["m"], a["v"], step=t + 2, lr=1e-3,
                                     compensation=a["c"])
            results.append(((isa, threads), a))
    finally:
        fastoptim.set_isa(saved[0])
        fastoptim.set_num_threads(saved[1])
    return results


def _paired_initial(n, seed):
    rng = np.random.default_rng(seed)
    initial = {name: _bf16_patterns(n, rng) for name in ("p", "g", "m", "v", "vmax", "buf", "c")}
    for name in ("v", "vmax"):  # second moments: non-negative (the sign bit cleared)
        initial[name] = (initial[name].view(np.uint16) & np.uint16(0x7FFF)).view(BF16)
    return initial


def _assert_backends_agree(results, initial):
    (_, first), changed = results[0], False
    for backend, a in results[1:]:
        for name in first:
            assert _nan_blind(a[name]).tobytes() == _nan_blind(first[name]).tobytes(), \
                f"{backend}: {name}"
    for name in ("p", "m", "v", "buf", "c"):
        changed |= first[name].tobytes() != initial[name].tobytes()
    assert changed


def test_paired_bf16_lanes_with_states_bitwise_across_isas():
    """The pair path loads and stores every stream (with vcvtne2ps2bf16 on avx512bf16:
    kernels.h, Note [paired native bf16 stores]): params, grads and states holding every kind
    of value, every ISA and thread count the same bits, in every array (2^17 + 5 elements:
    two threads split them)."""
    initial = _paired_initial(2**17 + 5, 32)
    _assert_backends_agree(_paired_steps_on_every_backend(initial), initial)


def test_paired_bf16_lanes_under_flush_denormal_bitwise_across_isas():
    """With FTZ/DAZ on (torch.set_flush_denormal) the avx512bf16 pair path takes the integer
    rounding (kernels.h, daz_clear(): vfpclassps sees a subnormal as a zero under DAZ): every
    ISA and thread count still the same bits, and the mode does change the result (the test
    is not vacuous). It runs that branch; it cannot show the branch is needed, since under
    FTZ no rule result is subnormal (test_formats_convert.py's FTZ test shows the check's
    failure on the conversions, whose inputs are not computed)."""
    torch = pytest.importorskip("torch")
    initial = _paired_initial(2**17 + 5, 33)
    plain = _paired_steps_on_every_backend(initial)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        flushed = _paired_steps_on_every_backend(initial)
    finally:
        torch.set_flush_denormal(False)
    _assert_backends_agree(flushed, initial)
    assert any(flushed[0][1][k].tobytes() != plain[0][1][k].tobytes() for k in ("p", "m", "v"))


@pytest.mark.parametrize("bits", [8, 4])
def test_grad_scale_with_quantized_states(bits):
    """The quantized states' block driver (src/cpp/quant.h) unscales the grads too: scaled
    grads with grad_scale=2^k give the bits of the unscaled update; found_inf writes nothing."""
    from fastoptim.quant import QuantizedState

    rng = np.random.default_rng(13)
    n = 1000
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)

    def run_adamw(grads, **options):
        p = p0.copy()
        m = QuantizedState.zeros(n, bits=bits)
        v = QuantizedState.zeros(n, bits=bits, non_negative=True)
        for step in (1, 2):
            fastoptim.adamw_(p, grads, m, v, step=step, lr=1e-2, **options)
        return p, m, v

    plain = run_adamw(g)
    scaled = run_adamw(g * np.float32(1024.0), grad_scale=1024.0)
    assert plain[0].tobytes() == scaled[0].tobytes()
    for a, b in zip(plain[1:], scaled[1:]):
        assert a.codes.tobytes() == b.codes.tobytes()
        assert a.absmax.tobytes() == b.absmax.tobytes()
    skipped = run_adamw(g, found_inf=1.0)
    assert skipped[0].tobytes() == p0.tobytes()
    assert not skipped[1].codes.any()


def test_bench_bf16_compute_times_every_isa():
    """bench/bench_bf16_compute.py (the all-bf16 step's compute, per ISA): one row per ISA this
    CPU runs, with a positive ns/element for plain, stochastic rounding and Kahan, and the
    SR/plain ratio of the two first."""
    from test_quant import run_bench_script
    out = run_bench_script("bench_bf16_compute.py", "--log2", "11", "--reps", "1", "--calls", "2",
                           needs_torch=False).stdout
    isas = fastoptim.backend_info()["isas_supported"]
    rows = {line.split()[0]: [float(c) for c in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in isas}
    assert set(rows) == set(isas), out
    for isa, (plain, sr, kahan, ratio) in rows.items():
        assert plain > 0 and sr > 0 and kahan > 0, (isa, out)
        assert ratio == pytest.approx(sr / plain, abs=0.006), (isa, out)
