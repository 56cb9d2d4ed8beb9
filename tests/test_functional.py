"""The fused kernels (fastoptim.<rule>_) equal the NumPy oracle (fastoptim.reference).

A declarative table of cases (rule x hyperparameters) covers every option of every rule. It is
parametrized over dtype x ISA x threads x size, with sizes that break every SIMD width and
tail. Each test runs several steps with a fresh gradient per step and compares params and
every state buffer after each step. Backends this CPU or build lacks skip with a reason.
"""

import numpy as np
import pytest

import fastoptim
from fastoptim import reference
import optimizer_cases as cases
from optimizer_cases import CASES, active_states, case_id

DTYPES = [np.float32, np.float64]
THREADS = [1, 2]
SMALL_SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 4099]
BIG_SIZE = 2**20 + 3
KNOWN_ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]
ISAS = KNOWN_ISAS + [
    isa for isa in fastoptim.backend_info()["isas_supported"] if isa not in KNOWN_ISAS
]
BACKENDS = [(isa, threads) for isa in ISAS for threads in THREADS]

# Tolerances of ONE step from the same state (the table tests resynchronise the kernel with
# the reference before every step, so every step is compared as a first step):
# the kernels fuse x + a*y into one fma where NumPy rounds twice, and group products and
# quotients differently (e.g. (-lr*g)/avg versus -lr*(g/avg)); each of the ~6 operations of
# a rule then differs by at most ~1 ulp: float32 6e-8 * 6 < 1e-6, float64 1.1e-16 * 6 < 1e-12.
STEP_RTOL = {np.float32: 1e-6, np.float64: 1e-12}
# Tolerances after a 100-step trajectory (no resynchronisation): the one-step differences
# compound (Adagrad's sum grows, params random-walk), hence float32 1e-5; float64 rounding
# is still ~1e-14 after 100 steps.
TRAJ_RTOL = {np.float32: 1e-5, np.float64: 1e-12}
# atol, in ulps of the array's scale (see atol_for): where a result cancels to near zero
# (lerp g - exp_avg, momentum*buf + g/avg, p - lr*u) its error is an ulp of the OPERANDS, not
# of the result, and the operands are as large as the array's values (RMSprop's momentum
# buffer holds sums of g/avg ~ 10..100). 8 ulps for one step; the trajectory compounds more.
STEP_ATOL_ULPS = {np.float32: 8, np.float64: 8}
TRAJ_ATOL_ULPS = {np.float32: 16, np.float64: 64}


def atol_for(expected, dtype, ulps):
    """``ulps`` units of roundoff of the array's scale: max(1, largest finite |value|)."""
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    return ulps * np.finfo(dtype).eps * scale


FULL_CASES = [case for i, case in enumerate(CASES)
              if i + 1 == len(CASES) or CASES[i + 1][0] != case[0]]




def dtype_id(dtype):
    return np.dtype(dtype).name


@pytest.fixture
def backend(request):
    """Select (isa, threads) for one test and restore the previous choice afterwards."""
    isa, threads = request.param
    info = fastoptim.backend_info()
    if isa not in info["isas_supported"] or isa not in info["isas_compiled"]:
        pytest.skip(f"ISA {isa} is not supported by this CPU or not compiled in this build")
    saved_isa, saved_threads = info["isa"], fastoptim.get_num_threads()
    fastoptim.set_isa(isa)
    fastoptim.set_num_threads(threads)
    yield isa, threads
    fastoptim.set_isa(saved_isa)
    fastoptim.set_num_threads(saved_threads)


def usable_backends():
    info = fastoptim.backend_info()
    usable = [isa for isa in ISAS
              if isa in info["isas_supported"] and isa in info["isas_compiled"]]
    return [(isa, threads) for isa in usable for threads in THREADS]




def initial_state(rule, hyper, shapes, dtype, rng):
    """params (random) and states as torch starts them, as {name: [array per shape]}."""
    state = {"params": [rng.uniform(-2.0, 2.0, s).astype(dtype) for s in shapes]}
    for name in active_states(rule, hyper):
        # SGD's buffer starts as NaN: step 1 SETS it (torch's "buffer is None"), never reads it.
        fill = 0.1 if rule == "adagrad" else cases.initial_state(rule, name, hyper)
        state[name] = [np.full(s, fill, dtype) for s in shapes]
    return state


def random_grads(shapes, dtype, rng, writeable=False):
    """Gradients of random sign with |grad| in [0.5, 2], and every 7th exactly zero.

    Note [no cancelled gradients]: with params in [-2, 2] and weight_decay <= 0.1,
    g = grad + weight_decay*p never cancels towards zero. The kernels round that sum once
    (fma), NumPy twice; a cancelled g carries an error of an ulp of the OPERANDS, which the
    division by sqrt(v) + eps (Adam, RMSprop, Adagrad) turns into an arbitrarily large
    relative error when |g| ~ eps: an ill-conditioned input, not a kernel bug. Exact zeros
    still exercise the eps-dominated path (0 / eps), where both sides are exact. Which
    elements are zero changes from call to call: an element whose gradient stayed zero for 100
    steps under L2 weight decay follows g = wd*p, which the Adam-like rules normalise into steps
    of ~lr whatever |p| is, so p hovers chaotically around 0 and any rounding difference decides
    where it ends (seen with NAdam: 1 element of 1000 after 100 steps, fp32 and fp64 alike).
    """
    grads = []
    for s in shapes:
        g = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
        g.reshape(-1)[int(rng.integers(7))::7] = 0.0
        g = g.astype(dtype)
        g.flags.writeable = writeable  # grads are read only; the kernels must accept that
        grads.append(g)
    return grads


def copy_state(state):
    return {name: [a.copy() for a in arrays] for name, arrays in state.items()}


def update(module, rule, hyper, state, grads, step, single=False):
    """Call ``module.<rule>_`` on ``state`` in place (one array per argument if single)."""
    pick = (lambda arrays: arrays[0]) if single else (lambda arrays: arrays)
    kwargs = {name: pick(arrays) for name, arrays in state.items() if name != "params"}
    kwargs.update(cases.scalar_kwargs(rule, hyper, step))
    getattr(module, rule + "_")(pick(state["params"]), pick(grads), **kwargs, **hyper)


def assert_state_close(actual, expected, rtol, atol_ulps, where):
    assert actual.keys() == expected.keys()
    for name, expected_arrays in expected.items():
        for i, (a, e) in enumerate(zip(actual[name], expected_arrays, strict=True)):
            assert a.dtype == e.dtype and a.shape == e.shape
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_for(e, e.dtype, atol_ulps),
                                       err_msg=f"{where}: {name}[{i}]")


def assert_state_equal(actual, expected, where):
    for name, expected_arrays in expected.items():
        for i, (a, e) in enumerate(zip(actual[name], expected_arrays, strict=True)):
            assert np.array_equal(a, e, equal_nan=True), f"{where}: {name}[{i}] differs"


def check_steps(rule, hyper, dtype, shapes, steps, single=False, seed=0):
    """Run ``steps`` steps; before each, kernel and reference start from the same state."""
    rng = np.random.default_rng(seed)
    state = initial_state(rule, hyper, shapes, dtype, rng)
    for step in range(1, steps + 1):
        grads = random_grads(shapes, dtype, rng)
        kernel_state = copy_state(state)
        update(fastoptim, rule, hyper, kernel_state, grads, step, single=single)
        update(reference, rule, hyper, state, grads, step)
        assert_state_close(kernel_state, state, STEP_RTOL[dtype], STEP_ATOL_ULPS[dtype],
                           f"{rule} step {step}")


@pytest.mark.parametrize("size", SMALL_SIZES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda b: f"{b[0]}-t{b[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype, backend, size):
    rule, hyper = case
    check_steps(rule, hyper, dtype, [(size,)], steps=3, single=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_big_size_matches_reference_bitwise_across_backends(case, dtype):
    """2**20 + 3 elements (split across threads): every ISA x threads against the reference,
    and bitwise identical to each other (same rule, explicit fma, -ffp-contract=off)."""
    rule, hyper = case
    backends = usable_backends()
    saved_isa, saved_threads = fastoptim.backend_info()["isa"], fastoptim.get_num_threads()
    rng = np.random.default_rng(1)
    shapes = [(BIG_SIZE,)]
    state = initial_state(rule, hyper, shapes, dtype, rng)
    try:
        for step in (1, 2):
            grads = random_grads(shapes, dtype, rng)
            first = None
            for isa, threads in backends:
                fastoptim.set_isa(isa)
                fastoptim.set_num_threads(threads)
                kernel_state = copy_state(state)
                update(fastoptim, rule, hyper, kernel_state, grads, step)
                if first is None:
                    first = kernel_state
                else:
                    assert_state_equal(kernel_state, first,
                                       f"{rule} step {step}: {isa} t{threads} vs {backends[0]}")
            update(reference, rule, hyper, state, grads, step)
            assert_state_close(first, state, STEP_RTOL[dtype], STEP_ATOL_ULPS[dtype],
                               f"{rule} step {step}")
    finally:
        fastoptim.set_isa(saved_isa)
        fastoptim.set_num_threads(saved_threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_bitwise_identical_across_backends(case, dtype):
    """Odd sizes (tails of every width) in one list: all ISA x threads agree bit for bit."""
    rule, hyper = case
    backends = usable_backends()
    saved_isa, saved_threads = fastoptim.backend_info()["isa"], fastoptim.get_num_threads()
    rng = np.random.default_rng(2)
    shapes = [(4099,), (17,), (1,), (3, 5), (0,), (33,)]
    initial = initial_state(rule, hyper, shapes, dtype, rng)
    grads = [random_grads(shapes, dtype, rng) for _ in range(3)]
    results = []
    try:
        for isa, threads in backends:
            fastoptim.set_isa(isa)
            fastoptim.set_num_threads(threads)
            state = copy_state(initial)
            for step, step_grads in enumerate(grads, start=1):
                update(fastoptim, rule, hyper, state, step_grads, step)
            results.append(state)
    finally:
        fastoptim.set_isa(saved_isa)
        fastoptim.set_num_threads(saved_threads)
    for (isa, threads), state in zip(backends[1:], results[1:]):
        assert_state_equal(state, results[0], f"{rule}: {isa} t{threads} vs {backends[0]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trajectory_100_steps(case, dtype):
    """100 steps on 1000 elements without resynchronisation: errors must not compound."""
    rule, hyper = case
    rng = np.random.default_rng(3)
    shapes = [(1000,)]
    kernel_state = initial_state(rule, hyper, shapes, dtype, rng)
    ref_state = copy_state(kernel_state)
    for step in range(1, 101):
        grads = random_grads(shapes, dtype, rng)
        update(fastoptim, rule, hyper, kernel_state, grads, step)
        update(reference, rule, hyper, ref_state, grads, step)
    assert_state_close(kernel_state, ref_state, TRAJ_RTOL[dtype], TRAJ_ATOL_ULPS[dtype],
                       f"{rule} after 100 steps")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_list_equals_each_array_alone(case, dtype):
    """One call on 7 arrays of odd sizes (incl. 0 and 1) == 7 single-array calls, bitwise."""
    rule, hyper = case
    rng = np.random.default_rng(4)
    shapes = [(5,), (0,), (1,), (131,), (3, 7), (4099,), (2, 1, 3)]
    listed = initial_state(rule, hyper, shapes, dtype, rng)
    alone = copy_state(listed)
    for step in (1, 2, 3):
        grads = random_grads(shapes, dtype, rng)
        update(fastoptim, rule, hyper, listed, grads, step)
        for i in range(len(shapes)):
            one = {name: [arrays[i]] for name, arrays in alone.items()}
            update(fastoptim, rule, hyper, one, [grads[i]], step, single=True)
        assert_state_equal(listed, alone, f"{rule} step {step}")
    check_steps(rule, hyper, dtype, shapes, steps=3)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda b: f"{b[0]}-t{b[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_nonfinite_propagate_like_reference(case, dtype, backend):
    """NaN and +-Inf in grads (and NaN in AMSGrad's max state) propagate as in the oracle."""
    rule, hyper = case
    rng = np.random.default_rng(5)
    shapes = [(37,)]
    state = initial_state(rule, hyper, shapes, dtype, rng)
    if "max_exp_avg_sqs" in state:
        # maximum(NaN, x) must be NaN whichever operand holds the NaN.
        state["max_exp_avg_sqs"][0][[3, 20]] = np.nan
    for step in (1, 2, 3):
        grads = random_grads(shapes, dtype, rng, writeable=True)
        # Positions in and beyond the first vectors (tails too); new ones each step.
        grads[0][[step, 9 + step, 35 - step]] = [np.nan, np.inf, -np.inf]
        kernel_state = copy_state(state)
        update(fastoptim, rule, hyper, kernel_state, grads, step)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            update(reference, rule, hyper, state, grads, step)
        assert_state_close(kernel_state, state, STEP_RTOL[dtype], STEP_ATOL_ULPS[dtype],
                           f"{rule} step {step}")
    # Rprop and Lion move params by lr * sign(...), and sign(NaN) = 0, sign(inf) = 1 (torch.sign)
    if rule not in ("rprop", "lion"):
        assert not np.isfinite(state["params"][0]).all(), "non-finite grads never reached params"
