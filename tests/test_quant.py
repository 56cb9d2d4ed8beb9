"""Block-wise quantized optimizer states (src/cpp/quant_api.h, Note [quantized states];
python/fastoptim/quant.py).

Three oracles:
* the storage format alone: the kernel's update must be, bit for bit, "dequantize with
  fastoptim.quant (NumPy), run the float32 kernel, requantize with fastoptim.quant" (the rule is
  the same float32 code in both, so any difference is the quantized load/store or the block
  driver);
* the published algorithm: fastoptim.reference's update between the NumPy dequantizer and
  quantizer (quant.reference_update), within float32 rounding for params and at most one code
  step for the rare state element that the rounding moves across a code boundary;
* the quantizer's own definition (round trips, bounds, the zero state, NaN blocks).
Every ISA and thread count must agree bit for bit; bad arguments raise before any write.
The kernel tests run with float32 params and grads (kF32Q8/kF32Q4), with bfloat16 ones
(kBF16Q8/kBF16Q4, params rounded to nearest even) and with bfloat16 ones stored with
stochastic rounding; the storage oracle then runs the bfloat16-params, float32-states kernel
with the same options.
"""

import ml_dtypes
import numpy as np
import pytest

import fastoptim
import optimizer_cases as cases
from fastoptim import quant, reference
from fastoptim.quant import BLOCK, QuantizedState
from optimizer_cases import CASES, active_states, case_id

STATE_CASES = [c for c in CASES if active_states(*c)]
FULL_STATE_CASES = [case for i, case in enumerate(STATE_CASES)
                    if i + 1 == len(STATE_CASES) or STATE_CASES[i + 1][0] != case[0]]
BITS = (8, 4)
# How params and grads are stored: float32, bfloat16 rounded to nearest even, bfloat16 with
# stochastic rounding (seed 11, counter = the step).
PARAM_KINDS = ("float32", "bfloat16", "bfloat16-sr")


def initial_float(rule, name, hyper, shape, rng):
    """A float32 state as it could be after some steps: torch's init plus noise of the
    state's kind (non-negative where the rule declares it)."""
    nn = name in quant.non_negative_states(rule)
    init = cases.initial_state(rule, name, hyper)
    init = 0.0 if np.isnan(init) else init
    # (RMSprop's centered variance square_avg - grad_avg**2 must stay >= 0)
    scale = 0.1 if name == "grad_avgs" else 0.5
    noise = rng.uniform(0.05, 0.5, shape) if nn else rng.uniform(-scale, scale, shape)
    return (init + noise).astype(np.float32)


def param_dtype(kind):
    return np.float32 if kind == "float32" else ml_dtypes.bfloat16


def make_state(rule, hyper, shapes, bits, rng, kind="float32"):
    state = {"params": [rng.uniform(-2, 2, s).astype(param_dtype(kind)) for s in shapes]}
    for name in active_states(rule, hyper):
        nn = name in quant.non_negative_states(rule)
        state[name] = [QuantizedState.from_float(initial_float(rule, name, hyper, s, rng), bits,
                                                 nn) for s in shapes]
    return state


def make_grads(shapes, rng, kind="float32"):
    out = []
    for s in shapes:
        g = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
        g.reshape(-1)[int(rng.integers(7))::7] = 0.0
        g = g.astype(param_dtype(kind))
        g.flags.writeable = False
        out.append(g)
    return out


def copy_state(state):
    return {k: [x.copy() for x in v] for k, v in state.items()}


def options(kind, step):
    """The load/store options of a call on `kind` params at `step`."""
    return {"stochastic_rounding": (11, step)} if kind == "bfloat16-sr" else {}


def run(module, rule, hyper, state, grads, step, kind="float32"):
    kwargs = {k: v for k, v in state.items() if k != "params"}
    kwargs.update(cases.scalar_kwargs(rule, hyper, step))
    getattr(module, rule + "_")(state["params"], grads, **kwargs, **hyper,
                                **options(kind, step))


def storage_oracle(rule, hyper, state, grads, step, kind="float32"):
    """Dequantize (NumPy), the kernel on float32 states, requantize (NumPy): a new state."""
    out = {"params": [p.copy() for p in state["params"]]}
    floats = {k: [q.to_float() for q in v] for k, v in state.items() if k != "params"}
    run(fastoptim, rule, hyper, {**out, **floats}, grads, step, kind)
    for k, v in floats.items():
        out[k] = [QuantizedState.from_float(x, q.bits, q.non_negative)
                  for x, q in zip(v, state[k])]
    return out


def assert_same_bits(a, b, where):
    for name in a:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            w = f"{where}: {name}[{i}]"
            if isinstance(x, QuantizedState):
                assert x.codes.tobytes() == y.codes.tobytes(), w + ".codes"
                assert x.absmax.tobytes() == y.absmax.tobytes(), w + ".absmax"
            else:
                assert x.tobytes() == y.tobytes(), w


# ---- the quantizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 127, 128, 129, 255, 256, 257, 1000])
@pytest.mark.parametrize("non_negative", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_is_stable_and_bounded(bits, non_negative, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) * np.exp(rng.uniform(-8, 2, n)).astype(np.float32)
    if non_negative:
        x = np.abs(x)
    q = QuantizedState.from_float(x, bits, non_negative)
    assert q.codes.size == (n if bits == 8 else (n + 1) // 2)
    assert q.absmax.size == -(-n // BLOCK[bits])
    y = q.to_float()
    # absmax is the block's max |x|, exactly
    for b in range(q.absmax.size):
        blk = x[b * BLOCK[bits]:(b + 1) * BLOCK[bits]]
        assert q.absmax[b] == np.abs(blk).max()
    # requantizing what was read back gives the same codes (the map is a fixed point)
    again = QuantizedState.from_float(y, bits, non_negative)
    assert again.codes.tobytes() == q.codes.tobytes()
    assert again.absmax.tobytes() == q.absmax.tobytes()
    # within range, the relative error is at most half a mantissa step (F = 3 or 1 bits);
    # below the smallest code: the smallest code (non-negative) or 0 or the smallest (signed)
    am = np.repeat(q.absmax, BLOCK[bits])[:n].astype(np.float64)
    a = np.abs(x) / np.where(am > 0, am, 1.0)
    lowest = float(np.abs(quant.code_values(bits, non_negative)[1 - non_negative]))
    f = 3 if bits == 8 else 0
    inside = a >= lowest
    rel = np.abs(y[inside].astype(np.float64) - x[inside]) / np.abs(x[inside])
    assert (rel <= 2.0 ** -(f + 1) + 1e-6).all()
    small = np.abs(y[~inside]) / np.where(am[~inside] > 0, am[~inside], 1.0)
    if non_negative:
        np.testing.assert_allclose(small[am[~inside] > 0], lowest, rtol=1e-6)
    else:
        assert ((small == 0) | np.isclose(small, lowest, rtol=1e-6)).all()
    # the largest element of a block reads back exactly up to the rounding of absmax products
    if n:
        k = int(np.argmax(np.abs(x[:min(n, BLOCK[bits])])))
        np.testing.assert_allclose(abs(y[k]), abs(x[k]), rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_zero_state_and_nonzero_floor(bits):
    z = QuantizedState.zeros((3, 100), bits, non_negative=True)
    assert not z.to_float().any() and z.to_float().shape == (3, 100)
    assert not QuantizedState.zeros(300, bits).to_float().any()
    # non-negative map: no zero once absmax > 0 (a second moment never reads back as 0)
    x = np.zeros(BLOCK[bits], np.float32)
    x[0] = 1.0
    y = QuantizedState.from_float(x, bits, non_negative=True).to_float()
    assert (y[1:] == quant.code_values(bits, non_negative=True)[0]).all()
    assert y[1:].min() > 0 and y[1:].max() < 0.01
    # signed map: zero is exact
    assert (QuantizedState.from_float(x, bits).to_float()[1:] == 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_nan_block_reads_back_nan(bits):
    x = np.ones(3 * BLOCK[bits], np.float32)
    x[BLOCK[bits] + 5] = np.inf
    q = QuantizedState.from_float(x, bits)
    assert np.isnan(q.absmax[1]) and q.absmax[0] == 1 and q.absmax[2] == 1
    y = q.to_float()
    assert np.isnan(y[BLOCK[bits]:2 * BLOCK[bits]]).all()
    assert (y[:BLOCK[bits]] == 1).all()


@pytest.mark.parametrize("bits", BITS)
def test_dynamic_map_has_2_pow_bits_sorted_values(bits):
    for signed in (True, False):
        m = quant.dynamic_map(bits, signed)
        assert m.size == 2 ** bits and (np.diff(m) > 0).all()
        assert m.max() == 1 and 0 in m and (m.min() < -0.88 if signed else m.min() == 0)


# ---- the kernels -----------------------------------------------------------------------------
SHAPES = [(1,), (7,), (129,), (300,), (2, 257), (4099,)]


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", STATE_CASES, ids=case_id)
def test_kernel_is_float32_update_between_numpy_quantizers(case, bits, kind):
    rule, hyper = case
    rng = np.random.default_rng(1)
    state = make_state(rule, hyper, SHAPES, bits, rng, kind)
    for step in (1, 2, 3):
        grads = make_grads(SHAPES, rng, kind)
        expected = storage_oracle(rule, hyper, state, grads, step, kind)
        run(fastoptim, rule, hyper, state, grads, step, kind)
        assert_same_bits(state, expected, f"{rule} int{bits} {kind} step {step}")


def assert_every_backend_gives(rule, hyper, start, grads, step, expected, label, kind="float32"):
    """One step from a copy of `start` on every ISA and thread count (backends()), each
    compared bit for bit with `expected`; returns the last backend's state."""
    for isa, threads in backends():
        fastoptim.set_isa(isa)
        fastoptim.set_num_threads(threads)
        state = copy_state(start)
        run(fastoptim, rule, hyper, state, grads, step, kind)
        assert_same_bits(state, expected, f"{label} {isa} {threads} threads")
    return state


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_every_length_of_a_last_partial_block(bits, kind, restore_backend):
    """quant.h, Notes [quantized code groups] and [lane groups in flight]: AVX2 encodes 32
    elements (four vectors) at a time and updates two vectors per step, so a block's vector
    loop, the codes of the full block deferred before it, its single-vector remainder and its
    scalar tail split differently for every length of a partial block. One
    tensor per length 1 .. block - 1 (each after a full block, and one with no full block
    before it), Adam with AMSGrad (signed and non-negative states): the storage oracle's bits on
    every ISA and thread count."""
    case = next(c for c in FULL_STATE_CASES if c[0] == "adam")
    rule, hyper = case
    block = BLOCK[bits]
    shapes = [(block + r,) for r in range(1, block)] + [(block - 37,)]
    rng = np.random.default_rng(40 + bits)
    start = make_state(rule, hyper, shapes, bits, rng, kind)
    grads = make_grads(shapes, rng, kind)
    expected = storage_oracle(rule, hyper, start, grads, 2, kind)
    assert_every_backend_gives(rule, hyper, start, grads, 2, expected,
                               f"{rule} int{bits} {kind}", kind)


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_every_code_decodes_alike_on_every_isa(bits, kind, restore_backend):
    """States whose codes are random bytes, so that every code appears, the signed map's second
    zero code (the sign bit with magnitude 0, which the encoder never writes but a loaded
    state_dict may hold) included, and meets every decoder: the arithmetic one and the lookups
    (quant.h, Note [int4 codes by lookup]: one 16-lane table on AVX-512, two 8-lane tables for
    signed int4 on AVX2). Adam with AMSGrad, the storage oracle's bits on every ISA and thread
    count."""
    case = next(c for c in FULL_STATE_CASES if c[0] == "adam")
    rule, hyper = case
    shapes = [(5 * BLOCK[bits] + 4,), (3 * BLOCK[bits],)]
    rng = np.random.default_rng(50 + bits)
    start = make_state(rule, hyper, shapes, bits, rng, kind)
    for name in start:
        if name == "params":
            continue
        for q in start[name]:
            q.codes[...] = rng.integers(0, 256, q.codes.shape, dtype=np.uint8)
        seen = np.unique(np.concatenate([quant._unpack(q.codes, q.size, bits)
                                         for q in start[name]]))
        assert seen.size == 2**bits, (name, seen)
    grads = make_grads(shapes, rng, kind)
    expected = storage_oracle(rule, hyper, start, grads, 2, kind)
    assert_every_backend_gives(rule, hyper, start, grads, 2, expected,
                               f"{rule} int{bits} {kind}", kind)


@pytest.mark.parametrize("bits", BITS)
def test_kernel_quantizes_extreme_blocks_as_numpy_does(bits, restore_backend):
    """Blocks the vector encoder handles through its clamps: absmax so small (subnormal) that
    1 / absmax overflows to inf (then 0 * inf is NaN and encodes as the top code), zeros of
    both signs, and values across the whole code range; on every ISA and thread count (the
    subnormal block is a full block with blocks after it, which would be encoded during the
    next block's loop, without the clamp, were its 1 / absmax finite: Note [deferred block
    encode])."""
    b = BLOCK[bits]
    rng = np.random.default_rng(5)
    g = np.empty(6 * b + 3, np.float32)
    g[:b] = rng.uniform(-1, 1, b) * np.float32(1e-39)      # subnormal absmax: 1 / absmax = inf
    g[:b:5] = 0.0
    g[1:b:7] = -0.0
    g[b:2 * b] = (rng.choice([-1, 1], b) * 2.0 ** rng.uniform(-40, 0, b)).astype(np.float32)
    g[2 * b:3 * b] = -0.0                                     # a block of zeros: absmax 0
    g[3 * b:4 * b] = rng.uniform(-1, 1, b) * np.float32(3e38)  # near the top of fp32
    g[4 * b:] = rng.standard_normal(g.size - 4 * b).astype(np.float32)
    g[4 * b + 9] = np.float32(2.0 ** -126)                     # smallest normal
    # Adagrad's state is the sum of g * g: the same magnitudes from square roots
    g2 = (np.sign(g) * np.sqrt(np.abs(g))).astype(np.float32)
    for arr in (g, g2):
        arr.flags.writeable = False
    for rule, hyper, grad in (("sgd", dict(lr=0.0, momentum=0.5), g), ("adagrad", dict(lr=0.0), g2)):
        state = {"params": [np.zeros(g.size, np.float32)]}
        for name in active_states(rule, hyper):
            nn = name in quant.non_negative_states(rule)
            state[name] = [QuantizedState.zeros(g.shape, bits, nn)]
        for step in (1, 2):
            with np.errstate(over="ignore"):  # NumPy's 1 / absmax overflows as the kernel's does
                expected = storage_oracle(rule, hyper, state, [grad], step)
            state = assert_every_backend_gives(rule, hyper, state, [grad], step, expected,
                                               f"{rule} int{bits} step {step}")


@pytest.mark.parametrize("bits", BITS)
def test_bf16_params_subnormal_and_nan_lanes_in_some_blocks(bits, restore_backend):
    """bfloat16 params whose stored value is subnormal or NaN, in some blocks and not others:
    on avx512bf16 such a lane is what vcvtneps2bf16 stores otherwise than the exact rounding,
    and the quantized driver stores a block with one again after its loop (src/cpp/quant.h,
    Note [rare bf16 stores after the block]). With lr = 0 the update leaves every param as it
    was, so the stored bits must be the input's (subnormals kept, not flushed to zero) apart
    from NaNs, which must stay NaN; and every ISA and thread count must match the storage oracle
    (whose params go through the float32-states kernel's checked store)."""
    b = BLOCK[bits]
    n = 7 * b + 21  # seven full blocks, then a partial one (vector lanes and a scalar tail)
    rng = np.random.default_rng(9)
    p = rng.uniform(-2, 2, n).astype(ml_dtypes.bfloat16)
    tiny = np.array([1e-39, -3e-40, 9.2e-41, -1.1e-38], np.float32).astype(ml_dtypes.bfloat16)
    assert (np.abs(tiny.astype(np.float32)) < np.finfo(np.float32).tiny).all()
    p[b + 5] = tiny[0]                        # block 1, first vector
    p[2 * b - 1] = tiny[1]                    # block 1, last lane
    p[3 * b + 17] = np.nan                    # block 3
    p[3 * b + 40] = tiny[2]
    p[5 * b + b // 2] = -np.inf               # infinities convert exactly: not rare
    p[7 * b + 3] = tiny[3]                    # the partial block's vector part
    p[n - 1] = tiny[0]                        # its scalar tail
    special = np.zeros(n, bool)
    special[[b + 5, 2 * b - 1, 3 * b + 40, 7 * b + 3, n - 1]] = True
    g = rng.uniform(-1, 1, n).astype(ml_dtypes.bfloat16)
    g.flags.writeable = False
    rule, hyper = "sgd", dict(lr=0.0, momentum=0.9)
    start = {"params": [p], "momentum_buffers": [QuantizedState.zeros(n, bits)]}
    for step in (1, 2):
        expected = storage_oracle(rule, hyper, start, [g], step, "bfloat16")
        out = assert_every_backend_gives(rule, hyper, start, [g], step, expected,
                                         f"sgd int{bits} bf16 step {step}", "bfloat16")
        got = out["params"][0]
        nan = np.isnan(p.astype(np.float32))
        assert np.isnan(got.astype(np.float32))[nan].all()
        assert (got.view(np.uint16)[~nan] == p.view(np.uint16)[~nan]).all()
        assert (got.astype(np.float32)[special] != 0).all()
        start = out


def halfway_blocks(values, bits):
    """`values` laid out in blocks, each led by 1.0 (so absmax = 1 and 1 / absmax = 1: the
    encoder sees each value itself), as float32."""
    per = BLOCK[bits] - 1
    out = []
    for k in range(0, len(values), per):
        out += [1.0] + list(values[k:k + per])
    return np.array(out, np.float32)


@pytest.mark.parametrize("bits", BITS)
def test_ties_between_codes_round_away_from_zero(bits, restore_backend):
    """A value exactly halfway between two adjacent codes takes the code of larger magnitude
    (src/cpp/quant_api.h, Note [quantized rounding ties]): in the NumPy quantizer and in the
    kernels' encode on every ISA and thread count. The expected codes come from the code table
    alone: every midpoint of two adjacent positive code values (exact in float32: the values
    have at most 4 significant bits), and for signed maps its negation too. The kernels encode
    them as SGD's momentum buffer at step 1 (the grad itself) and, for the non-negative map, as
    Adagrad's sum at step 1 (g * g, for a float32 g whose square rounds to the midpoint)."""
    for nn in (False, True):
        vals = quant.code_values(bits, nn).astype(np.float64)
        pos = np.flatnonzero(vals > 0)
        pos = pos[np.argsort(vals[pos])]
        mid = (vals[pos[:-1]] + vals[pos[1:]]) / 2
        assert (mid.astype(np.float32) == mid).all()
        upper = pos[1:]
        sign = 1 << (bits - 1)
        top = int(np.argmax(vals))
        if nn:
            # g with fl(g * g) == mid exactly: search the float32 neighbours of sqrt(mid)
            g, want = [], []
            for m, c in zip(mid.astype(np.float32), upper):
                r = np.float32(np.sqrt(np.float64(m)))
                for cand in (r, *np.nextafter(r, np.float32([0, 1])),
                             np.nextafter(np.nextafter(r, np.float32(0)), np.float32(0)),
                             np.nextafter(np.nextafter(r, np.float32(1)), np.float32(1))):
                    if np.float32(cand) * np.float32(cand) == m:
                        g.append(cand)
                        want.append(c)
                        break
            assert len(g) >= len(mid) // 2, "too few midpoints are squares of a float32"
            grads = halfway_blocks(g, bits)
            values = (grads * grads).astype(np.float32)
            rule, hyper = "adagrad", dict(lr=0.0)
        else:
            grads = halfway_blocks(np.concatenate([mid, -mid]), bits)
            want = np.concatenate([upper, upper | sign])
            values = grads
            rule, hyper = "sgd", dict(lr=0.0, momentum=0.5)
        expected = np.asarray(halfway_blocks(want, bits)).astype(np.int64)
        expected[::BLOCK[bits]] = top  # the leading 1.0
        n = values.size
        codes, absmax = quant.quantize(values, bits, nn)
        assert (absmax == 1).all()
        assert (quant._unpack(codes, n, bits) == expected).all(), f"NumPy, non_negative={nn}"
        grads.flags.writeable = False
        (name,) = active_states(rule, hyper)
        start = {"params": [np.zeros(n, np.float32)], name: [QuantizedState.zeros(n, bits, nn)]}
        want = {"params": [np.zeros(n, np.float32)],
                name: [QuantizedState(quant._pack(expected, bits), absmax, bits, n, nn)]}
        assert_every_backend_gives(rule, hyper, start, [grads], 1, want,
                                   f"{rule} int{bits} ties, non_negative={nn}")


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_non_finite_blocks_among_finite_ones(bits, kind, restore_backend):
    """Blocks whose update is not finite between finite blocks of one tensor, on every ISA and
    thread count. A full, finite block's codes are written during the next block's loop, any
    other block's at once (src/cpp/quant.h, Note [deferred block encode]); here: a NaN grad
    (both of Adam's states NaN), a 1e30 grad (exp_avg_sq overflows to inf, exp_avg stays
    finite), two such blocks in a row, the last full block and the partial last block."""
    b = BLOCK[bits]
    n = 8 * b + 5
    rng = np.random.default_rng(6)
    g = rng.standard_normal(n).astype(param_dtype(kind))
    for i, x in ((b + 3, np.nan), (3 * b + 7, 1e30), (4 * b + 1, np.nan), (7 * b + 2, 1e30),
                 (8 * b + 1, np.nan)):
        g[i] = x
    g.flags.writeable = False
    start = make_state("adam", {}, [(n,)], bits, rng, kind)
    expected = storage_oracle("adam", {}, start, [g], 1, kind)
    m, v = expected["exp_avgs"][0], expected["exp_avg_sqs"][0]
    assert np.isnan(m.absmax[[1, 4, 8]]).all() and np.isnan(v.absmax[[1, 3, 4, 7, 8]]).all()
    assert np.isfinite(m.absmax[[0, 2, 3, 5, 6, 7]]).all()
    assert_every_backend_gives("adam", {}, start, [g], 1, expected, f"adam int{bits} {kind}",
                               kind)


def bf16_ulps(a, e):
    """Element-wise distance in bfloat16 ulps (steps along the ordered bit patterns)."""
    def ordered(x):
        b = x.view(np.uint16).astype(np.int32)
        return np.where(b & 0x8000, -(b & 0x7FFF), b)
    return np.abs(ordered(a) - ordered(e))


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", STATE_CASES, ids=case_id)
def test_kernel_matches_reference_algorithm(case, bits, kind):
    """float32 params within float32 rounding of the reference; bfloat16 ones (rounded to
    nearest even or stochastically, with the reference's own rounding) within one bfloat16
    ulp, for the few elements whose float32 results straddle a rounding boundary."""
    rule, hyper = case
    rng = np.random.default_rng(2)
    state = make_state(rule, hyper, SHAPES, bits, rng, kind)
    for step in (1, 2, 3):
        grads = make_grads(SHAPES, rng, kind)
        ref = copy_state(state)
        kwargs = cases.scalar_kwargs(rule, hyper, step)
        quant.reference_update(getattr(reference, rule + "_"), ref["params"], grads,
                               {k: v for k, v in ref.items() if k != "params"},
                               **kwargs, **hyper, **options(kind, step))
        run(fastoptim, rule, hyper, state, grads, step, kind)
        for i, (a, e) in enumerate(zip(state["params"], ref["params"])):
            w = f"{rule} int{bits} {kind} step {step} params[{i}]"
            assert a.dtype == e.dtype == param_dtype(kind), w
            if kind == "float32":
                np.testing.assert_allclose(a, e, rtol=2e-6, atol=1e-6, err_msg=w)
            else:
                ulps = bf16_ulps(a, e)
                assert ulps.max(initial=0) <= 1, w
                assert (ulps != 0).sum() <= max(1, 0.02 * ulps.size), w
        for name in state:
            if name == "params":
                continue
            for i, (a, e) in enumerate(zip(state[name], ref[name])):
                w = f"{rule} int{bits} step {step}: {name}[{i}]"
                np.testing.assert_allclose(a.absmax, e.absmax, rtol=1e-5, err_msg=w)
                qa, qe = code_index(a), code_index(e)
                diff = np.abs(qa - qe)
                assert diff.max(initial=0) <= 1, w
                assert (diff != 0).mean() <= 0.01, w


def code_index(q):
    """A state's codes as positions on the number line (signed codes are sign-magnitude)."""
    c = quant._unpack(q.codes, q.size, q.bits)
    if q.non_negative:
        return c
    half = 1 << (q.bits - 1)
    return np.where(c & half, -(c & (half - 1)), c & (half - 1))


def backends():
    info = fastoptim.backend_info()
    return [(isa, t) for isa in info["isas_supported"] for t in (1, 2, 3)]


@pytest.fixture
def restore_backend():
    info = fastoptim.backend_info()
    yield
    fastoptim.set_isa(info["isa"])
    fastoptim.set_num_threads(info["num_threads"])


@pytest.mark.parametrize("kind", PARAM_KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", FULL_STATE_CASES, ids=case_id)
def test_every_isa_and_thread_count_agree_bitwise(case, bits, kind, restore_backend):
    rule, hyper = case
    # Tensors that straddle the dispatcher's 32768-element chunks at odd offsets.
    shapes = [(40001,), (3,), (70001,), (129,), (33000,)]
    rng = np.random.default_rng(3)
    start = make_state(rule, hyper, shapes, bits, rng, kind)
    grads = [make_grads(shapes, rng, kind) for _ in range(2)]
    results = []
    for isa, threads in backends():
        fastoptim.set_isa(isa)
        fastoptim.set_num_threads(threads)
        state = copy_state(start)
        for step in (1, 2):
            run(fastoptim, rule, hyper, state, grads[step - 1], step, kind)
        # the call is split between `threads` threads (whether a worker wakes in time to take
        # a chunk is up to the machine's load: parallel.h, Note [caller runs])
        total = sum(int(np.prod(s)) for s in shapes)
        assert fastoptim._core._threads_for(total) == threads
        results.append(((isa, threads), state))
    for key, state in results[1:]:
        assert_same_bits(state, results[0][1],
                         f"{rule} int{bits} {kind} {key} vs {results[0][0]}")


# ---- bad arguments ---------------------------------------------------------------------------
def adam_args(bits=8, n=1000):
    rng = np.random.default_rng(4)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = QuantizedState.from_float(rng.standard_normal(n) * 0.1, bits)
    v = QuantizedState.from_float(rng.uniform(0, 0.1, n), bits, non_negative=True)
    return p, g, m, v


def bad(obj, **fields):
    """A QuantizedState-shaped object with some fields replaced (bypassing __init__'s checks)."""
    q = obj.copy()
    for k, val in fields.items():
        object.__setattr__(q, k, val)
    return q


@pytest.mark.parametrize("make_bad, exc, text", [
    (lambda m: bad(m, codes=m.codes.astype(np.int8)), TypeError, "exp_avgs.codes has dtype int8"),
    (lambda m: bad(m, codes=m.codes[:-1].copy()), ValueError, "exp_avgs.codes has shape (999,)"),
    (lambda m: bad(m, absmax=m.absmax[:-1].copy()), ValueError, "exp_avgs.absmax has shape"),
    (lambda m: bad(m, absmax=m.absmax.astype(np.float64)), TypeError, "expected float32"),
    (lambda m: bad(m, absmax=np.where(np.arange(m.absmax.size) == 2, np.nan, m.absmax)
                   .astype(np.float32)), ValueError, "exp_avgs.absmax[2] is nan"),
    (lambda m: bad(m, absmax=-m.absmax), ValueError, "finite and >= 0"),
    (lambda m: bad(m, bits=5), ValueError, "exp_avgs.bits must be 8 or 4"),
    (lambda m: bad(m, non_negative=True), ValueError, "declared signed"),
    (lambda m: bad(m, codes=list(m.codes)), TypeError, "exp_avgs.codes must be a numpy.ndarray"),
])
def test_bad_quantized_state_raises_before_writing(make_bad, exc, text):
    p, g, m, v = adam_args()
    m = make_bad(m)
    before = (p.copy(), v.codes.copy(), v.absmax.copy())
    with pytest.raises(exc) as e:
        fastoptim.adam_(p, g, m, v, step=1)
    assert text in str(e.value)
    assert p.tobytes() == before[0].tobytes()
    assert v.codes.tobytes() == before[1].tobytes() and v.absmax.tobytes() == before[2].tobytes()


def test_read_only_codes_and_mixed_formats_are_refused():
    p, g, m, v = adam_args()
    m.codes.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        fastoptim.adam_(p, g, m, v, step=1)
    p, g, m, v = adam_args()
    with pytest.raises(TypeError, match="all optimizer states of one call share one dtype"):
        fastoptim.adam_(p, g, m, np.zeros_like(p), step=1)
    with pytest.raises(TypeError, match="all optimizer states of one call share one dtype"):
        fastoptim.adam_(p, g, m, adam_args(bits=4)[3], step=1)
    with pytest.raises(TypeError, match="unsupported combination of dtypes"):
        fastoptim.adam_(p.astype(np.float64), g.astype(np.float64), m, v, step=1)
    # bfloat16 params take quantized states with bfloat16 grads only; float16 params none;
    # stochastic rounding needs bfloat16 params; nothing is written by a refused call
    bf = ml_dtypes.bfloat16
    for pp, gg, what in ((p.astype(bf), g, "unsupported combination"),
                         (p.astype(np.float16), g.astype(np.float16), "unsupported combination"),
                         (p, g, "stochastic_rounding rounds bfloat16 params")):
        before = (pp.tobytes(), m.codes.tobytes(), m.absmax.tobytes(), v.codes.tobytes())
        exc = TypeError if what.startswith("unsupported") else ValueError
        with pytest.raises(exc, match=what):
            fastoptim.adam_(pp, gg, m, v, step=1, stochastic_rounding=(1, 1))
        assert before == (pp.tobytes(), m.codes.tobytes(), m.absmax.tobytes(), v.codes.tobytes())
    p2, g2, m2, v2 = adam_args()
    with pytest.raises(ValueError, match="overlaps"):
        fastoptim.adam_(p2, g2, m2, bad(v2, absmax=m2.absmax), step=1)


def test_state_object_checks_its_fields():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedState.zeros(10, bits=2)
    with pytest.raises(ValueError, match="codes has 9 bytes"):
        QuantizedState(np.zeros(9, np.uint8), np.zeros(1, np.float32), 8, (10,))
    with pytest.raises(ValueError, match="absmax has 2 entries"):
        QuantizedState(np.zeros(5, np.uint8), np.zeros(2, np.float32), 4, (10,))
    with pytest.raises(TypeError, match="codes must be"):
        QuantizedState(np.zeros(10, np.int8), np.zeros(1, np.float32), 8, (10,))


def test_registry_declares_non_negative_states():
    assert quant.non_negative_states("adam") == {"exp_avg_sqs", "max_exp_avg_sqs"}
    assert quant.non_negative_states("sgd") == frozenset()
    assert quant.non_negative_states("rprop") == {"step_sizes"}


def run_bench_script(script, *args, check=True, needs_torch=True):
    """bench/<script> run with this fastoptim first on PYTHONPATH (most scripts import torch:
    skipped without it unless needs_torch=False)."""
    if needs_torch:
        pytest.importorskip("torch")
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(fastoptim.__file__).parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.run([sys.executable, str(root / "bench" / script), *args],
                          capture_output=True, text=True, check=check, env=env)


def test_bench_in_cache_mode_times_every_isa():
    """bench/bench_quant.py --in-cache (the compute alone, per ISA): one row per ISA this CPU
    runs, with a positive ns/element for fp32, int8 and int4 states on float32 params and int8
    and int4 states on bfloat16 params, then the two ratios."""
    out = run_bench_script("bench_quant.py", "--in-cache", "11", "--reps", "1", "--calls", "2").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in fastoptim.backend_info()["isas_supported"]}
    assert set(rows) == set(fastoptim.backend_info()["isas_supported"]), out
    for isa, cells in rows.items():
        assert len(cells) == 7 and all(float(c) > 0 for c in cells), (isa, out)


def test_bench_rows_name_their_bytes_and_peer(tmp_path):
    """bench/bench_quant.py at 2^12 (one repeat, no memory probe): every row, the bfloat16-params
    rows included, with its bytes per element and a ratio against its own peer (torch fused
    fp32 for float32 params, torch fused all-bf16 for bfloat16 params)."""
    out = run_bench_script("bench_quant.py", "12", "--repeats", "1", "--threads", "1",
                           "--no-memory", "--out", str(tmp_path / "quant.json")).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("threads 1 ") and " ms " in line and "B/el" in line:
            head, tail = line.split(" ms ")
            rows[head.split(maxsplit=2)[2].rsplit(maxsplit=1)[0].strip()] = tail
    expected = {"fastoptim int8": ("16.06", "torch fused fp32"),
                "fastoptim bf16p-int8": ("10.06", "torch fused all-bf16"),
                "fastoptim bf16p-int4": ("8.12", "torch fused all-bf16"),
                "fastoptim bf16p-int8-sr": ("10.06", "torch fused all-bf16"),
                "fastoptim all-bf16": ("14.00", "torch fused all-bf16")}
    for name, (nbytes, peer) in expected.items():
        assert name in rows, out
        assert rows[name].split()[0] == nbytes and f"x {peer} " in rows[name], (name, out)
        assert float(rows[name].split()[-1]) > 0, (name, out)


@pytest.mark.parametrize("states", ["fp32", "int8", "int4",
                                    "bf16 --params bf16", "bf16 --params bf16 --sr",
                                    "bf16 --params bf16 --kahan", "int8 --params bf16 --sr"])
def test_ab_builds_times_two_builds_on_the_same_arrays(states, tmp_path):
    """bench/ab_builds.py with this build as both the old and the new one: a row per thread
    count with two positive times and their ratio; a directory that holds no package is
    refused by name, and options that do not go together by theirs."""
    from pathlib import Path
    package = str(Path(fastoptim.__file__).parent)
    out = run_bench_script("ab_builds.py", package, "--log2", "12", "--reps", "1",
                           "--states", *states.split()).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("threads")]
    assert [r[1] for r in rows] == ["1", "2"], out
    for r in rows:
        old, new, ratio = float(r[3]), float(r[6]), float(r[9])
        assert old > 0 and new > 0 and ratio == pytest.approx(new / old, rel=2e-3, abs=1e-3), out
    bad = run_bench_script("ab_builds.py", str(tmp_path), "--log2", "12", check=False)
    assert bad.returncode != 0 and "is not a fastoptim package directory" in bad.stderr, bad
    bad = run_bench_script("ab_builds.py", package, "--sr", check=False)
    assert bad.returncode != 0 and "--sr and --kahan need --params bf16" in bad.stderr, bad
