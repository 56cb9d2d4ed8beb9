"""Bad input: an exception, and nothing written (docs/api.md).

Every negative case starts from a valid call in which each list argument holds three arrays
and every optional state is in use, then breaks ONE thing, on the LAST item of a list where the
problem belongs to an item: a kernel that validated lazily would already have updated items 0
and 1. Each case checks

* the exception type given by the contract's table,
* that the message names the argument (with its list index, e.g. ``exp_avgs[2]``) and the
  problem (``match=``; the wording is free, so each problem accepts a few usual words),
* that no array reachable from the call changed: every array, and the base buffers of views,
  is copied before the call and compared byte for byte afterwards, which is NaN-safe and also
  catches a kernel that writes through a strided view into its base buffer.

The positive cases at the end are the boundaries the contract allows (closed ends of the
ranges, empty lists, zero-size and 0-d arrays, read-only gradients, arrays carved without
overlap out of one buffer); they must run without raising.
"""

import math
import re

import numpy as np
import pytest

import fastoptim

N = 3  # arrays per list argument
LAST = N - 1  # the index of the item a case breaks
SHAPE = (4, 5)


class Spec:
    """One function: its array arguments (signature order), which are written, and a valid
    set of hyperparameters that turns every optional state on."""

    def __init__(self, arrays, written, hyper):
        self.arrays, self.written, self.hyper = arrays, written, hyper


_ADAM = Spec(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
             ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
             dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                  amsgrad=True))

SPECS = {
    "sgd_": Spec(("params", "grads", "momentum_buffers"), ("params", "momentum_buffers"),
                 dict(step=2, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "rmsprop_": Spec(("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"),
                     ("params", "square_avgs", "grad_avgs", "momentum_buffers"),
                     dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=1e-2, momentum=0.9,
                          centered=True)),
    "adam_": _ADAM,
    "adamw_": _ADAM,
    "adagrad_": Spec(("params", "grads", "state_sums"), ("params", "state_sums"),
                     dict(step=2, lr=1e-2, lr_decay=1e-2, weight_decay=1e-2, eps=1e-10)),
    "adadelta_": Spec(("params", "grads", "square_avgs", "acc_deltas"),
                      ("params", "square_avgs", "acc_deltas"),
                      dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-2)),
    "ema_": Spec(("averages", "values"), ("averages",), dict(beta=0.9)),
}
FNS = tuple(SPECS)
STEP_FNS = ("sgd_", "adam_", "adamw_", "adagrad_")  # step required (sgd_: momentum != 0)


def _grad_name(fn):
    return "values" if fn == "ema_" else "grads"


def _fill(rng, name, shape, dtype):
    """Values that keep every rule finite: second moments positive, grad_avg small."""
    if name in ("params", "grads", "averages", "values"):
        a = rng.standard_normal(shape)
    elif name == "grad_avgs":
        a = rng.uniform(-0.1, 0.1, shape)
    else:
        a = rng.uniform(0.5, 1.0, shape)
    return a.astype(dtype)


class Call:
    """A call under construction: array lists by argument name, and keyword arguments."""

    def __init__(self, fn, dtype=np.float64, shapes=(SHAPE,) * N, nan_grad=False):
        rng = np.random.default_rng(0)
        spec = SPECS[fn]
        self.fn = fn
        self.arrays = {name: [_fill(rng, name, s, dtype) for s in shapes]
                       for name in spec.arrays}
        self.hyper = dict(spec.hyper)
        if nan_grad and len(shapes) > 1:
            # A NaN in a gradient is legal input (not checked); it makes the "nothing
            # written" comparison prove that it is NaN-safe.
            self.arrays[_grad_name(fn)][1].flat[0] = np.nan

    def __call__(self):
        return getattr(fastoptim, self.fn)(**self.arrays, **self.hyper)


class TorchLike:
    """Quacks like a CPU torch.Tensor: shape, dtype, data_ptr, and both NumPy conversion
    protocols, so np.asarray(x) would even share its memory. Still not an ndarray."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def data_ptr(self):
        return self.array.ctypes.data

    def numel(self):
        return self.array.size

    def __array__(self, dtype=None, copy=None):
        return self.array

    @property
    def __array_interface__(self):
        return self.array.__array_interface__


# ---------------------------------------------------------------------------------------------
# Snapshot and comparison


def _reachable(call):
    """Every ndarray the call can reach: list items, arrays wrapped in TorchLike, and the
    chain of base buffers behind views."""
    found = []

    def add(a):
        while isinstance(a, np.ndarray):
            if not any(a is f for f in found):
                found.append(a)
            a = a.base

    for value in call.arrays.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            add(item.array if isinstance(item, TorchLike) else item)
    return found


def _snapshot(call):
    return [(a, a.copy()) for a in _reachable(call)]


def _assert_unchanged(snapshot):
    for k, (a, before) in enumerate(snapshot):
        assert a.dtype == before.dtype and a.shape == before.shape
        # Bytes: NaN == NaN (same payload), and -0.0 differs from 0.0.
        assert a.tobytes() == before.tobytes(), f"array #{k} {a.dtype}{a.shape} was written"
        assert np.array_equal(a, before, equal_nan=a.dtype.kind in "fc")


# ---------------------------------------------------------------------------------------------
# Message patterns


def _arg(name, i=None):
    """Regex for an argument name, optionally with its list index, as a whole word."""
    text = name if i is None else f"{name}[{i}]"
    return r"(?<![\w.])" + re.escape(text) + r"(?![\w])"


def _all_of(*patterns):
    """One regex that re.search()es every pattern anywhere in the message, in any order."""
    return "(?s)^" + "".join(f"(?=.*(?:{p}))" for p in patterns)


NOT_ARRAY = r"(?i:ndarray|numpy)"
LENGTH = r"(?i:length|len\b|len\(|number|count|has \d+ array)"  # "x has 2 arrays but y has 3"
SHAPE_WORD = r"(?i:shape)"
WRITEABLE = r"(?i:writ|read.?only)"
CONTIGUOUS = r"(?i:contiguous)"
OVERLAP = r"(?i:overlap|alias|share|same (memory|buffer))"
MISSING = r"(?i:required|missing|none|must|need)"
STEP_LT1 = r"(?i:>=\s*1|≥\s*1|at least 1|positive|<\s*1|1-based)"
INTEGER = r"(?i:int)"
OUT_OF_RANGE = (r"(?i:range|negative|>=|<=|≥|≤|finite|nan|inf|invalid|must be"
                r"|\[0,\s*1[\])])")


# ---------------------------------------------------------------------------------------------
# The table of bad input

def _case(fn, id_, mutate, exc, *patterns):
    return pytest.param(fn, mutate, exc, _all_of(*patterns), id=f"{fn}-{id_}")


def _set_item(name, i, make):
    def mutate(call):
        call.arrays[name][i] = make(call.arrays[name][i])
    return mutate


def _noncontig_slice(a):
    b = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    b[..., ::2] = a
    return b[..., ::2]


def _transposed(a):
    return np.ascontiguousarray(a.T).T  # F-contiguous, same values


def _reversed(a):
    return a[::-1].copy()[::-1]  # negative stride, same values


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">"))


def _item_cases(fn):
    """A bad item (the last one) in each array argument."""
    spec = SPECS[fn]
    for name in spec.arrays:
        at = _arg(name, LAST)
        bad = [
            ("pylist", lambda a: a.tolist(), TypeError, NOT_ARRAY),
            ("pyfloat", lambda a: 0.5, TypeError, NOT_ARRAY),
            ("npscalar", lambda a: a.dtype.type(0.5), TypeError, NOT_ARRAY),
            ("None", lambda a: None, TypeError, NOT_ARRAY),
            ("torchlike", TorchLike, TypeError, NOT_ARRAY),
            ("int32", lambda a: a.astype(np.int32), TypeError, "int32", "float64"),
            ("float16", lambda a: a.astype(np.float16), TypeError, "float16", "float64"),
            ("complex128", lambda a: a.astype(np.complex128), TypeError, "complex128",
             "float64"),
            ("mixed-float32", lambda a: a.astype(np.float32), TypeError, "float32", "float64"),
            ("big-endian", _big_endian, TypeError, r"(?i:>f8|endian|byte.?order|native|swap)"),
            ("shape-transposed", lambda a: a.reshape(a.shape[::-1]).copy(), ValueError,
             SHAPE_WORD),
            ("shape-flat", lambda a: a.reshape(-1).copy(), ValueError, SHAPE_WORD),
            ("noncontig-slice", _noncontig_slice, ValueError, CONTIGUOUS),
            ("noncontig-T", _transposed, ValueError, CONTIGUOUS),
            ("noncontig-reversed", _reversed, ValueError, CONTIGUOUS),
        ]
        if name in spec.written:
            bad.append(("readonly", _readonly, ValueError, WRITEABLE))
        for id_, make, exc, *patterns in bad:
            yield _case(fn, f"{name}[{LAST}]-{id_}", _set_item(name, LAST, make), exc, at,
                        *patterns)

        def shorter(call, name=name):
            del call.arrays[name][LAST]

        def longer(call, name=name):
            call.arrays[name].append(call.arrays[name][0].copy())

        yield _case(fn, f"{name}-shorter", shorter, ValueError, _arg(name), LENGTH)
        yield _case(fn, f"{name}-longer", longer, ValueError, _arg(name), LENGTH)

    # The same in a float32 call: the odd one out is float64.
    for name in spec.arrays:
        def to_float32(call, name=name):
            for arrays in call.arrays.values():
                arrays[:] = [a.astype(np.float32) for a in arrays]
            call.arrays[name][LAST] = call.arrays[name][LAST].astype(np.float64)
        yield _case(fn, f"{name}[{LAST}]-mixed-float64", to_float32, TypeError,
                    _arg(name, LAST), "float32", "float64")


def _overlapping_pair(a, b):
    """Two C-contiguous views of one buffer, shaped like a and b, sharing half their
    elements; filled with a's and b's values."""
    half = a.size // 2
    big = np.empty(a.size + half, a.dtype)
    va = big[:a.size].reshape(a.shape)
    vb = big[half:half + b.size].reshape(b.shape)
    vb[...] = b
    va[...] = a
    return va, vb


def _overlap_cases(fn):
    spec = SPECS[fn]
    names = spec.arrays
    for i, w in enumerate(names):
        if w not in spec.written:
            continue
        for o in names:
            if o == w or (o in spec.written and names.index(o) < i):
                continue  # each unordered pair once

            def same(call, w=w, o=o):
                call.arrays[w][LAST] = call.arrays[o][LAST]

            def view(call, w=w, o=o):
                call.arrays[w][LAST] = call.arrays[o][LAST][...]

            def partial(call, w=w, o=o):
                call.arrays[w][LAST], call.arrays[o][LAST] = _overlapping_pair(
                    call.arrays[w][LAST], call.arrays[o][LAST])

            for id_, mutate in (("same", same), ("view", view), ("partial", partial)):
                yield _case(fn, f"{w}[{LAST}]-{o}[{LAST}]-overlap-{id_}", mutate, ValueError,
                            _arg(w, LAST), _arg(o, LAST), OVERLAP)

    # Across list indices and within one list.
    first, grad = names[0], _grad_name(fn)
    state = spec.written[-1]

    def param_twice(call):
        call.arrays[first][LAST] = call.arrays[first][0]

    def params_partial(call):
        call.arrays[first][0], call.arrays[first][LAST] = _overlapping_pair(
            call.arrays[first][0], call.arrays[first][LAST])

    def state_is_grad0(call):
        call.arrays[state][LAST] = call.arrays[grad][0]

    def state_partial_param0(call):
        call.arrays[state][LAST], call.arrays[first][0] = _overlapping_pair(
            call.arrays[state][LAST], call.arrays[first][0])

    yield _case(fn, f"{first}[{LAST}]-is-{first}[0]", param_twice, ValueError,
                _arg(first, 0), _arg(first, LAST), OVERLAP)
    yield _case(fn, f"{first}[{LAST}]-overlaps-{first}[0]", params_partial, ValueError,
                _arg(first, 0), _arg(first, LAST), OVERLAP)
    yield _case(fn, f"{state}[{LAST}]-is-{grad}[0]", state_is_grad0, ValueError,
                _arg(state, LAST), _arg(grad, 0), OVERLAP)
    if state != first:
        yield _case(fn, f"{state}[{LAST}]-overlaps-{first}[0]", state_partial_param0,
                    ValueError, _arg(state, LAST), _arg(first, 0), OVERLAP)


def _set_hyper(**kw):
    def mutate(call):
        call.hyper.update(kw)
    return mutate


def _drop_hyper(key):
    def mutate(call):
        del call.hyper[key]
    return mutate


def _step_cases(fn):
    step = _arg("step")
    # adam_/adamw_/adagrad_ declare `*, step` without a default: omitting it is Python's own
    # TypeError. sgd_ defaults step=None, so omitting it with momentum != 0 is "missing".
    yield _case(fn, "step-omitted", _drop_hyper("step"),
                ValueError if fn == "sgd_" else TypeError, step)
    yield _case(fn, "step-None", _set_hyper(step=None), ValueError, step, MISSING)
    yield _case(fn, "step-0", _set_hyper(step=0), ValueError, step, STEP_LT1)
    yield _case(fn, "step--1", _set_hyper(step=-1), ValueError, step, STEP_LT1)
    yield _case(fn, "step-2.5", _set_hyper(step=2.5), TypeError, step, INTEGER)
    yield _case(fn, "step-2.0", _set_hyper(step=2.0), TypeError, step, INTEGER)
    yield _case(fn, "step-str", _set_hyper(step="3"), TypeError, step, INTEGER)


NONNEGATIVE = ("lr", "eps", "weight_decay", "lr_decay")  # >= 0 and finite
UNIT_OPEN = ("beta1", "beta2")  # [0, 1)
# [0, 1]. ema_'s beta is not in the contract's table; it is read as a closed unit interval
# (beta = 1 freezes the average, beta = 0 copies the value; anything else is no average).
UNIT_CLOSED = ("alpha", "rho", "momentum", "dampening", "beta")
NAN, INF = math.nan, math.inf


def _hyper_cases(fn):
    for key in SPECS[fn].hyper:
        if key in NONNEGATIVE:
            values = (-1e-3, -INF, INF, NAN)
        elif key in UNIT_OPEN:
            values = (-0.1, 1.0, 1.5, INF, NAN)
        elif key in UNIT_CLOSED:
            values = (-0.1, 1.5, INF, -INF, NAN)
        else:
            continue
        for v in values:
            yield _case(fn, f"{key}={v}", _set_hyper(**{key: v}), ValueError, _arg(key),
                        OUT_OF_RANGE)


def _special_cases():
    yield _case("sgd_", "nesterov-momentum=0", _set_hyper(nesterov=True, momentum=0.0,
                                                          dampening=0.0),
                ValueError, _arg("nesterov"), r"momentum")
    yield _case("sgd_", "nesterov-dampening", _set_hyper(nesterov=True, momentum=0.9,
                                                        dampening=0.1),
                ValueError, _arg("nesterov"), r"dampening")

    def drop(name):
        def mutate(call):
            call.arrays[name] = None
        return mutate

    yield _case("sgd_", "momentum_buffers-None", drop("momentum_buffers"), ValueError,
                _arg("momentum_buffers"), MISSING)
    yield _case("rmsprop_", "momentum_buffers-None", drop("momentum_buffers"), ValueError,
                _arg("momentum_buffers"), MISSING)
    yield _case("rmsprop_", "grad_avgs-None-centered", drop("grad_avgs"), ValueError,
                _arg("grad_avgs"), MISSING)
    for fn in ("adam_", "adamw_"):
        yield _case(fn, "max_exp_avg_sqs-None-amsgrad", drop("max_exp_avg_sqs"), ValueError,
                    _arg("max_exp_avg_sqs"), MISSING)


def _bad_cases():
    for fn in FNS:
        yield from _item_cases(fn)
        yield from _overlap_cases(fn)
        yield from _hyper_cases(fn)
        if fn in STEP_FNS:
            yield from _step_cases(fn)
    yield from _special_cases()


@pytest.mark.parametrize(("fn", "mutate", "exc", "match"), list(_bad_cases()))
def test_bad_input_raises_and_writes_nothing(fn, mutate, exc, match):
    call = Call(fn, nan_grad=True)
    mutate(call)
    snapshot = _snapshot(call)
    with pytest.raises(exc, match=match):
        call()
    _assert_unchanged(snapshot)


# ---------------------------------------------------------------------------------------------
# Input that must be accepted


def _expected_after(fn, **overrides):
    """The same call on separate, writeable arrays, already run: the reference result."""
    call = Call(fn)
    call.hyper.update(overrides)
    call()
    return call


def _assert_same_arrays(call, expected, exact=True):
    """exact: same sizes and fresh allocations, so every element takes the same code path.
    Otherwise (other alignment, 0-d) an element may go through a peel/tail path instead of a
    vector lane; float64 results then agree to a few ulps of the intermediates."""
    for name, arrays in expected.arrays.items():
        for i, want in enumerate(arrays):
            got = call.arrays[name][i]
            if exact:
                assert got.tobytes() == want.tobytes(), f"{name}[{i}] differs"
            else:
                tol = 1e-12 if want.dtype == np.float64 else 1e-5
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{name}[{i}]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fn", FNS)
def test_valid_call(fn, dtype):
    call = Call(fn, dtype)
    before = [a.copy() for a in call.arrays[SPECS[fn].arrays[0]]]
    assert call() is None
    after = call.arrays[SPECS[fn].arrays[0]]
    assert all(a.dtype == dtype for a in after)
    assert not all(np.array_equal(a, b) for a, b in zip(after, before)), "nothing was updated"


@pytest.mark.parametrize("fn", FNS)
def test_tuples_and_single_arrays(fn):
    expected = _expected_after(fn)
    as_tuples = Call(fn)
    as_tuples.arrays = {k: tuple(v) for k, v in as_tuples.arrays.items()}
    as_tuples()
    _assert_same_arrays(as_tuples, expected)
    for i in range(N):
        single = Call(fn)
        single.arrays = {k: v[i] for k, v in single.arrays.items()}
        single()
        for name, arrays in expected.arrays.items():
            assert single.arrays[name].tobytes() == arrays[i].tobytes(), f"{name}[{i}]"


@pytest.mark.parametrize("fn", FNS)
def test_empty_lists(fn):
    call = Call(fn, shapes=())
    assert call() is None


@pytest.mark.parametrize("fn", FNS)
def test_zero_size_and_mixed_shapes(fn):
    # Element i of every list shares a shape; different i need not.
    call = Call(fn, shapes=[(0,), (3, 0), (7,), (2, 3)])
    call()
    assert [a.shape for a in call.arrays[SPECS[fn].arrays[0]]] == [(0,), (3, 0), (7,), (2, 3)]


@pytest.mark.parametrize("fn", FNS)
def test_zero_dim_arrays(fn):
    expected = _expected_after(fn)
    call = Call(fn)
    call.arrays = {k: [np.array(a.flat[0]) for a in v] for k, v in call.arrays.items()}
    expected.arrays = {k: [np.array(a.flat[0]) for a in v] for k, v in expected.arrays.items()}
    call()
    assert all(a.shape == () for arrays in call.arrays.values() for a in arrays)
    _assert_same_arrays(call, expected, exact=False)


@pytest.mark.parametrize("fn", FNS)
def test_readonly_grads_are_accepted(fn):
    expected = _expected_after(fn)
    call = Call(fn)
    for a in call.arrays[_grad_name(fn)]:
        a.flags.writeable = False
    call()
    _assert_same_arrays(call, expected)


@pytest.mark.parametrize("fn", FNS)
def test_disjoint_views_of_one_buffer_are_accepted(fn):
    # Every array of the call is a C-contiguous slice of ONE buffer, back to back (adjacent
    # slices touch but do not overlap).
    expected = _expected_after(fn)
    call = Call(fn)
    count = sum(len(v) for v in call.arrays.values())
    size = math.prod(SHAPE)
    big = np.empty(count * size, np.float64)
    k = 0
    for arrays in call.arrays.values():
        for i, a in enumerate(arrays):
            view = big[k * size:(k + 1) * size].reshape(SHAPE)
            view[...] = a
            arrays[i] = view
            k += 1
    call()
    _assert_same_arrays(call, expected, exact=False)


def _unaligned_copy(a, offset):
    """A C-contiguous copy of a whose data start `offset` bytes past a 64-byte boundary."""
    raw = np.zeros(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    u = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fn", FNS)
def test_misaligned_arrays_are_accepted(fn, dtype):
    # The contract asks for C-contiguous arrays, not aligned ones: a buffer that starts off
    # the vector boundary (and even off its own itemsize) must still be updated correctly.
    shapes = [(37,)] * N  # head + whole vectors + tail for every ISA
    expected = Call(fn, dtype, shapes)
    expected()
    for offset in (1, np.dtype(dtype).itemsize // 2, np.dtype(dtype).itemsize):
        call = Call(fn, dtype, shapes)
        call.arrays = {k: [_unaligned_copy(a, offset) for a in v] for k, v in call.arrays.items()}
        call()
        _assert_same_arrays(call, expected, exact=False)


@pytest.mark.parametrize("fn", FNS)
def test_one_grad_used_twice_is_accepted(fn):
    # Only written arrays must not overlap; read-only gradients may share memory.
    call = Call(fn)
    grads = call.arrays[_grad_name(fn)]
    grads[1] = grads[0]
    grads[2] = grads[0][...]
    call()


BOUNDARIES = [
    ("sgd_", dict(lr=0.0)),
    ("sgd_", dict(momentum=1.0)),
    ("sgd_", dict(momentum=0.0, step=None, momentum_buffers=None)),
    ("sgd_", dict(momentum=0.0, dampening=0.0, step=None, momentum_buffers=None,
                  weight_decay=0.0)),
    ("sgd_", dict(dampening=1.0)),
    ("sgd_", dict(dampening=0.0, nesterov=True)),
    ("sgd_", dict(weight_decay=0.0, maximize=True)),
    ("sgd_", dict(step=1)),
    ("sgd_", dict(step=np.int64(2))),
    ("rmsprop_", dict(lr=0.0)),
    ("rmsprop_", dict(eps=0.0)),
    ("rmsprop_", dict(alpha=0.0, centered=False, grad_avgs=None)),  # centered: sqrt(-0)
    ("rmsprop_", dict(alpha=1.0)),
    ("rmsprop_", dict(momentum=1.0)),
    ("rmsprop_", dict(momentum=0.0, momentum_buffers=None)),
    ("rmsprop_", dict(centered=False, grad_avgs=None)),
    ("rmsprop_", dict(weight_decay=0.0, maximize=True)),
    ("adagrad_", dict(lr=0.0)),
    ("adagrad_", dict(eps=0.0)),
    ("adagrad_", dict(lr_decay=0.0, weight_decay=0.0)),
    ("adagrad_", dict(step=1)),
    ("adagrad_", dict(step=np.int64(7))),
    ("adadelta_", dict(lr=0.0)),
    ("adadelta_", dict(eps=0.0)),
    ("adadelta_", dict(rho=0.0)),
    ("adadelta_", dict(rho=1.0)),
    ("adadelta_", dict(weight_decay=0.0, maximize=True)),
    ("ema_", dict(beta=0.0)),
    ("ema_", dict(beta=0.999)),
    ("ema_", dict(beta=1.0)),  # see UNIT_CLOSED
    ("sgd_", dict(lr=1, momentum=0, dampening=0, weight_decay=0, step=None,
                  momentum_buffers=None)),  # Python ints, as torch users write them
    ("adam_", dict(beta1=0, weight_decay=0, step=1)),
] + [(fn, kw) for fn in ("adam_", "adamw_") for kw in (
    dict(lr=0.0),
    dict(eps=0.0),
    dict(beta1=0.0),
    dict(beta2=0.0),
    dict(weight_decay=0.0, maximize=True),
    dict(step=1),
    dict(step=np.int64(5)),
    dict(amsgrad=False, max_exp_avg_sqs=None),
)]


@pytest.mark.parametrize(("fn", "overrides"), [
    pytest.param(fn, kw, id=f"{fn}-" + ",".join(f"{k}={v}" for k, v in kw.items()))
    for fn, kw in BOUNDARIES])
def test_boundary_values_are_accepted(fn, overrides):
    call = Call(fn)
    for key, value in overrides.items():
        if key in call.arrays:
            call.arrays[key] = value
        else:
            call.hyper[key] = value
    assert call() is None


def test_overlap_check_follows_arrays_that_change_places_between_calls():
    """Note [overlap order cache] (src/cpp/bindings.cpp): the last call's sorted order of the
    spans is tried first. Calls with the same number of arrays, carved out of one buffer in
    ascending, then descending, then shuffled order, must neither refuse the valid calls nor
    miss the overlap of the last one; each valid call must update exactly as a fresh one."""
    n = 6
    rng = np.random.default_rng(0)
    buf = np.zeros(4 * n * 8, np.float32)  # n params, n exp_avgs, n exp_avg_sqs, n spare
    grads = [rng.standard_normal(8).astype(np.float32) for _ in range(n)]

    def slots(order):
        return [buf[8 * k:8 * k + 8] for k in order]

    def call(order):
        views = slots(order)
        fastoptim.adam_(views[:n], grads, views[n:2 * n], views[2 * n:3 * n], step=1, lr=0.1)

    def expected(order):
        p = [np.array(v) for v in slots(order)]
        fastoptim.adam_(p[:n], grads, p[n:2 * n], p[2 * n:3 * n], step=1, lr=0.1)
        return p[:3 * n]

    for order in (list(range(4 * n)), list(range(4 * n))[::-1], list(rng.permutation(4 * n))):
        buf[:] = rng.standard_normal(buf.size)
        want = expected(order)
        call(order)  # valid: must not be refused whatever the previous call's order was
        for got, w in zip(slots(order)[:3 * n], want):
            np.testing.assert_array_equal(got, w)
    # The same arrays in ascending order, then exp_avgs[-1] moved back by half a slot onto
    # exp_avgs[-2]: every span keeps its place in the sorted order, so the cached order is
    # reused, and the sweep must still find the overlap.
    order = list(range(4 * n))
    call(order)
    bad = slots(order)
    k = 2 * n - 1  # exp_avgs[-1]'s slot
    bad[k] = buf[8 * k - 4:8 * k + 4]
    before = buf.copy()
    with pytest.raises(ValueError, match=OVERLAP):
        fastoptim.adam_(bad[:n], grads, bad[n:2 * n], bad[2 * n:3 * n], step=1, lr=0.1)
    np.testing.assert_array_equal(buf, before)
