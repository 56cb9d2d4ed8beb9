"""fastoptim.torch against torch.optim itself (the oracle here is torch's single-tensor path).

Every optimizer and every option combination torch supports runs 50 steps side by side with
``torch.optim.X(foreach=False)`` on the same gradients; every parameter and every state tensor
(``step`` included) is compared after the last step. Then the torch.optim.Optimizer contract:
param groups, parameters without gradients, zero_grad, closures, schedulers, state_dict in
torch's layout with checkpoints moving both ways, and bad inputs that raise before anything
is written.
"""

import copy
import gc
import importlib.util
import inspect
import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as ft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
SHAPES = [(3, 5), (17,), (1,), (0,), (4099,)]  # 4099: full SIMD vectors plus a tail
DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def tol(dtype):
    """(rtol, atol) for comparing with torch after STEPS steps.

    The kernels evaluate torch's formulas with fused multiply-adds and in another order, so the
    last bits differ and drift for 50 steps: fp32 rtol 1e-5, fp64 rtol 1e-12 (the issue's
    bounds). atol covers elements that pass near zero, where a relative bound means nothing;
    the compared values are O(0.01..10).
    """
    return (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)


def options(**choices):
    """Every combination of the given option values, as kwargs dicts."""
    names = list(choices)
    return [dict(zip(names, values)) for values in itertools.product(*choices.values())]


def sgd_cases():
    cases = []
    for case in options(momentum=[0, 0.9], dampening=[0, 0.3], nesterov=[False, True],
                        weight_decay=[0, 0.1], maximize=[False, True]):
        if case["momentum"] == 0 and (case["dampening"] or case["nesterov"]):
            continue
        if case["nesterov"] and case["dampening"]:
            continue  # torch: Nesterov momentum requires zero dampening
        cases.append(dict(lr=0.05, **case))
    return cases


# Every option combination each torch optimizer accepts (torch 2.13).
CASES = (
    [("SGD", c) for c in sgd_cases()]
    + [("RMSprop", dict(lr=0.01, **c)) for c in options(
        momentum=[0, 0.5], centered=[False, True], weight_decay=[0, 0.1],
        maximize=[False, True])]
    + [("Adam", dict(lr=0.01, **c)) for c in options(
        amsgrad=[False, True], weight_decay=[0, 0.1], maximize=[False, True],
        decoupled_weight_decay=[False, True])]
    + [("AdamW", dict(lr=0.01, **c)) for c in options(
        amsgrad=[False, True], weight_decay=[0, 0.1], maximize=[False, True])]
    + [("Adagrad", dict(lr=0.05, **c)) for c in options(
        lr_decay=[0, 0.01], weight_decay=[0, 0.1], initial_accumulator_value=[0, 0.1],
        maximize=[False, True])]
    + [("Adadelta", dict(**c)) for c in options(
        rho=[0.9, 0.5], weight_decay=[0, 0.1], maximize=[False, True])]
    # Non-default eps/betas/alpha and a 1-element tensor lr, which torch also accepts.
    + [("Adam", dict(lr="tensor", betas=(0.8, 0.99), eps=1e-6)),
       ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6)),
       ("Adagrad", dict(lr=0.05, eps=1e-8)),
       ("Adadelta", dict(lr=0.5, eps=1e-5))]
)


def case_id(case):
    name, kwargs = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items())


def make_params(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(gen, *param_lists, skip=()):
    """The same random gradient on the i-th param of every list (None for i in skip)."""
    for i, p in enumerate(param_lists[0]):
        g = None if i in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for params in param_lists:
            params[i].grad = None if g is None else g.clone()


def assert_same(actual_opt, expected_opt, actual_params, expected_params):
    """Params, and every state entry of every param (keys, dtypes, shapes, values)."""
    for q, p in zip(actual_params, expected_params):
        rtol, atol = tol(p.dtype)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=rtol, atol=atol)
        got, want = actual_opt.state.get(q, {}), expected_opt.state.get(p, {})
        assert set(got) == set(want)
        for key in want:
            if want[key] is None:
                assert got[key] is None
                continue
            torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol,
                                       msg=lambda m, key=key: f"state[{key!r}]: {m}")


def torch_twin(name, params, kwargs):
    return getattr(torch.optim, name)(params, foreach=False, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trajectory_matches_torch(case, dtype):
    name, kwargs = case
    if kwargs.get("lr") == "tensor":  # torch computes with the tensor's dtype: the params'
        kwargs = dict(kwargs, lr=torch.tensor(0.01, dtype=dtype))
    expected = make_params(dtype)
    actual = clone_params(expected)
    ref = torch_twin(name, expected, kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    assert_same(opt, ref, actual, expected)


def test_state_dict_layout_is_torchs():
    for name in ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam",
                 "Adamax", "ASGD", "Rprop"]:
        kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
        expected = make_params(torch.float32)
        actual = clone_params(expected)
        ref = getattr(torch.optim, name)(expected, **kwargs)  # torch's defaults: foreach=None
        opt = getattr(ft, name)(actual, **kwargs)
        set_grads(torch.Generator().manual_seed(0), expected, actual)
        ref.step()
        opt.step()
        got, want = opt.state_dict(), ref.state_dict()
        assert got["param_groups"] == want["param_groups"], name
        assert got["state"].keys() == want["state"].keys(), name
        for index, entry in want["state"].items():
            assert got["state"][index].keys() == entry.keys(), name
            if "step" in entry:
                step = got["state"][index]["step"]
                assert torch.is_tensor(step) and step.dim() == 0
                assert step.dtype == torch.float32 and step.item() == 1.0


def test_param_groups_and_mixed_dtypes():
    """Two groups with their own hyperparameters; float32 and float64 inside one group."""
    def groups(params):
        return [{"params": params[:3], "lr": 0.02, "amsgrad": True},
                {"params": params[3:], "weight_decay": 0.1}]

    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32) + make_params(torch.float64, seed=1)
    actual = clone_params(expected)
    ref = torch.optim.Adam(groups(expected), lr=0.01, foreach=False)
    opt = ft.Adam(groups(actual), lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01]
    for _ in range(10):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    assert_same(opt, ref, actual, expected)


@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 0.01}),
                                         ("SGD", {"lr": 0.05, "momentum": 0.9}),
                                         ("Adagrad", {"lr": 0.05, "lr_decay": 0.01}),
                                         ("RMSprop", {"momentum": 0.5, "centered": True}),
                                         ("NAdam", {"lr": 0.01, "weight_decay": 0.1}),
                                         ("ASGD", {"lr": 0.05, "t0": 3}),
                                         ("Rprop", {"lr": 0.05})])
def test_param_without_grad_is_skipped_like_torch(name, kwargs):
    """A param without .grad is not touched and gets no state; when its gradients start, its
    step count (or SGD's buffer) starts from scratch while the others' go on."""
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch_twin(name, expected, kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    before = actual[1].detach().clone()
    for t in range(12):
        skip = {1} if t < 5 else ({0, 2} if t % 3 == 0 else ())
        set_grads(gen, expected, actual, skip=skip)
        ref.step()
        opt.step()
        if t < 5:
            assert torch.equal(actual[1], before)
            assert (actual[1] in opt.state) == (expected[1] in ref.state)
    assert_same(opt, ref, actual, expected)


def test_zero_grad():
    params = make_params(torch.float32)
    opt = ft.SGD(params, lr=0.1, momentum=0.9)
    set_grads(torch.Generator().manual_seed(0), params)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients: nothing to do
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


def test_closure_returns_loss_and_matches_torch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    ref_model = torch.nn.Linear(5, 1)
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, foreach=False)
    opt = ft.AdamW(model.parameters(), lr=0.05)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(10):
        with torch.no_grad():  # the closure re-enables grad, as torch.optim's step does
            want = ref.step(closure_for(ref_model, ref))
            got = opt.step(closure_for(model, opt))
        assert torch.is_tensor(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert_same(opt, ref, list(model.parameters()), list(ref_model.parameters()))


def test_lr_scheduler_steplr():
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.SGD(expected, lr=0.1, momentum=0.9, foreach=False)
    opt = ft.SGD(actual, lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(10):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        ref_sched.step()
        sched.step()
        assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert_same(opt, ref, actual, expected)


def test_lr_scheduler_onecycle_edits_betas_every_step():
    """OneCycleLR writes lr and betas into param_groups before every step."""
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.AdamW(expected, lr=0.01, foreach=False)
    opt = ft.AdamW(actual, lr=0.01)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12)
              for o in (ref, opt)]
    for _ in range(12):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        for sched in scheds:
            sched.step()
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    assert_same(opt, ref, actual, expected)


def test_step_dtype_follows_default_dtype_like_torch():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = make_params(torch.float64)
        ref, opt = torch.optim.Adam(params), ft.Adam(clone_params(params))
        set_grads(torch.Generator().manual_seed(0), params, opt.param_groups[0]["params"])
        ref.step()
        opt.step()
        got = opt.state[opt.param_groups[0]["params"][0]]["step"]
        assert got.dtype == ref.state[params[0]]["step"].dtype == torch.float64
    finally:
        torch.set_default_dtype(default)


def save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CHECKPOINT_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("Adadelta", dict(weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)),
    ("ASGD", dict(lr=0.05, t0=5, weight_decay=0.1)),
    ("Rprop", dict(lr=0.05, etas=(0.3, 1.5))),
]


@pytest.mark.parametrize("direction", ["torch_to_fastoptim", "fastoptim_to_torch"])
@pytest.mark.parametrize("name,kwargs", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_interop(name, kwargs, direction):
    """Train 8 steps with one implementation, save (torch.save), load into a fresh optimizer of
    the other, and continue 8 steps: equal to the first one continuing."""
    gen = torch.Generator().manual_seed(0)
    torch_cls, fast_cls = getattr(torch.optim, name), getattr(ft, name)
    torch_kwargs = dict(kwargs, foreach=False)
    if direction == "torch_to_fastoptim":
        (first_cls, first_kwargs), (second_cls, second_kwargs) = ((torch_cls, torch_kwargs),
                                                                  (fast_cls, kwargs))
    else:
        (first_cls, first_kwargs), (second_cls, second_kwargs) = ((fast_cls, kwargs),
                                                                  (torch_cls, torch_kwargs))

    params = make_params(torch.float32)
    first = first_cls(params, **first_kwargs)
    for _ in range(8):
        set_grads(gen, params)
        first.step()
    checkpoint = save_load({"params": [p.detach() for p in params], "optim": first.state_dict()})

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    second = second_cls(resumed, **second_kwargs)
    second.load_state_dict(checkpoint["optim"])
    for _ in range(8):
        set_grads(gen, params, resumed)
        first.step()
        second.step()
    assert_same(second, first, resumed, params)
    # ...and the second one's checkpoint has the first one's layout.
    assert second.state_dict()["param_groups"] == first.state_dict()["param_groups"]


def test_state_replaced_between_steps_is_seen():
    """Whatever replaces a state tensor or a param's memory between steps (ZeRO writes
    optim.state[p] directly; p.data = ... moves a param) is what the next step updates."""
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    for t in range(9):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        if t == 2:  # a whole state dict, as ZeroRedundancyOptimizer.load_state_dict does
            for o, ps in ((ref, expected), (opt, actual)):
                o.state[ps[0]] = {k: v.clone() for k, v in o.state[ps[0]].items()}
        if t == 4:  # one state tensor, including step
            for o, ps in ((ref, expected), (opt, actual)):
                o.state[ps[2]]["exp_avg"] = o.state[ps[2]]["exp_avg"].clone()
                o.state[ps[2]]["step"] = torch.tensor(100.0)
        if t == 6:  # a parameter's memory
            for ps in (expected, actual):
                ps[0].data = ps[0].data.clone()
    assert_same(opt, ref, actual, expected)
    assert opt.state[actual[2]]["step"].item() == 104.0


@pytest.mark.parametrize("fmt", [{}, {"state_dtype": "bfloat16"}])
def test_a_state_dict_moved_to_another_key_leaves_its_param_without_state(fmt):
    """state[p] popped and the same dict entered under another key: p starts afresh (as in
    torch), although the state's values, as a list of objects, are the ones of the last step
    when p's entry was the last one."""
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01, **fmt)
    elsewhere = torch.zeros(1)
    for t in range(5):
        set_grads(gen, expected, actual)
        if t == 2:
            for o, ps in ((ref, expected), (opt, actual)):
                assert list(o.state)[-1] is ps[-1]
                o.state[elsewhere] = o.state.pop(ps[-1])
        ref.step()
        opt.step()
    if fmt:  # (bf16 states: compare the params with bf16 rounding)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-3)
    else:
        assert_same(opt, ref, actual, expected)
    assert opt.state[actual[-1]]["step"].item() == 3.0  # the steps at t = 2, 3, 4


def test_load_state_dict_then_continue_same_optimizer():
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.RMSprop(expected, lr=0.01, momentum=0.5, foreach=False)
    opt = ft.RMSprop(actual, lr=0.01, momentum=0.5)
    for _ in range(3):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    saved_ref, saved = save_load(ref.state_dict()), save_load(opt.state_dict())
    for _ in range(3):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    ref.load_state_dict(saved_ref)
    opt.load_state_dict(saved)
    for _ in range(3):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    assert_same(opt, ref, actual, expected)


def test_channels_last_params():
    """Dense tensors in another memory order (channels_last conv weights) are updated in place
    in memory order, like torch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    ref_conv = copy.deepcopy(conv)
    assert not conv.weight.is_contiguous()
    ref = torch.optim.Adam(ref_conv.parameters(), lr=0.01, foreach=False)
    opt = ft.Adam(conv.parameters(), lr=0.01)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for _ in range(5):
        for model, o in ((ref_conv, ref), (conv, opt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert_same(opt, ref, list(conv.parameters()), list(ref_conv.parameters()))
    assert not opt.state[conv.weight]["exp_avg"].is_contiguous()


def test_version_counter_is_bumped():
    """An in-place update autograd cannot see would corrupt a later backward silently; the
    step bumps the params' version counters so autograd raises, as with torch.optim."""
    w = torch.randn(4, requires_grad=True)
    opt = ft.SGD([w], lr=0.1)
    loss = (w * w).sum()  # saves w for backward
    w.grad = torch.ones(4)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_many_tensors_one_call_per_group_and_dtype(monkeypatch):
    calls = []

    def spy(real, pointers):
        def call(params, *args, **kwargs):
            # The pointer path's params: (dtype, element counts, pointers) (Note [pointer path]),
            # the pointers packed, 8 bytes each (Note [packed pointers])
            calls.append(len(ft._unpack(params[2])) if pointers else len(params))
            return real(params, *args, **kwargs)
        return call

    monkeypatch.setattr(fastoptim.functional, "adam_", spy(fastoptim.functional.adam_, False))
    monkeypatch.setattr(ft._P, "adam_", spy(ft._P.adam_, True))
    params = make_params(torch.float32, shapes=[(5,)] * 40) + make_params(torch.float64,
                                                                          shapes=[(3,)] * 7)
    opt = ft.Adam([{"params": params[:30]}, {"params": params[30:]}])
    set_grads(torch.Generator().manual_seed(0), params)
    opt.step()
    calls = [n for n in calls if n]  # the empty calls are the hyperparameter checks
    assert sorted(calls) == [7, 10, 30]


# -- bad input: an exception naming the problem, nothing written ------------------------------

def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    assert {id(p) for p in opt.state} == set(before_state)
    for p, s in opt.state.items():
        assert s.keys() == before_state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, before_state[id(p)][k]), k


def two_group_adam():
    """Adam with two groups and a few steps taken: a bad input in group 1 must not let
    group 0 (updated first) move."""
    params = make_params(torch.float32, shapes=[(4, 3), (5,), (6,), (2, 2)])
    opt = ft.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        set_grads(gen, params)
        opt.step()
    set_grads(gen, params)
    return opt, params


# One configuration per optimizer that allocates every state it can have.
FULL_STATE = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, amsgrad=True),
    "Adagrad": dict(lr=0.05),
    "Adadelta": dict(),
}


def two_groups_two_dtypes(name):
    """Two groups of (float32, float64) params of one shape, two steps taken: four fused calls
    per step, group 0 float32, group 0 float64 (param [0][1]), group 1 float32, group 1
    float64 (param [1][1]); a gradient of one shape can alias another group's arrays."""
    p32 = make_params(torch.float32, seed=1, shapes=[(6,), (6,)])
    p64 = make_params(torch.float64, seed=2, shapes=[(6,), (6,)])
    params = [p32[0], p64[0], p32[1], p64[1]]
    opt = getattr(ft, name)([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
                            **FULL_STATE[name])
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        set_grads(gen, params)
        opt.step()
    set_grads(gen, params)
    return opt, params


def a_state(opt, p):
    return next(v for k, v in opt.state[p].items() if k != "step")


G0P1 = r"param_groups\[0\]\['params'\]\[1\]"
G1P1 = r"param_groups\[1\]\['params'\]\[1\]"

# (param whose grad is bad, the bad grad, error, match): the bad gradient is the SECOND call's
# (param [0][1]) or, where it reads what an earlier call wrote, the last call's (param [1][1]).
BAD_LATER_GRADS = {
    "own param": (1, lambda opt, ps: ps[1].detach(), ValueError,
                  G0P1 + ": its gradient shares memory with the parameter itself"),
    "own state": (1, lambda opt, ps: a_state(opt, ps[1]), ValueError,
                  G0P1 + r": its gradient shares memory with state\['\w+'\] of " + G0P1),
    "later group's param": (1, lambda opt, ps: ps[3].detach(), ValueError,
                            G0P1 + ": its gradient shares memory with " + G1P1),
    "earlier call's param": (3, lambda opt, ps: ps[1].detach(), ValueError,
                             G1P1 + ": its gradient shares memory with " + G0P1),
    "earlier call's state": (3, lambda opt, ps: a_state(opt, ps[1]), ValueError,
                             G1P1 + r": its gradient shares memory with state\['\w+'\] of "
                             + G0P1),
    "sparse": (1, lambda opt, ps: ps[1].grad.to_sparse(), TypeError, G0P1 + ".*sparse"),
    "not contiguous": (1, lambda opt, ps: torch.randn(12, dtype=torch.float64)[::2], ValueError,
                       G0P1 + ".*not contiguous"),
}


@pytest.mark.parametrize("bad", list(BAD_LATER_GRADS))
@pytest.mark.parametrize("name", list(FULL_STATE))
def test_bad_grad_in_a_later_call_changes_nothing(name, bad):
    # Note [All or nothing]: the kernels check overlaps within their own call only; the step
    # checks every call's gradients (and what they alias) before the first call writes.
    opt, params = two_groups_two_dtypes(name)
    k, make_grad, error, match = BAD_LATER_GRADS[bad]
    params[k].grad = make_grad(opt, params)
    snap = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_alias_in_a_single_call_names_the_param(name):
    # One call: the kernel finds the overlap, the message names the param, not the kernel's
    # index among the params that have gradients.
    params = make_params(torch.float32, shapes=[(4,), (4,), (4,)])
    opt = getattr(ft, name)(params, lr=0.1)
    params[1].grad = None
    params[2].grad = params[0].detach()
    params[0].grad = torch.ones(4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\]: its gradient "
                                         r"shares memory with param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    # ...while a gradient that aliases a param this step does not update is fine.
    params[0].grad = None
    params[1].grad = torch.ones(4)
    before = params[0].detach().clone()
    opt.step()
    assert torch.equal(params[0].detach(), before)


def test_params_overlapping_across_groups_are_refused_before_writing():
    base = torch.zeros(10, dtype=torch.float64)
    a = base[:6].requires_grad_()
    b = base[4:].requires_grad_()
    opt = ft.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] and "
                                         r"param_groups\[0\]\['params'\]\[0\] overlap"):
        opt.step()
    assert torch.equal(base, torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("name", ["Adam", "Adagrad"])
def test_bad_step_count_in_a_later_group_changes_nothing(name):
    # A checkpoint's negative step reaches the kernel of the last call only: checked first.
    opt, params = two_groups_two_dtypes(name)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][3]["step"] = torch.tensor(-5.0)
    opt.load_state_dict(sd)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=G1P1 + r": its state\['step'\] is -5"):
        opt.step()
    assert_unchanged(opt, params, snap)


class Uncopyable:
    def __deepcopy__(self, memo):
        raise RuntimeError("cannot be copied")


@pytest.mark.parametrize("how", ["uncopyable group value", "state on another device"])
def test_failed_load_state_dict_changes_nothing(how):
    # torch.optim.Optimizer.load_state_dict builds everything before __setstate__; the cached
    # views (Note [Views are cached]) must still be right afterwards.
    opt, params = two_groups_two_dtypes("Adam")
    twin, twin_params = two_groups_two_dtypes("Adam")
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["exp_avg"].fill_(7.0)
        entry["step"].fill_(50.0)
    if how == "uncopyable group value":
        sd["param_groups"][-1]["note"] = Uncopyable()
        error = RuntimeError
    else:
        sd["state"][3]["exp_avg_sq"] = torch.empty(6, device="meta")
        error = NotImplementedError
    snap = snapshot(opt, params)
    with pytest.raises(error):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        set_grads(gen, params, twin_params)
        opt.step()
        twin.step()
    for q, p in zip(params, twin_params):
        assert torch.equal(q, p)
        assert all(torch.equal(v, twin.state[p][k]) for k, v in opt.state[q].items())


def test_sparse_grad_raises_and_writes_nothing():
    opt, params = two_group_adam()
    params[3].grad = params[3].grad.to_sparse()
    snap = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\].*sparse"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_noncontiguous_grad_raises_and_writes_nothing():
    opt, params = two_group_adam()
    params[3].grad = torch.randn(2, 2).t()
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\].*not contiguous"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_noncontiguous_grad_single_call_raises_and_writes_nothing():
    params = make_params(torch.float32, shapes=[(4, 3), (3, 4)])
    opt = ft.SGD(params, lr=0.1)
    set_grads(torch.Generator().manual_seed(0), params)
    params[0].grad = torch.randn(3, 4).t()
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*not contiguous"):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("make_bad,kind,match", [
    (lambda: torch.randn(6, dtype=torch.complex64), TypeError, "complex"),
    (lambda: torch.randn(6, 2)[:, 0], ValueError, "not contiguous"),
    (lambda: torch.empty(6, device="meta"), ValueError, "no META backend"),
], ids=["complex64", "noncontiguous", "other_device"])
def test_unsupported_param_raises_and_writes_nothing(make_bad, kind, match):
    opt, params = two_group_adam()
    bad = make_bad().requires_grad_()
    bad.grad = torch.zeros_like(bad)
    opt.add_param_group({"params": [bad]})
    snap = snapshot(opt, params)
    with pytest.raises(kind, match=rf"param_groups\[2\]\['params'\]\[0\].*{match}"):
        opt.step()
    assert_unchanged(opt, params, snap)
    # Without a gradient the same param is skipped, as torch skips it.
    bad.grad = None
    opt.step()


def test_cuda_without_a_cuda_build_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the message path is tested with the meta device)")
    if fastoptim.backend_info()["cuda"]["built"]:
        pytest.skip("fastoptim is built with CUDA here: tests/test_torch_cuda.py runs it")
    p = torch.randn(4, device="cuda", requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="built without CUDA"):
        ft.Adam([p]).step()


NAMES = ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam", "Adamax",
         "ASGD", "Rprop"]


def torch_flags(name):
    """The implementation flags torch's constructor of this optimizer takes."""
    parameters = inspect.signature(getattr(torch.optim, name)).parameters
    return [f for f in ("foreach", "fused", "capturable", "differentiable") if f in parameters]


def outcome(make):
    """What constructing raises, as (type, message), or None."""
    try:
        make()
    except Exception as err:  # noqa: BLE001 - compared with torch's outcome
        return type(err), str(err)
    return None


@pytest.mark.parametrize("value", [None, False, True])
@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_fused_are_accepted_and_change_nothing(name, value):
    # Note [torch-only flags]: fastoptim is always one fused call per (group, dtype).
    flags = [f for f in ("foreach", "fused") if f in torch_flags(name)]
    assert "foreach" in flags
    kwargs = dict(CHECKPOINT_CASES[NAMES.index(name)][1])
    for flag in flags:
        gen = torch.Generator().manual_seed(0)
        plain_params = make_params(torch.float64)
        params = clone_params(plain_params)
        plain = getattr(ft, name)(plain_params, **kwargs)
        opt = getattr(ft, name)(params, **kwargs, **{flag: value})
        assert opt.param_groups[0][flag] is value
        for _ in range(3):
            set_grads(gen, plain_params, params)
            plain.step()
            opt.step()
        for q, p in zip(params, plain_params):
            assert torch.equal(q, p)


@pytest.mark.parametrize("name", NAMES)
def test_capturable_and_differentiable_are_refused(name):
    for flag in ("capturable", "differentiable"):
        if flag not in torch_flags(name):
            continue
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            getattr(ft, name)(make_params(torch.float32), **{flag: True})
        getattr(ft, name)(make_params(torch.float32), **{flag: False})


@pytest.mark.parametrize("name", [n for n in NAMES if "fused" in torch_flags(n)])
@pytest.mark.parametrize("combo", [dict(fused=True, foreach=True),
                                   dict(fused=True, differentiable=True)],
                         ids=["fused+foreach", "fused+differentiable"])
def test_flag_combinations_torch_rejects_raise_torchs_error(name, combo):
    params = make_params(torch.float32)
    expected = outcome(lambda: getattr(torch.optim, name)(params, **combo))
    assert expected is not None
    assert outcome(lambda: getattr(ft, name)(params, **combo)) == expected


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs", [
    dict(betas=(0.9, torch.tensor(0.99))),
    dict(betas=(torch.tensor(0.9), 0.99)),
    dict(betas=(0, 0.999)),  # an int is not a float for torch either
    dict(betas=(torch.tensor(0.9), torch.tensor([[0.99]]))),
    dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.9]))),
    dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
    dict(lr=torch.tensor(0.01), foreach=True),
    dict(lr=torch.tensor(0.01), foreach=True, capturable=True),
], ids=["float-tensor", "tensor-float", "int-float", "tensor-2d_tensor", "tensor-2_elements",
        "tensors-foreach", "tensor_lr-foreach", "tensor_lr-foreach-capturable"])
def test_betas_and_tensor_arguments_checked_like_torch(name, kwargs):
    params = make_params(torch.float32)
    expected = outcome(lambda: getattr(torch.optim, name)(params, **kwargs))
    got = outcome(lambda: getattr(ft, name)(params, **kwargs))
    if expected is not None or got is None:
        assert got == expected
    else:  # torch takes it; fastoptim may refuse it for a reason of its own (capturable)
        assert got[0] is ValueError and "capturable=True is not supported" in got[1]


def test_tensor_betas_step_like_torch():
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float64)
    actual = clone_params(expected)
    # float64 tensors: torch computes its bias corrections in the betas' dtype.
    betas = (torch.tensor([0.8], dtype=torch.float64),
             torch.tensor([[0.99]], dtype=torch.float64))
    ref = torch.optim.Adam(expected, lr=0.01, betas=betas, foreach=False)
    opt = ft.Adam(actual, lr=0.01, betas=betas)
    assert [b.shape for b in opt.param_groups[0]["betas"]] == [torch.Size([])] * 2
    for _ in range(5):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    assert_same(opt, ref, actual, expected)


def test_hyperparameters_checked_like_torch_and_at_step():
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ft.SGD(params, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        ft.Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD(params, lr=0.1, nesterov=True)
    opt = ft.Adam(params, lr=0.1)
    opt.param_groups[0]["betas"] = (0.9, 1.5)  # edited after construction
    set_grads(torch.Generator().manual_seed(0), params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\].*beta2"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_import_fastoptim_does_not_import_torch():
    code = ("import sys, fastoptim; assert 'torch' not in sys.modules; "
            "import fastoptim.torch as ft; assert ft.torch is sys.modules['torch']")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(fastoptim.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_example_runs():
    spec = importlib.util.spec_from_file_location("example_torch_train",
                                                  ROOT / "examples" / "torch_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pytest.importorskip("sklearn")
    results = module.main(["--epochs", "3"])
    assert len(results["epochs"]) == 3
    # Same init, same data, same hyperparameters: fastoptim's run is torch's run.
    for epoch in results["epochs"]:
        assert epoch["fastoptim"]["loss"] == pytest.approx(epoch["torch_fused"]["loss"], rel=1e-3)
    assert results["epochs"][-1]["fastoptim"]["test_accuracy"] > 0.85


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_torch", ROOT / "bench" / "bench_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    results = module.main(["--quick", "--numel", "5000", "--tensors", "20", "--tensor-numel",
                           "100", "--json", str(out)])
    assert out.is_file()
    assert {row["case"] for row in results["rows"]} == {"one_tensor", "many_tensors"}


def test_bench_fresh_grads_are_new_tensors_from_autograd_with_the_same_values():
    """bench_torch.py --fresh-grads: every call gives each param a new gradient with the values
    it had, made by backward, so it has no Python object until .grad is read (the count of
    tensor objects does not grow); the rows say so."""
    spec = importlib.util.spec_from_file_location("bench_torch_fresh",
                                                  ROOT / "bench" / "bench_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.make_params([(3, 4), (5,)])
    first = [p.grad for p in params]
    make = module.fresh_grads(params)
    make()

    def tensors():
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    gc.collect()
    before = tensors()
    make()
    gc.collect()
    assert tensors() == before
    grads = [p.grad for p in params]
    assert all(g is not f for g, f in zip(grads, first))
    for g, f in zip(grads, first):
        torch.testing.assert_close(g, f, rtol=0, atol=0)
    results = module.main(["--cases", "many_tensors", "--repeats", "2", "--tensors", "4",
                           "--tensor-numel", "100", "--skip", "torch foreach",
                           "--fresh-grads", "--threads", "1"])
    assert results["rows"] and all(row["fresh_grads"] for row in results["rows"])


def test_bench_after_a_torch_op_runs_the_op_before_every_timed_step(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_torch_op",
                                                  ROOT / "bench" / "bench_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    events = []
    real = module.time_round_robin

    def spy(impls, repeats, warmup, before=None):
        assert before is not None
        wrapped = {k: (lambda f=f, k=k: (events.append(k), f())) for k, f in impls.items()}
        return real(wrapped, repeats, warmup, before=lambda: (events.append("op"), before()))
    monkeypatch.setattr(module, "time_round_robin", spy)
    results = module.main(["--cases", "many_tensors", "--repeats", "3", "--tensors", "4",
                           "--tensor-numel", "100", "--skip", "torch foreach",
                           "--after-torch-op"])
    assert all(row["after_torch_op"] for row in results["rows"])
    timed = events[events.index("op"):]  # (the warmup steps run without it)
    assert timed[::2] == ["op"] * (len(timed) // 2) and "op" not in timed[1::2]
    assert len(timed) == 2 * 3 * 3  # 3 rounds of 3 implementations, each after the op


def test_bench_bfloat16_with_storage_options(capsys):
    spec = importlib.util.spec_from_file_location("bench_torch_bf16",
                                                  ROOT / "bench" / "bench_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--cases", "many_tensors", "--repeats", "2", "--tensors", "6",
                           "--tensor-numel", "5000", "--skip", "torch foreach", "--dtype",
                           "bfloat16", "--formats", "master", "int8", "sr"])
    assert results["dtype"] == "bfloat16"
    assert {row["impl"] for row in results["rows"]} == {
        "fastoptim.torch", "raw adam_", "torch fused", "fastoptim.torch master",
        "fastoptim.torch int8", "fastoptim.torch sr"}
    for f in ("master", "int8", "sr"):
        assert results["summary"][f"many_tensors_{fastoptim.get_num_threads()}t_{f}_speedup_vs_"
                                  "torch_fused"] > 0
    with pytest.raises(SystemExit):
        module.main(["--formats", "master"])  # float32 params have no master
    assert "need --dtype bfloat16" in capsys.readouterr().err


# -- NAdam, RAdam, Adamax, ASGD, Rprop ---------------------------------------------------------

NEW_NAMES = ["NAdam", "RAdam", "Adamax", "ASGD", "Rprop"]

# Every option combination of the new drop-ins (torch 2.13), non-default numeric
# hyperparameters, and a 1-element tensor lr. ASGD's t0=10 averages from step 12 on.
NEW_CASES = (
    [("NAdam", dict(lr=0.01, **c)) for c in options(
        weight_decay=[0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True])]
    + [("NAdam", dict(betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.04)),
       ("NAdam", dict(lr="tensor", weight_decay=0.1))]
    + [("RAdam", dict(lr=0.01, **c)) for c in options(
        weight_decay=[0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True])]
    + [("RAdam", dict(betas=(0.8, 0.99), eps=1e-6))]
    + [("Adamax", dict(lr=0.01, **c)) for c in options(
        weight_decay=[0, 0.1], maximize=[False, True])]
    + [("Adamax", dict(betas=(0.5, 0.9), eps=1e-4))]
    + [("ASGD", dict(lr=0.05, **c)) for c in options(
        t0=[1e6, 10], weight_decay=[0, 0.1], maximize=[False, True])]
    + [("ASGD", dict(lr=0.05, lambd=0.01, alpha=0.5, t0=10)),
       ("ASGD", dict(lr="tensor", t0=10))]
    + [("Rprop", dict(lr=0.05, **c)) for c in options(
        etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50), (0.02, 0.1)],
        maximize=[False, True])]
    + [("Rprop", dict(lr="tensor"))]
)


def assert_same_scalars(actual_opt, expected_opt, actual_params, expected_params):
    """The 0-d states (step, mu_product, eta, mu) are torch's bit for bit, in torch's dtype."""
    for q, p in zip(actual_params, expected_params):
        got, want = actual_opt.state.get(q, {}), expected_opt.state.get(p, {})
        assert list(got) == list(want)
        for key, value in want.items():
            if value.dim() == 0:
                assert got[key].dim() == 0 and got[key].dtype == value.dtype, key
                assert got[key].item() == value.item(), key


def run_side_by_side(name, kwargs, dtype, steps=STEPS, check_every_step=True):
    if kwargs.get("lr") == "tensor":
        kwargs = dict(kwargs, lr=torch.tensor(0.01, dtype=dtype))
    expected = make_params(dtype)
    actual = clone_params(expected)
    ref = torch_twin(name, expected, kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        if check_every_step:
            assert_same(opt, ref, actual, expected)
            assert_same_scalars(opt, ref, actual, expected)
    return opt, ref, actual, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NEW_CASES, ids=case_id)
def test_new_trajectories_match_torch_every_step(case, dtype):
    run_side_by_side(*case, dtype)


@pytest.mark.parametrize("default", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs", [("NAdam", dict(lr=0.01)), ("ASGD", dict(t0=5)),
                                         ("ASGD", dict(lr="tensor", t0=5))])
def test_scalar_states_follow_default_dtype_like_torch(name, kwargs, dtype, default):
    """mu_product, eta and mu are created in torch's scalar dtype (float32 unless the default
    dtype is float64) and rounded in it at every step, whatever the params' dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        opt, _, actual, _ = run_side_by_side(name, kwargs, dtype, steps=12)
    finally:
        torch.set_default_dtype(before)
    for key in ("step",) + opt._scalar_names:
        assert opt.state[actual[0]][key].dtype == default


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta"]
                         + NEW_NAMES)
def test_signature_is_torchs(name):
    import inspect

    def described(cls):
        return [(p.name, p.kind, p.default)
                for p in inspect.signature(cls).parameters.values()]

    # fastoptim's storage options (docs/torch.md, "Storage options") come on top of torch's.
    ours = [d for d in described(getattr(ft, name))
            if d[0] not in ("master_weights", "stochastic_rounding", "sr_seed", "state_dtype")]
    assert ours == described(getattr(torch.optim, name))


@pytest.mark.parametrize("name,kwargs", [
    ("NAdam", dict(lr=-0.1)), ("NAdam", dict(eps=-1.0)), ("NAdam", dict(betas=(1.0, 0.9))),
    ("NAdam", dict(betas=(0.9, -0.1))), ("NAdam", dict(weight_decay=-1.0)),
    ("NAdam", dict(momentum_decay=-1.0)), ("NAdam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("RAdam", dict(lr=-0.1)), ("RAdam", dict(eps=-1.0)), ("RAdam", dict(betas=(0.9, 1.0))),
    ("RAdam", dict(weight_decay=-1.0)),
    ("Adamax", dict(lr=-0.1)), ("Adamax", dict(eps=-1.0)), ("Adamax", dict(betas=(1.5, 0.9))),
    ("Adamax", dict(weight_decay=-1.0)),
    ("ASGD", dict(lr=-0.1)), ("ASGD", dict(weight_decay=-1.0)),
    ("Rprop", dict(lr=-0.1)), ("Rprop", dict(etas=(1.0, 1.2))), ("Rprop", dict(etas=(0.5, 1.0))),
], ids=lambda v: v if isinstance(v, str) else ",".join(map(str, v)))
def test_new_argument_checks_are_torchs(name, kwargs):
    with pytest.raises(ValueError) as want:
        getattr(torch.optim, name)(make_params(torch.float32), **kwargs)
    with pytest.raises(ValueError) as got:
        getattr(ft, name)(make_params(torch.float32), **kwargs)
    assert str(got.value) == str(want.value)


def _take_turns(gen, lists, opts, edit):
    """Two steps in which params 0 and 1 take turns, with a hyperparameter ``edit`` in between:
    then params 0 and 1 have the same step count and different scalar states."""
    for t, skip in enumerate([{1}, {0}]):
        set_grads(gen, *lists, skip=skip)
        for o in opts:
            if t == 1:
                edit(o.param_groups[0])
            o.step()


@pytest.mark.parametrize("name,kwargs,edit", [
    ("NAdam", dict(lr=0.01), lambda g: g.update(betas=(0.8, 0.999))),
    ("NAdam", dict(lr=0.01), lambda g: g.update(momentum_decay=0.04)),
    ("ASGD", dict(lr=0.05, t0=1), lambda g: g.update(lr=0.02)),
], ids=["NAdam-betas", "NAdam-momentum_decay", "ASGD-lr"])
def test_params_with_different_scalars_are_called_apart(name, kwargs, edit, monkeypatch):
    """Equal steps, different mu_product (or eta): one kernel call per value (Note [Scalar
    states]), and torch's result."""
    calls = []
    fn = name.lower() + "_"
    real = getattr(fastoptim.functional, fn)

    def spy(params, *args, **kw):
        calls.append(len(params))
        return real(params, *args, **kw)

    monkeypatch.setattr(fastoptim.functional, fn, spy)
    expected = make_params(torch.float32, shapes=[(5,), (6,), (7,)])
    actual = clone_params(expected)
    ref = torch_twin(name, expected, kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    gen = torch.Generator().manual_seed(0)
    _take_turns(gen, (expected, actual), (ref, opt), edit)
    steps = [opt.state[p]["step"].item() for p in actual]
    assert steps == [1, 1, 2]
    for t in range(3):
        calls.clear()
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        if t == 0:
            assert [n for n in calls if n] == [1, 1, 1]  # one call per (step, scalars)
        assert_same(opt, ref, actual, expected)
        assert_same_scalars(opt, ref, actual, expected)


@pytest.mark.parametrize("name,kwargs", [("NAdam", dict(lr=0.01, weight_decay=0.1)),
                                         ("ASGD", dict(lr=0.05, t0=3))])
def test_checkpoint_scalars_cast_to_param_dtype_like_torch(name, kwargs):
    """torch's load_state_dict casts mu_product/eta/mu to the param's dtype: float64 params
    then carry float64 scalars next to float32 ones in the same group, and both round as torch's
    do from then on."""
    gen = torch.Generator().manual_seed(0)
    params = make_params(torch.float32, shapes=[(5,), (6,)]) + make_params(
        torch.float64, shapes=[(7,), (3,)], seed=1)
    first = torch_twin(name, params, kwargs)
    for _ in range(6):
        set_grads(gen, params)
        first.step()
    expected, actual = clone_params(params), clone_params(params)
    ref = torch_twin(name, expected, kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    # One copy each: torch's load_state_dict keeps the checkpoint's step tensors.
    ref.load_state_dict(save_load(first.state_dict()))
    opt.load_state_dict(save_load(first.state_dict()))
    for _ in range(8):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        assert_same(opt, ref, actual, expected)
        assert_same_scalars(opt, ref, actual, expected)
    dtypes = {opt.state[p][opt._scalar_names[0]].dtype for p in actual}
    assert dtypes == {torch.float32, torch.float64}
    # ...and fastoptim's checkpoint loads back into torch.
    back = torch_twin(name, clone_params(actual), kwargs)
    back.load_state_dict(save_load(opt.state_dict()))
    assert_same_scalars(back, ref, back.param_groups[0]["params"], expected)


def test_scalar_state_replaced_between_steps_is_seen():
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.NAdam(expected, lr=0.01, foreach=False)
    opt = ft.NAdam(actual, lr=0.01)
    for t in range(6):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
        if t == 2:
            for o, ps in ((ref, expected), (opt, actual)):
                o.state[ps[0]]["mu_product"] = torch.tensor(0.25)
                o.state[ps[1]]["mu_product"].fill_(0.5)
    assert_same(opt, ref, actual, expected)
    assert_same_scalars(opt, ref, actual, expected)


def test_rprop_step_size_starts_at_lr_of_first_step_like_torch():
    gen = torch.Generator().manual_seed(0)
    expected = make_params(torch.float32)
    actual = clone_params(expected)
    ref = torch.optim.Rprop(expected, lr=0.01, foreach=False)
    opt = ft.Rprop(actual, lr=0.01)
    for o in (ref, opt):
        o.param_groups[0]["lr"] = 0.2  # before the first step: the states start from it
    set_grads(gen, expected, actual, skip={1})
    ref.step()
    opt.step()
    for o in (ref, opt):
        o.param_groups[0]["lr"] = 0.05  # param 1's first step comes now
    for _ in range(3):
        set_grads(gen, expected, actual)
        ref.step()
        opt.step()
    assert_same(opt, ref, actual, expected)


# ---- Lion (no torch.optim twin: checked against fastoptim.reference) --------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"lr": 0.01, "weight_decay": 0.3, "maximize": True,
                                         "betas": (0.5, 0.9)}])
def test_lion_matches_reference_and_checkpoints_round_trip(kwargs, dtype, tmp_path):
    import numpy as np

    from fastoptim import reference
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
              for s in [(7,), (3, 5)]]
    ref = [p.detach().numpy().copy() for p in params]
    ref_m = [np.zeros_like(r) for r in ref]
    opt = ft.Lion(params, **kwargs)
    beta1, beta2 = kwargs.get("betas", (0.9, 0.99))
    hyper = dict(lr=kwargs.get("lr", 1e-4), beta1=beta1, beta2=beta2,
                 weight_decay=kwargs.get("weight_decay", 0.0), maximize=kwargs.get("maximize", False))
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for _ in range(50):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
        reference.lion_(ref, [p.grad.numpy() for p in params], ref_m, **hyper)
        for p, r, m in zip(params, ref, ref_m):
            # atol: exp_avg cancels towards 0 (the kernel's fma rounds once, NumPy twice)
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=rtol, atol=rtol)
            np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=rtol, atol=rtol)
    assert set(opt.state[params[0]]) == {"exp_avg"}
    torch.save(opt.state_dict(), tmp_path / "lion.pt")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = ft.Lion(twins, lr=0.5)
    twin.load_state_dict(torch.load(tmp_path / "lion.pt"))
    for p, q in zip(params, twins):
        p.grad = q.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    opt.step()
    twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
