"""fastoptim.torch's pointer path (Note [pointer path] in fastoptim/torch.py) and the
``_core._pointers`` entry it calls (src/cpp/bindings.cpp).

The drop-in passes data pointers when a whole group steps in one call and every gradient is a
plain dense CPU tensor with its parameter's dtype, shape and strides; anything else takes the
NumPy path. Both must give torch's result, and the entry must refuse bad pointers, counts and
overlaps before it writes anything.
"""

import re
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as ft  # noqa: E402
from fastoptim import _core  # noqa: E402

pytestmark = pytest.mark.skipif(ft._P is None, reason="_core has no pointer entry")


@pytest.fixture(autouse=True, params=["torch_ext", "python"])
def metadata_reader(request, monkeypatch):
    """Every test twice: the step reading tensors' metadata through fastoptim._torch_ext, and
    through torch's Python bindings (Note [torch extension])."""
    if request.param == "torch_ext" and ft._X is None:
        pytest.skip("fastoptim._torch_ext is not built for this torch")
    if request.param == "python":
        monkeypatch.setattr(ft, "_X", None)
    return request.param


def spy_paths(monkeypatch):
    """Count the calls of adam_ on each path: {"pointers": n, "views": n} (empty calls, the
    hyperparameter checks, not counted)."""
    counts = {"pointers": 0, "views": 0}

    def spy(real, key):
        def call(params, *args, **kwargs):
            if len(params[2] if key == "pointers" else params):
                counts[key] += 1
            return real(params, *args, **kwargs)
        return call

    monkeypatch.setattr(fastoptim.functional, "adam_", spy(fastoptim.functional.adam_, "views"))
    monkeypatch.setattr(ft._P, "adam_", spy(ft._P.adam_, "pointers"))
    return counts


def twins(shapes, dtype=torch.float32, memory_format=None):
    gen = torch.Generator().manual_seed(0)
    expected = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if memory_format is not None:
        expected = [p.contiguous(memory_format=memory_format) for p in expected]
    actual = [p.clone() for p in expected]
    return ([p.requires_grad_() for p in expected], [p.requires_grad_() for p in actual])


def step_both(ref, opt, expected, actual, make_grad, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(expected, actual):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = g.clone()
            q.grad = make_grad(g.clone())
        ref.step()
        opt.step()
    for p, q in zip(expected, actual):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
        for key, want in ref.state[p].items():
            torch.testing.assert_close(ft._local(opt.state[q][key]), want, rtol=1e-6, atol=1e-7)


def test_plain_gradients_take_the_pointer_path(monkeypatch):
    counts = spy_paths(monkeypatch)
    expected, actual = twins([(3, 5), (17,), (0,), (4099,)])
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual, lambda g: g)
    assert counts == {"pointers": 3, "views": 0}


def test_channels_last_params_and_gradients_take_the_pointer_path(monkeypatch):
    counts = spy_paths(monkeypatch)
    expected, actual = twins([(2, 3, 4, 5)], memory_format=torch.channels_last)
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual,
              lambda g: g.contiguous(memory_format=torch.channels_last))
    assert counts == {"pointers": 3, "views": 0}


def test_gradients_that_require_grad_take_the_pointer_path(monkeypatch):
    """backward(create_graph=True) leaves gradients that require grad: the update reads them
    outside autograd, as torch.optim does."""
    counts = spy_paths(monkeypatch)
    expected, actual = twins([(3, 5), (17,)])
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual, lambda g: g.requires_grad_())
    assert counts == {"pointers": 3, "views": 0}


@pytest.mark.parametrize("kind", ["negative_view", "subclass"])
def test_other_gradients_take_the_numpy_path_with_torchs_result(monkeypatch, kind):
    class Marked(torch.Tensor):
        pass

    make_grad = {
        "negative_view": lambda g: torch._neg_view(-g),  # the neg bit set, values g
        "subclass": lambda g: g.as_subclass(Marked),
    }[kind]
    counts = spy_paths(monkeypatch)
    expected, actual = twins([(3, 5), (17,)])
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual, make_grad)
    assert counts == {"pointers": 0, "views": 3}


def test_a_gradient_with_other_strides_is_refused_naming_the_param():
    p = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    opt = ft.Adam([p], lr=0.01)
    p.grad = torch.randn(2, 3, 4, 5)  # contiguous, the param channels_last
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"params'\]\[0\]: its gradient has strides"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert not opt.state.get(p)  # a refused step makes no state (nothing written)


def test_a_state_replaced_in_place_of_its_memory_is_followed():
    """``state['exp_avg'].data = ...`` moves the state's memory: the cached pointer must not
    be used again (it may be freed)."""
    expected, actual = twins([(6,), (5,)])
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual, lambda g: g, steps=1)
    for p, q in zip(expected, actual):
        opt.state[q]["exp_avg"].data = opt.state[q]["exp_avg"].detach().clone()
        opt.state[q]["exp_avg_sq"].data = opt.state[q]["exp_avg_sq"].detach().clone()
    step_both(ref, opt, expected, actual, lambda g: g, steps=2)


# -- _core._pointers itself ----------------------------------------------------------------------

def adam_args(params, grads, exp_avgs, exp_avg_sqs, counts=None, dtype="float32"):
    """_core.adam's positional arguments with pointer lists for the arrays."""
    ptr = [a.ctypes.data for a in params]
    counts = [a.size for a in params] if counts is None else counts
    return ((dtype, counts, ptr), [a.ctypes.data for a in grads],
            [a.ctypes.data for a in exp_avgs], [a.ctypes.data for a in exp_avg_sqs], None, None,
            1, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False)


def arrays(n, size=9):
    rng = np.random.default_rng(0)
    return [[rng.standard_normal(size).astype(np.float32) for _ in range(n)] for _ in range(4)]


def packed_args(args):
    """adam_args with every list of ints packed (Note [packed pointers] in bindings.cpp)."""
    def pack(v):
        return ft._pack(v) if isinstance(v, list) else v
    dtype, counts, ptrs = args[0]
    return ((dtype, pack(counts), pack(ptrs)),) + tuple(map(pack, args[1:]))


@pytest.mark.parametrize("packed", [False, True])
def test_pointers_update_equals_the_ndarray_update(packed):
    a = arrays(3)
    b = [[x.copy() for x in xs] for xs in a]
    _core._pointers("adam", packed_args(adam_args(*a)) if packed else adam_args(*a))
    fastoptim.adam_(*b, step=1, lr=0.1)
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case, match", [
    ("overlap", "overlaps"),
    ("grad_overlaps_param", "overlaps"),
    ("count_mismatch", "has 2 pointer"),
    ("misaligned", "not a valid pointer aligned to 4 bytes"),
    ("null", "not a valid pointer"),
    ("dtype", "dtype must be 'float32', 'float64', 'bfloat16' or 'float16', got 'int8'"),
    ("negative_count", "element counts must be >= 0"),
    ("float_count", "element counts must be ints, got float"),
    ("index_count", "element counts must be ints, got ClearsTheList"),
    ("packed_overlap", "overlaps"),
    ("packed_count_mismatch", "has 2 pointer"),
    ("packed_misaligned", "not a valid pointer aligned to 4 bytes"),
    ("packed_null", "not a valid pointer"),
    ("packed_negative_count", "element counts must be >= 0"),
    ("packed_count_overflow", "element counts overflow"),
    ("packed_odd_size", "exp_avg_sqs is 23 bytes; packed values take 8 bytes each"),
    ("packed_odd_counts", "the element counts is 25 bytes"),
    ("bytearray", "exp_avgs must be a list of data pointers or bytes"),
])
def test_pointers_refuse_bad_input_before_writing(case, match):
    a = arrays(3)
    before = [[x.copy() for x in xs] for xs in a]
    args = list(adam_args(*a))
    params = list(args[0])
    if case == "overlap":
        args[2] = list(args[2])
        args[2][1] = args[3][1]  # exp_avgs[1] is exp_avg_sqs[1]
    elif case == "grad_overlaps_param":
        args[1] = list(args[1])
        args[1][2] = params[2][2] + 4
    elif case == "count_mismatch":
        args[1] = args[1][:2]
    elif case == "misaligned":
        params[2] = list(params[2])
        params[2][1] += 2
    elif case == "null":
        args[3] = list(args[3])
        args[3][0] = 0
    elif case == "dtype":
        params[0] = "int8"
    elif case == "negative_count":
        params[1] = [9, -1, 9]
    elif case == "float_count":
        params[1] = [9, 9.0, 9]
    elif case == "index_count":
        class ClearsTheList:  # an __index__ that would empty the list being read
            def __index__(self):
                params[1].clear()
                return 9
        params[1] = [9, ClearsTheList(), 9]
    elif case.startswith("packed_") or case == "bytearray":
        args = list(packed_args(tuple(args)))
        params = list(args[0])
        pack = ft._pack
        if case == "packed_overlap":
            args[2] = pack(list(np.frombuffer(args[2], np.uint64)[:1]) +
                           [int(np.frombuffer(args[3], np.uint64)[1])] +
                           list(np.frombuffer(args[2], np.uint64)[2:]))
        elif case == "packed_count_mismatch":
            args[1] = args[1][:16]
        elif case == "packed_misaligned":
            params[2] = pack([v + (2 if k == 1 else 0) for k, v in
                              enumerate(ft._unpack(params[2]))])
        elif case == "packed_null":
            args[3] = bytes(8) + args[3][8:]
        elif case == "packed_negative_count":
            params[1] = np.array([9, -1, 9], np.int64).tobytes()
        elif case == "packed_count_overflow":
            params[1] = pack([9, 2 ** 63 - 5, 9])
        elif case == "packed_odd_size":
            args[3] = args[3][:-1]
        elif case == "packed_odd_counts":
            params[1] = params[1] + b"x"
        elif case == "bytearray":
            args[2] = bytearray(args[2])
    args[0] = tuple(params)
    with pytest.raises((TypeError, ValueError), match=match):
        _core._pointers("adam", tuple(args))
    for xs, ys in zip(a, before):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)


def test_pointers_unknown_rule():
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        _core._pointers("nope", ())


@pytest.mark.parametrize("change", ["shrink", "reshape", "transpose"])
def test_a_param_whose_layout_changed_in_place_steps_as_in_torch(change):
    """Note [A param's layout changed under its cache]: ``p.data = <a view at the same
    pointer>`` changes the shape, not the pointer the cache is keyed on. The step re-makes the
    cache and updates exactly the new view, as torch does (stateless SGD, where torch allows
    it), and leaves the rest of the old memory alone."""
    make = {"shrink": lambda t: t[:6], "reshape": lambda t: t.view(3, 4),
            "transpose": lambda t: t.view(3, 4).t()}[change]
    ref_p, p = (torch.nn.Parameter(torch.arange(12.0)) for _ in range(2))
    ref, opt = torch.optim.SGD([ref_p], lr=0.5), ft.SGD([p], lr=0.5)
    for _ in range(2):
        for q in (ref_p, p):
            q.grad = torch.ones(12)
        ref.step()
        opt.step()
    full_ref, full = ref_p.data, p.data
    ref_p.data, p.data = make(full_ref), make(full)
    assert p.data_ptr() == full.data_ptr()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        g = torch.randn(p.shape, generator=gen)
        # (fastoptim needs the gradient in its param's memory layout: the transposed view's)
        ref_p.grad, p.grad = g.clone(), torch.empty_like(p).copy_(g)
        ref.step()
        opt.step()
    torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=0, atol=0)
    torch.testing.assert_close(full, full_ref, rtol=0, atol=0)  # the rest untouched


def test_a_state_that_no_longer_fits_its_reshaped_param_is_refused_with_nothing_written():
    p = torch.nn.Parameter(torch.arange(8.0))
    opt = ft.SGD([p], lr=0.5, momentum=0.9)
    p.grad = torch.ones(8)
    opt.step()
    p.data = p.data[:4]
    p.grad = torch.ones(4)
    before = (p.detach().clone(), opt.state[p]["momentum_buffer"].clone())
    with pytest.raises(ValueError, match=r"momentum_buffer.*shape \(4,\).*\(8,\)"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert torch.equal(opt.state[p]["momentum_buffer"], before[1])


class _SwapsTheGradient:
    """A hyperparameter whose __float__ (which _core runs when it reads the call's scalars,
    after the step read the gradients' pointers) gives the gradient new memory, frees the old
    storage and fills new tensors, which the allocator places where the old one was."""

    def __init__(self, p):
        self.p, self.armed, self.use_count, self.keep = p, False, None, []

    def __float__(self):
        if self.armed:
            self.armed = False
            g = self.p.grad
            s = g.untyped_storage()
            g.set_(torch.zeros(g.numel()))  # the old storage: only what else holds it
            self.use_count = torch._C._storage_Use_Count(s._cdata)
            del s
            self.keep += [torch.full((self.p.numel(),), -1e6) for _ in range(8)]
        return 0.0

    def __ge__(self, other):  # the range checks (dampening in [0, 1])
        return True

    __le__ = __ge__


def test_a_gradient_freed_during_the_step_is_read_as_gathered(metadata_reader):
    """The kernel reads the gradients through pointers read before Python code the step runs
    (a hyperparameter's __float__); a gradient given new memory there had its old storage
    freed and the kernel read whatever was allocated there next (-1e6 here): the step now holds
    the storages until the kernel returns and reads the gradient as it was."""
    p = torch.nn.Parameter(torch.ones(1000))
    opt = ft.SGD([p], lr=1.0)
    evil = _SwapsTheGradient(p)
    opt.param_groups[0]["dampening"] = evil
    for _ in range(2):  # (the pointer path from the second step on)
        p.grad = torch.zeros(1000)
        opt.step()
    p.grad = torch.ones(1000)
    evil.armed = True
    opt.step()
    assert evil.use_count is not None
    if metadata_reader == "torch_ext":
        assert evil.use_count >= 2  # the Python object's and the step's (HeldGrads)
    assert torch.equal(p.detach(), torch.zeros(1000))  # 1 - 1.0 * (the old gradient, 1)


@pytest.mark.parametrize("whose", ["param", "grad"])
def test_a_storage_resized_to_zero_is_refused_before_any_group_steps(whose):
    """FSDP frees a param's storage between steps (resize_(0)); with two groups, the kernel
    refused the null pointer only in the second group's call, after the first was written."""
    a, b = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    opt = ft.SGD([{"params": [a]}, {"params": [b]}], lr=0.5)
    if whose == "param":  # (a param that has stepped is not resizable: its views alias it)
        b.untyped_storage().resize_(0)
    for _ in range(0 if whose == "param" else 2):  # a gradient: on the pointer path
        a.grad, b.grad = torch.ones(8), torch.ones(8)
        opt.step()
    before = a.detach().clone()
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    if whose == "grad":
        b.grad.untyped_storage().resize_(0)
    what = "" if whose == "param" else ": its gradient"
    with pytest.raises(ValueError, match=re.escape(f"param_groups[1]['params'][0]{what} has no "
                                                   "memory for its elements")):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_a_param_without_storage_is_named():
    p = torch.nn.Parameter(torch.ones(4, 4).to_sparse())
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(4, 4).to_sparse()
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['params'][0] is sparse")):
        opt.step()


def test_a_param_shrunk_at_the_same_address_is_refused(metadata_reader):
    """``p.data = buf[:500]`` after stepping ``buf[:1000]`` keeps the data pointer, and a
    gradient computed before has the old shape, which the cache expects: the step wrote
    buf[500:1000], memory no longer the param's. _torch_ext.gather compares the params' shapes
    with the cache's (Note [A param's layout changed under its cache])."""
    if metadata_reader == "python":
        pytest.skip("not caught without _torch_ext (the Note: a shape read per param per step)")
    buf = torch.zeros(2000)
    p = torch.nn.Parameter(buf[:1000])
    opt = ft.SGD([p], lr=1.0)
    for _ in range(2):
        p.grad = torch.ones(1000)
        opt.step()
    p.grad = torch.ones(1000)
    other = buf[500:1000]
    other.fill_(7.0)
    p.data = buf[:500]
    with pytest.raises(ValueError, match=re.escape("its gradient has shape (1000,), the "
                                                   "parameter (500,)")):
        opt.step()
    assert torch.equal(other, torch.full((500,), 7.0))
    assert torch.equal(buf[:500], torch.full((500,), -2.0))
    p.grad = torch.ones(500)  # a gradient of the new shape: the step goes on
    opt.step()
    assert torch.equal(buf[:500], torch.full((500,), -3.0))


def test_pointers_span_past_the_address_space_is_refused():
    """A count whose bytes run past the end of the address space from its pointer made a span
    that wrapped around, which the overlap check missed (and the kernel then wrote 2^62
    elements): refused by name before anything is written (stop 38)."""
    a = arrays(2)
    before = [[x.copy() for x in xs] for xs in a]
    args = list(adam_args(*a))
    args[0] = ("float32", [9, 2**62], args[0][2])
    with pytest.raises(ValueError, match=r"^adam_: params\[1\]: 4611686018427387904 elements of 4 "
                                         r"bytes from pointer \d+ run past the end of the address space"):
        _core._pointers("adam", tuple(args))
    for xs, ys in zip(a, before):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)
