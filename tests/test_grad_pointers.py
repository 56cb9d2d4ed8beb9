"""_core._GradPointers: gradients handed to an update as data pointers (Note [grad pointers] in
src/cpp/bindings.cpp), as fastoptim.torch's format fast path does. The update must be the one
the same call makes with the gradients as arrays, bit for bit, in every storage format the fast
path uses; and a bad count, pointer, dtype or overlap must be refused before anything is written.
"""

import ml_dtypes
import numpy as np
import pytest

import fastoptim
from fastoptim import _core
from fastoptim.quant import QuantizedState

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(5, 3), (0,), (300,), (1,)]  # (a 0-size tensor and int8 blocks with a tail)


def pointers(arrays, dtype=None):
    dtype = arrays[0].dtype if dtype is None else dtype
    return _core._GradPointers(np.empty(0, dtype), [a.ctypes.data for a in arrays])


def arrays(dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


def copy(xs):
    return [x.copy() if isinstance(x, np.ndarray) else
            QuantizedState(x.codes.copy(), x.absmax.copy(), x.bits, x.shape, x.non_negative)
            for x in xs]


def flat(xs):
    out = []
    for x in xs:
        out += [x.codes, x.absmax] if isinstance(x, QuantizedState) else [x]
    return out


def states(kind, params):
    if kind == "int8":
        return ([QuantizedState.zeros(p.shape, 8) for p in params],
                [QuantizedState.zeros(p.shape, 8, non_negative=True) for p in params])
    dtype = {"float32": np.float32, "bfloat16": BF16}[kind]
    return [np.zeros(p.shape, dtype) for p in params], [np.zeros(p.shape, dtype) for p in params]


# (param dtype, grad dtype, state kind, options): all-bf16, fp32 master weights with bf16 grads
# and param_copies, bf16 params with stochastic rounding, fp32 params with int8 and bf16 states.
CASES = {
    "float32": (np.float32, np.float32, "float32", {}),
    "all-bfloat16": (BF16, BF16, "bfloat16", {}),
    "master-weights": (np.float32, BF16, "float32", {"copies": BF16}),
    "stochastic-rounding": (BF16, BF16, "float32", {"stochastic_rounding": (7, 3)}),
    "int8-states": (np.float32, np.float32, "int8", {}),
    "bf16-states": (np.float32, np.float32, "bfloat16", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pointers_update_equals_the_array_update_bit_for_bit(case):
    pdt, gdt, kind, opts = CASES[case]
    params = arrays(pdt, 0)
    grads = arrays(gdt, 1, 0.1)
    m, v = states(kind, params)
    kw = {k: val for k, val in opts.items() if k != "copies"}
    copies = [np.zeros(p.shape, opts["copies"]) for p in params] if "copies" in opts else None
    a = (copy(params), copy(m), copy(v), copy(copies) if copies else None)
    b = (copy(params), copy(m), copy(v), copy(copies) if copies else None)
    for step in (1, 2, 3):
        fastoptim.adamw_(a[0], grads, a[1], a[2], step=step, lr=0.01, param_copies=a[3], **kw)
        fastoptim.adamw_(b[0], pointers(grads), b[1], b[2], step=step, lr=0.01,
                         param_copies=b[3], **kw)
    for x, y in zip(flat(a[0] + a[1] + a[2] + (a[3] or [])), flat(b[0] + b[1] + b[2] + (b[3] or []))):
        assert x.tobytes() == y.tobytes()
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], arrays(pdt, 0)) if x.size)


def test_pointers_with_sgd_and_grad_scale_found_inf_and_one_thread_or_two():
    grads = arrays(np.float32, 1)
    outs, before = [], fastoptim.get_num_threads()
    for threads in (1, 2):
        fastoptim.set_num_threads(threads)
        try:
            p, buf = arrays(np.float32, 0), [np.zeros(s, np.float32) for s in SHAPES]
            fastoptim.sgd_(p, pointers(grads), buf, lr=0.1, momentum=0.9, grad_scale=4.0, step=1)
            q = copy(p)
            fastoptim.sgd_(p, pointers(grads), buf, lr=0.1, momentum=0.9, found_inf=1.0, step=2)
            assert all(x.tobytes() == y.tobytes() for x, y in zip(p, q))  # skipped
            outs.append(p)
        finally:
            fastoptim.set_num_threads(before)
    want = arrays(np.float32, 0)
    fastoptim.sgd_(want, [g / 4 for g in grads], [np.zeros(s, np.float32) for s in SHAPES],
                   lr=0.1, momentum=0.9, step=1)
    for out in outs:
        np.testing.assert_allclose(np.concatenate([x.ravel() for x in out]),
                                   np.concatenate([x.ravel() for x in want]), rtol=1e-6)


def bad_calls():
    g = arrays(np.float32, 1)
    gp = lambda ptrs, dtype=np.float32: _core._GradPointers(np.empty(0, dtype), ptrs)  # noqa: E731
    ok = [x.ctypes.data for x in g]
    return {
        "count": (lambda p: gp(ok[:2]), ValueError, r"grads has 2 pointer\(s\) but params has 4"),
        "misaligned": (lambda p: gp([ok[0] + 2] + ok[1:]), ValueError,
                       r"grads\[0\] is not a valid pointer aligned to 4 bytes"),
        "null": (lambda p: gp(ok[:2] + [0] + ok[3:]), ValueError, r"grads\[2\] is not a valid pointer"),
        "dtype": (lambda p: gp(ok, np.int32), TypeError, "grads has dtype int32"),
        "other dtype than params": (lambda p: gp(ok, np.float64), TypeError, "dtype"),
        "overlap": (lambda p: gp([p[0].ctypes.data] + ok[1:]), ValueError,
                    r"grads\[0\] overlaps params\[0\]"),
    }, g


@pytest.mark.parametrize("which", sorted(bad_calls()[0]))
def test_bad_pointers_are_refused_before_anything_is_written(which):
    calls, grads = bad_calls()  # (grads held: the pointers are theirs)
    make, kind, match = calls[which]
    params = arrays(np.float32, 0)
    m, v = states("float32", params)
    before = [x.copy() for x in params + m + v]
    with pytest.raises(kind, match=match):
        fastoptim.adam_(params, make(params), m, v, step=1)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(params + m + v, before))


@pytest.mark.parametrize("args, match", [
    (([1.0], []), "dtype_template must be a numpy.ndarray, got list"),
    ((np.empty(0, np.float32), (1, 2)), "pointers must be a list of ints, got tuple"),
    ((np.empty(0, np.float32), [16, 2.0]), r"pointers\[1\] must be an int, got float"),
    ((np.empty(0, np.float32), [True]), r"pointers\[0\] must be an int, got bool"),
])
def test_grad_pointers_refuse_what_is_not_a_template_and_a_list_of_ints(args, match):
    with pytest.raises(TypeError, match=match):
        _core._GradPointers(*args)


def test_grad_pointers_are_grads_only():
    params = arrays(np.float32, 0)
    m, v = states("float32", params)
    with pytest.raises(TypeError, match="params must be a numpy.ndarray"):
        fastoptim.adam_(pointers(params), arrays(np.float32, 1), m, v, step=1)
    with pytest.raises(ValueError, match=r"exp_avgs has 1 array\(s\) but params has 4"):
        fastoptim.adam_(params, arrays(np.float32, 1), pointers(m), v, step=1)
    assert len(pointers(params)) == len(SHAPES)
