"""fastoptim._torch_ext (src/torch/torch_ext.cpp; Note [torch extension] in fastoptim/torch.py).

Each of its functions stands in for one pass of fastoptim.torch's step over torch's Python
bindings, and must answer what that pass answers, or decline (and the step takes the Python
pass). Here each is compared, on a zoo of tensors and non-tensors, with the Python it replaces,
written out in this file. The drop-in's own tests run with the extension loaded; the pointer
path's tests (test_torch_pointers.py) run with and without it.
"""

import collections
import gc
import operator
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402

X = ft._X

needs_ext = pytest.mark.skipif(X is None, reason="fastoptim._torch_ext is not built for this torch")


def test_the_extension_is_built_where_torch_is_installed_first():
    """.ci/run installs torch before fastoptim and sets FASTOPTIM_EXPECT_TORCH_EXT=1: there the
    build must have found torch (src/torch/torch.cmake) and torch.py must load the module."""
    if os.environ.get("FASTOPTIM_EXPECT_TORCH_EXT") != "1":
        pytest.skip("FASTOPTIM_EXPECT_TORCH_EXT is not 1 (set by .ci/run)")
    from fastoptim import _torch_ext
    assert _torch_ext.TORCH_VERSION == torch.__version__
    assert X is _torch_ext


class Sub(torch.Tensor):
    pass


class ZeroGradParam(torch.nn.Parameter):
    """A parameter whose ``.grad`` reads as zeros through Python (torch honours the override;
    a C++ read of the gradient would not)."""

    @property
    def grad(self):
        g = torch.Tensor.grad.__get__(self)
        return None if g is None else torch.zeros_like(g)

    @grad.setter
    def grad(self, value):
        torch.Tensor.grad.__set__(self, value)


class PtrMode(torch.overrides.TorchFunctionMode):
    """A mode under which every data_ptr() reads 0."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.data_ptr:
            return 0
        return func(*args, **(kwargs or {}))


def grad_zoo():
    """(name, param, grad): gradients that match their param and ones that do not."""
    def p(shape=(3, 4), **kw):
        return torch.randn(shape, **kw).requires_grad_()

    base = torch.randn(3, 4)
    return [
        ("plain", p(), base.clone()),
        ("requires_grad", p(), base.clone().requires_grad_()),
        ("channels_last both", p((2, 3, 4, 5)).contiguous(memory_format=torch.channels_last)
         .detach().requires_grad_(), torch.randn(2, 3, 4, 5)
         .contiguous(memory_format=torch.channels_last)),
        ("channels_last grad only", p((2, 3, 4, 5)),
         torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
        ("float64", p(dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)),
        ("other dtype", p(), torch.randn(3, 4, dtype=torch.float64)),
        ("bfloat16", p(dtype=torch.bfloat16), torch.randn(3, 4, dtype=torch.bfloat16)),
        ("transposed", p(), torch.randn(4, 3).t()),
        ("negative view", p(), torch._neg_view(base.clone())),
        ("subclass", p(), base.clone().as_subclass(Sub)),
        ("parameter", p(), torch.nn.Parameter(base.clone(), requires_grad=False)),
        ("sparse", p(), base.clone().to_sparse()),
        ("empty", p((0, 4)), torch.randn(0, 4)),
        ("scalar", p(()), torch.randn(())),
        ("offset view", p((4,)), torch.randn(8)[4:]),
    ]


def python_match(param, grad):
    """torch.py's _grads_match for one gradient (Note [pointer path]), against the param's
    metadata as the group cache records it."""
    try:
        return (type(grad) is torch.Tensor and grad.dtype == param.dtype
                and grad.shape == param.shape and grad.is_cpu
                and grad.stride() == param.stride() and not grad.is_neg())
    except RuntimeError:  # no strides (sparse)
        return False


def meta(params):
    return ([p.dtype for p in params], [p.shape for p in params], [p.stride() for p in params])


def grads(params, dtypes, shapes, strides):
    """gather without state dicts: (grads, grad pointers, param pointers); its fourth answer
    is then None."""
    *out, same = X.gather(params, dtypes, shapes, strides, None, (), ())
    assert same is None
    return tuple(out)


@needs_ext
@pytest.mark.parametrize("name, param, grad", grad_zoo(), ids=[z[0] for z in grad_zoo()])
def test_grads_answers_what_the_python_check_answers(name, param, grad):
    if grad.dtype != param.dtype:
        param.grad_dtype = None  # torch refuses another dtype unless told
    param.grad = grad
    plain = torch.randn(5).requires_grad_()
    plain.grad = torch.randn(5)
    for params in ([param], [plain, param], [param, plain]):
        gs, ptrs, pptrs = grads(params, *meta(params))
        assert len(gs) == len(params)
        assert all(g is p.grad for g, p in zip(gs, params))
        if all(python_match(p, p.grad) for p in params):
            assert ptrs == [p.grad.data_ptr() for p in params], name
        else:
            assert ptrs is None, name
        assert pptrs == [p.data_ptr() for p in params], name


@needs_ext
def test_only_plain_tensors_are_read_in_cpp():
    """A subclass may override .grad or data_ptr() in Python: the extension declines."""
    p = ZeroGradParam(torch.randn(3))
    p.grad = torch.ones(3)
    assert torch.equal(p.grad, torch.zeros(3))  # what torch.py would read
    assert X.gather([p], *meta([p]), None, (), ()) == (None,) * 4
    assert X.data_ptrs([torch.randn(2).as_subclass(Sub)]) is None
    assert X.same_pointers([{"a": torch.randn(2).as_subclass(Sub)}], ("a",), ([0],)) is False
    assert X.bump_versions([torch.randn(2).as_subclass(Sub)]) is False


@needs_ext
def test_the_extension_is_not_used_under_a_torch_function_mode():
    assert ft._ext() is X
    with PtrMode():
        assert torch.randn(2).data_ptr() == 0
        assert ft._ext() is None
    assert ft._ext() is X


@pytest.mark.parametrize("make", ["ZeroGradParam", "Parameter"])
def test_a_parameter_subclass_that_overrides_grad_steps_as_in_torch(make):
    cls = {"ZeroGradParam": ZeroGradParam, "Parameter": torch.nn.Parameter}[make]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, generator=gen) for _ in range(3)]
    ref = [cls(t.clone()) for t in start]
    ours = [cls(t.clone()) for t in start]
    opt_ref = torch.optim.SGD(ref, lr=0.5, momentum=0.9)
    opt = ft.SGD(ours, lr=0.5, momentum=0.9)
    for _ in range(3):
        for a, b in zip(ref, ours):
            g = torch.randn(5, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach(), a.detach())


@needs_ext
def test_a_plain_step_reads_through_the_extension(monkeypatch):
    """At steady state the drop-in takes the extension's answers (it does not decline)."""
    answers = {"gather": [], "same_pointers": [], "data_ptrs": [], "bump_versions": [],
               "same_entries": []}

    class Spy:
        def __getattr__(self, name):
            real = getattr(X, name)

            def call(*args):
                out = real(*args)
                answers[name].append(out)
                return out
            return call

    params = [torch.randn(4, 3).requires_grad_() for _ in range(4)]
    opt = ft.Adam(params, lr=0.1)
    monkeypatch.setattr(ft, "_X", Spy())
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(4, 3)
        for a in answers.values():
            a.clear()
        opt.step()
    # Note [one walk]: from the second step on, one gather answers all but the version bump
    gs, gptrs, pptrs, same = answers["gather"][-1]
    assert len(answers["gather"]) == 1
    assert all(g is p.grad for g, p in zip(gs, params))
    # (packed: Note [packed pointers])
    assert type(gptrs) is bytes and ft._unpack(gptrs) == [p.grad.data_ptr() for p in params]
    assert type(pptrs) is bytes and ft._unpack(pptrs) == [p.data_ptr() for p in params]
    assert same is True
    assert answers["same_pointers"] == [] and answers["data_ptrs"] == []
    assert answers["bump_versions"] == [True]
    # self.state compared with the last step's snapshot, before the step and after it
    assert answers["same_entries"] == [True, True]


def _entries_python(d, keys, values):
    """same_entries' answer, written as torch.py's Python comparison."""
    return (len(keys) == len(d) and all(map(operator.is_, keys, list(d)))
            and len(values) == len(d) and all(map(operator.is_, values, list(d.values()))))


@needs_ext
@pytest.mark.parametrize("edit", ["none", "value", "equal value", "key", "added", "removed",
                                  "reordered", "cleared", "shorter lists", "defaultdict"])
def test_same_entries_is_the_python_identity_comparison(edit):
    params = [torch.randn(2) for _ in range(40)]
    d = {p: {"step": torch.tensor(0.0)} for p in params}
    keys, values = list(d), list(d.values())
    if edit == "value":
        d[params[17]] = {"step": torch.tensor(0.0)}
    elif edit == "equal value":  # an equal object that is another one
        d[params[39]] = dict(d[params[39]])
    elif edit == "key":
        d[torch.randn(2)] = d.pop(params[0])
    elif edit == "added":
        d[torch.randn(2)] = {}
    elif edit == "removed":
        del d[params[39]]
    elif edit == "reordered":
        d[params[5]] = d.pop(params[5])
    elif edit == "cleared":
        d.clear()
    elif edit == "shorter lists":
        keys, values = keys[:-1], values[:-1]
    elif edit == "defaultdict":
        d = collections.defaultdict(dict, d)
    assert X.same_entries(d, keys, values) is _entries_python(d, keys, values)
    assert X.same_entries(d, keys, values) is (edit in ("none", "defaultdict"))
    with pytest.raises(TypeError):
        X.same_entries(list(d), keys, values)


@needs_ext
@pytest.mark.parametrize("how", ["extension", "python", "dict subclass"])
def test_a_state_dict_replaced_between_steps_is_seen(monkeypatch, how):
    """The drop-in keeps its snapshot of ``self.state`` while nothing changes
    (_state_resnapshot) and still sees a dict replaced between two steps: the states are then
    bound again from the new dict, as torch.optim reads them. Compared by same_entries, or in
    Python without the extension or for a ``self.state`` of another type."""
    if how == "python":
        monkeypatch.setattr(ft, "_X", None)
    torch.manual_seed(0)
    params = [torch.randn(3).requires_grad_() for _ in range(3)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = ft.Adam(params, lr=0.1), torch.optim.Adam(twins, lr=0.1)
    if how == "dict subclass":
        class State(dict):
            pass
        opt.state = State()
    for step in range(4):
        for p, q in zip(params, twins):
            p.grad = torch.randn(3)
            q.grad = p.grad.clone()
        if step == 2:
            snapshot = opt._snapshot
            for o in (opt, ref):
                p = o.param_groups[0]["params"][1]
                o.state[p] = {k: v.clone() * 0.5 for k, v in o.state[p].items()}
        opt.step()
        ref.step()
        if step == 1:
            kept = opt._snapshot
        if step == 3:
            assert opt._snapshot is not kept and snapshot is kept
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


@needs_ext
def test_a_state_dict_with_a_key_that_is_not_a_str_steps_through_the_python_pass(monkeypatch):
    """gather and same_pointers decline such a dict (they walk entries instead of running a
    key's __eq__); the step then compares the pointers in Python and updates exactly as without
    the key."""
    answers = []

    def spy(name):
        if name == "same_pointers":
            return lambda *a: answers.append(X.same_pointers(*a)) or answers[-1]
        if name == "gather":
            return lambda *a: answers.append(X.gather(*a)) or answers[-1]
        return getattr(X, name)
    monkeypatch.setattr(ft, "_X", type("Spy", (), {"__getattr__": lambda self, name: spy(name)})())
    torch.manual_seed(0)
    a = [torch.randn(5, 3).requires_grad_() for _ in range(3)]
    b = [t.detach().clone().requires_grad_() for t in a]
    opt_a, opt_b = ft.Adam(a, lr=0.1), ft.Adam(b, lr=0.1)
    for step in range(4):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(5, 3)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
        if step == 1:
            opt_b.state[b[1]][("user", "key")] = 0  # a key the step does not use
    answers = [a[3] if isinstance(a, tuple) else a for a in answers]  # gather's: its 4th
    assert answers[-1] is False  # declined for opt_b, whose dict has the odd key ...
    assert True in answers        # ... while opt_a's (and opt_b's before) were answered
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k])


@needs_ext
def test_grads_with_a_missing_gradient_gives_none_there_and_no_pointers():
    params = [torch.randn(3).requires_grad_() for _ in range(3)]
    params[0].grad = torch.randn(3)
    params[2].grad = torch.randn(3)
    gs, ptrs, pptrs = grads(params, *meta(params))
    assert gs[0] is params[0].grad and gs[1] is None and gs[2] is params[2].grad
    assert ptrs is None
    assert pptrs == [p.data_ptr() for p in params]


@needs_ext
def test_grads_compares_with_the_given_metadata_not_the_params():
    """The expected dtype, shape and strides are the cached ones torch.py passes."""
    p = torch.randn(3, 4).requires_grad_()
    p.grad = torch.randn(3, 4)
    assert grads([p], [torch.float32], [(3, 4)], [(4, 1)])[1] == [p.grad.data_ptr()]
    assert grads([p], [torch.float64], [(3, 4)], [(4, 1)])[1] is None
    assert grads([p], [torch.float32], [(4, 3)], [(4, 1)])[1] is None
    assert grads([p], [torch.float32], [(3, 4)], [(1, 3)])[1] is None
    assert grads([p], [torch.float32], [(3, 4, 1)], [(4, 1, 1)])[1] is None
    assert grads([p], ["float32"], [(3, 4)], [(4, 1)])[1] is None
    assert grads([p], [torch.float32], [(3, "4")], [(4, 1)])[1] is None
    assert grads([p], [torch.float32], [(3, 2 ** 70)], [(4, 1)])[1] is None


@pytest.mark.parametrize("args", [
    ("not a list", [], [], []),
    ([1.5], [torch.float32], [(1,)], [(1,)]),
    ([torch.randn(2)], [], [(2,)], [(1,)]),
    ([torch.randn(2)], [torch.float32], (2,), [(1,)]),
], ids=["params not a list", "a float param", "dtypes too short", "shapes not a list"])
@needs_ext
def test_gather_declines_what_is_not_a_list_of_tensors(args):
    assert X.gather(*args, None, (), ()) == (None,) * 4


def state_dicts():
    return [{"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)} for _ in range(4)]


def same_by_gather(dicts, keys, want):
    """gather's fourth answer (Note [one walk]), for as many plain params as there are dicts."""
    params = [torch.randn(2).requires_grad_() for _ in range(len(dicts))]
    return X.gather(params, *meta(params), dicts, keys, want)[3]


@needs_ext
@pytest.mark.parametrize("compare", ["same_pointers", "gather"])
def test_same_pointers_answers_what_the_python_comparison_answers(compare):
    dicts = state_dicts()
    keys = ("exp_avg", "step")
    want = tuple([d[k].data_ptr() for d in dicts] for k in keys)
    fn = X.same_pointers if compare == "same_pointers" else same_by_gather

    def same(dicts=dicts, keys=keys, want=want):
        return fn(dicts, keys, want)

    assert same() is True
    assert same(keys=keys[:1], want=want[:1]) is True
    assert same(keys=(), want=()) is True
    assert same(want=(want[0][:-1], want[1])) is False
    assert same(want=(want[0], want[1][::-1])) is False
    assert same(want=want[:1]) is False
    assert same(keys=("exp_avg", "missing")) is False
    assert same(dicts=list(reversed(dicts))) is False
    assert same(want=(want[0], [str(w) for w in want[1]])) is False
    assert same(dicts=tuple(dicts)) is False
    dicts[2]["exp_avg"].data = torch.zeros(3)  # same object, new memory
    assert same() is False
    dicts[2]["exp_avg"] = 0.0
    assert same() is False
    dicts[2] = None
    assert same() is False
    assert same(keys=(["unhashable"], "step")) is False  # (torch.py's lookup then raises)
    odd = [dict(d) for d in state_dicts()]
    odd[1][("not", "a", "str")] = 1  # a key that is not an exact str: declined
    assert fn(odd, keys, tuple([d[k].data_ptr() for d in odd] for k in keys)) is False
    fine = [dict(d) for d in state_dicts()]
    fine[1]["other"] = 1  # other str keys are fine
    assert fn(fine, keys, tuple([d[k].data_ptr() for d in fine] for k in keys)) is True
    with pytest.raises(TypeError):
        fn(state_dicts(), list(keys), want)


@needs_ext
def test_gather_compares_the_states_of_as_many_dicts_as_params():
    dicts = state_dicts()
    keys = ("exp_avg", "step")
    want = tuple([d[k].data_ptr() for d in dicts] for k in keys)
    params = [torch.randn(2).requires_grad_() for _ in dicts]
    for p in params:
        p.grad = torch.randn(2)
    assert X.gather(params, *meta(params), dicts, keys, want)[3] is True
    assert X.gather(params[:-1], *meta(params[:-1]), dicts, keys, want)[3] is False
    # the state comparison does not change the other answers, nor they it
    out = X.gather(params, *meta(params), list(reversed(dicts)), keys, want)
    assert out[3] is False and out[1] == [p.grad.data_ptr() for p in params]
    params[1].grad = None
    out = X.gather(params, *meta(params), dicts, keys, want)
    assert out[3] is True and out[1] is None and out[2] == [p.data_ptr() for p in params]


def changed_case(n, change):
    """n params with gradients and state dicts, after change(params, dicts) edits them; their
    metadata and expected pointers as before the change."""
    params = [torch.randn(2).requires_grad_() for _ in range(n)]
    for p in params:
        p.grad = torch.randn(2)
    dicts = [{"exp_avg": torch.zeros(2), "step": torch.tensor(0.0)} for _ in range(n)]
    keys = ("exp_avg", "step")
    want = tuple([d[k].data_ptr() for d in dicts] for k in keys)
    args = (params, *meta(params), dicts, keys, want)
    change(params, dicts)
    return args


def _no_grad(params, dicts, i):
    params[i].grad = None


def _grad_dtype(params, dicts, i):
    params[i].grad_dtype = None
    params[i].grad = torch.zeros(2, dtype=torch.float64)


def _state_moved(params, dicts, i):
    dicts[i]["step"] = torch.tensor(0.0)


def _state_odd_key(params, dicts, i):
    dicts[i][0] = 1


def _not_a_tensor(params, dicts, i):
    params[i] = 1.5


def _no_storage(params, dicts, i):
    params[i] = torch.randn(2).to_sparse().requires_grad_()


@needs_ext
@pytest.mark.parametrize("change", [None, _no_grad, _grad_dtype, _state_moved, _state_odd_key,
                                    _not_a_tensor, _no_storage])
@pytest.mark.parametrize("where", [0, 1, 15, 16, 500, 1999])
@pytest.mark.parametrize("threads, packed", [(1, False), (2, False), (2, True)])
def test_gather_finds_a_change_at_any_place(change, where, threads, packed):
    """A change at the first items (the lookahead not yet running), in the middle or at the
    last item (the lookahead past the end) of 2,000 params, in the params or the dicts; with
    threads=2 the two loops run at once on two of torch's threads (Note [split walk]) where
    the extension has OpenMP and torch two threads; packed, the expected and returned pointers
    are bytes (Note [packed pointers])."""
    args = changed_case(2000, (lambda p, d: None) if change is None else
                      (lambda p, d: change(p, d, where)))
    params = args[0]
    if packed:
        args = args[:-1] + (tuple(map(ft._pack, args[-1])),)
    out = X.gather(*args, threads, packed)
    if packed and out[0] is not None:
        out = (out[0],) + tuple(ft._unpack(v) if type(v) is bytes else v for v in out[1:3]) + (
            out[3],)
    split = threads == 2 and hasattr(X, "runner") and torch.get_num_threads() >= 2
    assert X.last_gather_split() is split
    if change is _not_a_tensor:
        assert out == (None,) * 4
        return
    assert all(g is p.grad for g, p in zip(out[0], params)) and len(out[0]) == len(params)
    no_grad_ptrs = change in (_no_grad, _grad_dtype, _no_storage)
    assert out[1] == (None if no_grad_ptrs else [p.grad.data_ptr() for p in params])
    assert out[2] == (None if change is _no_storage else [p.data_ptr() for p in params])
    assert out[3] is (change not in (_state_moved, _state_odd_key))
    assert out[3] is X.same_pointers(*args[4:])


@needs_ext
@pytest.mark.skipif(not hasattr(X, "runner"), reason="the extension was built without OpenMP")
def test_gather_splits_only_where_it_pays_and_torch_has_the_threads():
    """Note [split walk]: two threads from 512 params, when asked for two and torch has two;
    never at 511, nor with torch at one thread; the answers the same each way."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n, threads, torch_threads, split in [(512, 2, 2, True), (511, 2, 2, False),
                                                 (512, 1, 2, False), (512, 2, 1, False)]:
            args = changed_case(n, lambda p, d: _state_moved(p, d, n - 1))
            torch.set_num_threads(torch_threads)
            out = X.gather(*args, threads)
            assert X.last_gather_split() is split, (n, threads, torch_threads)
            assert out[3] is False and out[1] == [p.grad.data_ptr() for p in args[0]]
            again = X.gather(*args, 1)
            assert list(out[0]) == list(again[0]) and out[1:] == again[1:]
            assert not X.last_gather_split()
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_gather_holds_the_gradients_and_wraps_one_only_when_read():
    """Note [gradients held]: gather's gradients are a read-only sequence (len, indexing from
    either end, iteration) of each param's .grad or None; gradients made by backward get no
    Python object from gather itself; the sequence keeps the gradients, and so the pointers it
    gave, alive after the params let them go."""
    params = [torch.randn(3).requires_grad_() for _ in range(3)]
    torch.autograd.backward([(p * 2).sum() for p in params[:2]])  # .grad made in C++

    def tensors():
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    before = tensors()
    gs, gptrs, pptrs = grads(params, *meta(params))
    assert tensors() == before  # (no gradient wrapped: neither had a Python object yet)
    assert type(gs) is X.Grads and len(gs) == 3 and gptrs is None  # (params[2]: no gradient)
    assert gs[0] is params[0].grad and gs[-2] is params[1].grad and gs[-1] is gs[2] is None
    assert list(gs) == [params[0].grad, params[1].grad, None] and tensors() == before + 2
    for bad in (3, -4):
        with pytest.raises(IndexError):
            gs[bad]
    with pytest.raises(TypeError):
        X.Grads()
    with pytest.raises(TypeError):
        gs[0] = None
    held = [gs[0].data_ptr(), gs[1].data_ptr()]
    for p in params:
        p.grad = None
    gc.collect()
    assert [gs[0].data_ptr(), gs[1].data_ptr()] == held
    torch.testing.assert_close(gs[1], torch.full((3,), 2.0))


@needs_ext
def test_gather_gives_no_param_pointers_when_a_param_has_no_storage():
    params = [torch.randn(3).requires_grad_(), torch.randn(3).to_sparse().requires_grad_()]
    gs, gptrs, pptrs = grads(params, [torch.float32] * 2, [(3,)] * 2, [(1,)] * 2)
    assert list(gs) == [None, None] and gptrs is None and pptrs is None


# A dict lookup may run Python code: a key whose hash equals the key looked up is compared
# with it (__eq__), and that code could change the expected lists, drop the state dicts or the
# list of them, or replace a tensor. same_pointers walks each dict's entries instead of looking
# keys up, and declines (False) at a key that is not an exact str, before any such code can
# run: every case below answers False and the colliding key's __eq__ never runs. Run with
# PYTHONMALLOC=debug, which fills freed memory with a pattern, so that a freed dict, list or int
# read by the extension would crash the child (and ASan reports it).
SAME_POINTERS_UNDER_LOOKUP_CODE = r"""
import gc, sys
import torch
import fastoptim.torch as ft
X = ft._X
keys = ("exp_avg", "step")

class Collide:
    armed = False
    def __init__(self, action):
        self.action = action
    def __hash__(self):
        return hash("exp_avg")
    def __eq__(self, other):
        if Collide.armed:
            Collide.armed = False
            self.action()
            gc.collect()
        return False

def by_gather(dicts, keys, want):
    params = [torch.randn(2).requires_grad_() for _ in range(len(dicts))]
    meta = ([p.dtype for p in params], [p.shape for p in params], [p.stride() for p in params])
    return X.gather(params, *meta, dicts, keys, want)[3]

def case(which, action_of):
    # The Collide key sits in dict `which` (0: the first, -1: the last); the caller keeps
    # no reference to the dicts but the list.
    dicts = [{"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)} for _ in range(4)]
    want = tuple([d[k].data_ptr() for d in dicts] for k in keys)
    odd = {Collide(action_of(dicts, want)): 0}
    odd.update(dicts[which])
    dicts[which] = odd
    del odd
    Collide.armed = True
    answer = compare(dicts, keys, want)
    ran = not Collide.armed
    Collide.armed = False
    return f"{answer}/{'ran' if ran else 'not-run'}"

def nothing(dicts, want):
    return lambda: None
def drop_tensors(dicts, want):  # every dict but the one being looked up
    return lambda: [d.clear() for d in dicts if not any(isinstance(k, Collide) for k in d)]
def shrink_expected(dicts, want):
    return lambda: (want[0].clear(), want[1].clear())
def drop_dicts(dicts, want):
    return dicts.clear
class ClearsOnDel:
    def __init__(self, lst):
        self.lst = lst
    def __del__(self):
        self.lst.clear()
def swap_then_clear(dicts, want):  # the dict looked up leaves the list (its length kept), and
    def act():                     # freeing it later empties the list
        i = next(j for j, d in enumerate(dicts) if any(isinstance(k, Collide) for k in d))
        dicts[i]["extra"] = ClearsOnDel(dicts)
        dicts[i] = {}
    return act
def replace_tensor(dicts, want):
    def act():
        dicts[0]["step"] = torch.tensor(2.0)
    return act

for compare in (X.same_pointers, by_gather):
    print(case(-1, nothing), case(0, nothing), case(-1, drop_tensors), case(0, drop_tensors),
          case(-1, shrink_expected), case(0, shrink_expected), case(-1, drop_dicts),
          case(0, drop_dicts), case(-1, replace_tensor), case(0, swap_then_clear))
"""


def run_under_debug_malloc(code):
    """The words `code` prints, run in a child with PYTHONMALLOC=debug (freed memory filled
    with a pattern: a freed object read by the extension crashes the child)."""
    env = dict(os.environ, PYTHONMALLOC="debug")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()


@needs_ext
def test_same_pointers_survives_a_lookup_that_runs_python_code():
    answers = run_under_debug_malloc(SAME_POINTERS_UNDER_LOOKUP_CODE)
    assert answers == ["False/not-run"] * 20, answers


# gather returns each gradient as a Python object; a gradient that backward made in C++ has none
# yet, so wrapping it allocates, which may run a collection, whose finalizers may run Python
# code: here one that empties the list of params, the metadata lists, the state dicts and their
# list. Note [one walk]: gather allocates no Python object until its loop has read everything,
# so the collection comes after the reads, and the answer is whole: every gradient (held by the
# returned list), its pointer, the params' pointers and the state comparison. Run with
# PYTHONMALLOC=debug: a freed list, dict or int read by the extension would crash the child.
GATHER_UNDER_COLLECTION_CODE = r"""
import gc
import torch
import fastoptim.torch as ft
X = ft._X

class Clears:
    def __init__(self, lists):
        self.lists = lists
        self.cycle = self
    def __del__(self):
        for lst in self.lists:
            lst.clear()

def case(n, threshold):
    params = [torch.randn(64).requires_grad_() for _ in range(n)]
    sum((p * p).sum() for p in params).backward()  # gradients without Python objects yet
    pptrs = [p.data_ptr() for p in params]
    dicts = [{"exp_avg": torch.zeros(2)} for _ in range(n)]
    want = ([d["exp_avg"].data_ptr() for d in dicts],)
    lists = [params, [p.dtype for p in params], [p.shape for p in params],
             [p.stride() for p in params], dicts, want[0]]
    args = (*lists[:5], ("exp_avg",), want)
    gc.collect()
    gc.disable()
    Clears(lists + dicts)  # garbage in a cycle: freed by the next collection
    gc.set_threshold(threshold)  # which allocation (of the call's) starts the collection
    gc.enable()
    try:
        grads, ptrs, got_pptrs, same = X.gather(*args)
        emptied = not params  # (a collection before or during the call)
    finally:
        gc.set_threshold(700)
    gc.collect()
    assert not params and not dicts
    if len(grads) == n and ptrs == [g.data_ptr() for g in grads] and got_pptrs == pptrs:
        kind = "whole" if same is True else "other"
    else:  # the lists were emptied before the call: it read empty lists
        kind = "empty" if list(grads) == ptrs == got_pptrs == [] and same is True else "other"
    return f"{kind}/{emptied}"

print(*(case(n, t) for n in (3, 40) for t in range(1, 12)))
"""


@needs_ext
def test_gather_survives_a_collection_that_empties_its_lists():
    answers = run_under_debug_malloc(GATHER_UNDER_COLLECTION_CODE)
    # A collection during the call, after gather's reads: the answer is whole. One before the
    # call (the lists read empty) or after it is fine too; nothing else happens.
    assert "whole/True" in answers, answers
    assert set(answers) <= {"whole/True", "empty/True", "whole/False"}, answers


@needs_ext
def test_data_ptrs_is_data_ptr_of_each_tensor_or_declines():
    ts = [torch.randn(3), torch.nn.Parameter(torch.randn(2)), torch.randn(8)[2:],
          torch.randn(0)]
    assert X.data_ptrs(ts) == [t.data_ptr() for t in ts]
    assert X.data_ptrs([]) == []
    assert X.data_ptrs(ts + [3]) is None
    assert X.data_ptrs(tuple(ts)) is None


@needs_ext
def test_bump_versions_is_torchs_increment_version():
    from torch.autograd.graph import increment_version
    ts = [torch.randn(3), torch.nn.Parameter(torch.randn(2)), torch.randn(8)[2:]]
    with torch.inference_mode():
        ts.append(torch.randn(3))
    with torch.inference_mode():
        twins = [t.clone() if t.is_inference() else None for t in ts]
    twins = [tw if tw is not None else t.detach().clone() for t, tw in zip(ts, twins)]

    def versions(tensors):
        return [None if t.is_inference() else t._version for t in tensors]

    before, twins_before = versions(ts), versions(twins)
    assert X.bump_versions(ts) is True
    increment_version(twins)  # torch's own, on twins of the same kinds
    delta = [None if b is None else a - b for a, b in zip(versions(ts), before)]
    twin_delta = [None if b is None else a - b for a, b in zip(versions(twins), twins_before)]
    assert delta == twin_delta == [1, 1, 1, None]
    assert X.bump_versions(ts[:2] + ["x"]) is False  # checked first: nothing bumped
    assert [t._version for t in ts[:2]] == [b + 1 for b in before[:2]]
