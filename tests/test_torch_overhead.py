"""The per-step checks of fastoptim.torch's default path (Notes [Views are cached], [pointer
path] and [Step store moves] in fastoptim/torch.py): what a step may skip because nothing
changed, and the changes it must still catch.

Every test steps ``torch.optim.X(foreach=False)`` and ``fastoptim.torch.X`` on equal copies,
makes the same change to both mid-run, and compares params and states afterwards (torch's
implementation is the reference), or checks that a bad gradient raises naming the param
before anything is written.
"""

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402

SHAPES = [(7,), (3, 5), (4,), (2, 3, 2)]


def twins(shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    expected = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    actual = [p.detach().clone().requires_grad_() for p in expected]
    return expected, actual


def step_both(ref, opt, expected, actual, steps=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(expected, actual):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            q.grad = g.clone()
        ref.step()
        opt.step()


def assert_same(ref, opt, expected, actual):
    for p, q in zip(expected, actual):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
        for key, want in ref.state[p].items():
            torch.testing.assert_close(opt.state[q][key], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", ["Adam", "NAdam"])
def test_step_counts_moved_by_share_memory_are_followed(cls):
    """``state['step'].share_memory_()`` moves the memory that every step count of the group
    shares (they are views of one tensor, Note [Steps live in one tensor per group]): the
    counts must be read and written where they now are, not in the freed memory."""
    expected, actual = twins()
    ref = getattr(torch.optim, cls)(expected, lr=0.01, foreach=False)
    opt = getattr(ft, cls)(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    for p, q in zip(expected, actual):
        for key, value in opt.state[q].items():
            if value.dim() == 0:  # step, and NAdam's mu_product
                value.share_memory_()
                ref.state[p][key].share_memory_()
    step_both(ref, opt, expected, actual, steps=3, seed=2)
    assert_same(ref, opt, expected, actual)
    assert opt.state[actual[0]]["step"].item() == 5


def test_a_step_count_given_new_memory_is_followed():
    """``state['step'].data = ...`` points the count at other memory holding another value:
    torch continues from that value, and so must the drop-in."""
    expected, actual = twins()
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    ref.state[expected[1]]["step"].data = torch.tensor(10.0)
    opt.state[actual[1]]["step"].data = torch.tensor(10.0)
    step_both(ref, opt, expected, actual, seed=2)
    assert_same(ref, opt, expected, actual)
    assert opt.state[actual[1]]["step"].item() == 12
    assert opt.state[actual[0]]["step"].item() == 4


def test_a_param_given_new_memory_is_updated_there():
    """``p.data = other`` mid-run: the next step updates the new memory (the old may be
    freed), on the pointer path as on the first step."""
    expected, actual = twins()
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    old = actual[2].detach().clone()
    for p, q in ((expected[2], actual[2]), (expected[0], actual[0])):
        p.data = p.data.clone()
        q.data = q.data.clone()
    step_both(ref, opt, expected, actual, seed=2)
    assert_same(ref, opt, expected, actual)
    assert not torch.equal(actual[2].detach(), old)


@pytest.mark.parametrize("how", ["replaced", "data", "share_memory"])
def test_a_state_moved_mid_run_is_followed(how):
    """A state replaced in ``state``, given new memory with ``.data =``, or moved by
    ``share_memory_()``: the next step updates the tensor ``state`` holds."""
    expected, actual = twins()
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    for p, q in zip(expected[1:3], actual[1:3]):
        for o, t in ((ref, p), (opt, q)):
            if how == "replaced":
                o.state[t]["exp_avg_sq"] = o.state[t]["exp_avg_sq"].clone()
            elif how == "data":
                o.state[t]["exp_avg"].data = o.state[t]["exp_avg"].detach().clone()
            else:
                o.state[t]["exp_avg"].share_memory_()
    held = [opt.state[q]["exp_avg"] for q in actual]
    step_both(ref, opt, expected, actual, seed=2)
    assert_same(ref, opt, expected, actual)
    assert all(opt.state[q]["exp_avg"] is t for q, t in zip(actual, held))


@pytest.mark.parametrize("bad, kind, text", [
    (lambda g: g.double(), TypeError, "its gradient has dtype torch.float64"),
    (lambda g: g.reshape(-1) if g.dim() > 1 else g.reshape(1, -1), ValueError,
     "its gradient has shape"),
    (lambda g: g.to_sparse(), TypeError, "its gradient is sparse"),
])
def test_a_bad_gradient_mid_run_raises_and_writes_nothing(bad, kind, text):
    """After steps on the pointer path, a gradient of another dtype or shape (set behind
    torch's back, through ``.data``) or layout raises naming its param, and nothing is written;
    with good gradients again, the steps continue as torch's."""
    expected, actual = twins()
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    for q in actual:
        q.grad = torch.ones_like(q)
    g = bad(actual[1].grad.detach())
    if g.is_sparse:  # torch accepts a sparse gradient for a dense param
        actual[1].grad = g
    else:  # torch refuses these in p.grad = ..., not through .data
        actual[1].grad.data = g
    before = [q.detach().clone() for q in actual]
    states = [{k: v.clone() for k, v in opt.state[q].items()} for q in actual]
    with pytest.raises(kind, match=r"param_groups\[0\]\['params'\]\[1\]: " + text):
        opt.step()
    for q, b, s in zip(actual, before, states):
        assert torch.equal(q.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[q][k], v)
    step_both(ref, opt, expected, actual, seed=3)
    assert_same(ref, opt, expected, actual)


def test_a_non_contiguous_gradient_mid_run_gives_torchs_result():
    """A gradient with the param's shape but other strides (a transposed copy) leaves the
    pointer path for the checked NumPy path; the result is still torch's."""
    expected, actual = twins([(3, 4), (5,)])
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(4, 3, generator=gen).t()  # shape (3, 4), strides (1, 3)
    expected[0].grad = g.clone()
    actual[0].grad = g
    expected[1].grad = torch.ones(5)
    actual[1].grad = torch.ones(5)
    try:
        opt.step()
    except ValueError as err:  # the drop-in may refuse it, naming the param
        assert "param_groups[0]['params'][0]: its gradient" in str(err)
        return
    ref.step()
    assert_same(ref, opt, expected, actual)


# -- Note [prefetch hints] -------------------------------------------------------------------------

needs_prefetch = pytest.mark.skipif(ft._PREFETCH is None, reason="_core has no _prefetch")


@needs_prefetch
def test_prefetch_takes_any_address():
    """A hint never faults: null, unmapped, kernel-space and misaligned addresses."""
    import numpy as np
    from fastoptim import _core
    _core._prefetch(np.array([0, 1, -1, 2**62, -(2**63), 12345], dtype=np.int64))
    _core._prefetch(np.array([], dtype=np.int64))
    _core._prefetch([3, 5])  # any int sequence converts
    with pytest.raises(TypeError):
        _core._prefetch("not addresses")


@needs_prefetch
def test_prefetch_addresses_follow_the_tensors_and_never_matter():
    """The addresses are gathered once the same tensors stepped a few times, dropped when a
    state is rebound; and garbage addresses change nothing in the result."""
    import numpy as np
    expected, actual = twins()
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    step_both(ref, opt, expected, actual, steps=ft._PREFETCH_AFTER + 1)
    (c,) = opt._caches.values()
    assert c.prefetch is not None and c.prefetch[0].size > 0
    assert id(actual[0]) in set(c.prefetch[0].tolist())
    assert len(c.prefetch[1]) == 3  # exp_avg (and the state dicts), exp_avg_sq, step
    assert id(opt.state[actual[1]]["exp_avg_sq"]) in set(c.prefetch[1][1].tolist())
    opt.state[actual[1]]["exp_avg"] = opt.state[actual[1]]["exp_avg"].clone()
    ref.state[expected[1]]["exp_avg"] = ref.state[expected[1]]["exp_avg"].clone()
    step_both(ref, opt, expected, actual, steps=1, seed=2)
    assert c.prefetch is None  # rebound this step: gathered again later
    step_both(ref, opt, expected, actual, steps=ft._PREFETCH_AFTER + 1, seed=3)
    assert c.prefetch is not None
    rng = np.random.default_rng(0)
    c.prefetch = tuple(rng.integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64)
                       for _ in range(2))
    c.prefetch = (c.prefetch[0], [c.prefetch[1]] * 3)
    step_both(ref, opt, expected, actual, steps=2, seed=4)
    assert_same(ref, opt, expected, actual)


def test_bench_can_leave_out_torch_implementations():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_torch.py"
    spec = importlib.util.spec_from_file_location("bench_torch_skip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--cases", "many_tensors", "--repeats", "2", "--tensors", "10",
                           "--tensor-numel", "64", "--skip", "torch foreach"])
    assert {row["impl"] for row in results["rows"]} == {"fastoptim.torch", "raw adam_",
                                                        "torch fused"}
    assert not [key for key in results["summary"] if "foreach" in key]
    assert [key for key in results["summary"] if "torch_fused" in key]
