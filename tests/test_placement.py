"""Where the optimizer classes put the states of large parameters (Note [state placement],
python/fastoptim/_placement.py): 1, 2 or 3 KiB past the param's offset within a 4 KiB page, by
state name, so that no state sits at a page-multiple distance from its param, its grad or
another state. Checked: the addresses, the dtypes, shapes and initial values, the trajectory
against the oracle (NumPy classes) and torch.optim (the torch drop-ins), and checkpoints."""

import io

import ml_dtypes
import numpy as np
import pytest

from fastoptim import _placement, optim
from fastoptim.quant import QuantizedState

from test_optim import assert_matches, make_grads, reference_run

PAGE, SKEW = 4096, 1024
BIG = (512, 520)    # 266,240 elements: >= 1 MiB in float32 and in bfloat16 + float32 states
SMALL = (300,)


def addr(a):
    return a.__array_interface__["data"][0]


def test_offset_puts_the_state_slot_kib_past_the_param_and_keeps_alignment():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        itemsize = int(rng.choice([2, 4, 8]))
        param = int(rng.integers(1, 2**40)) * itemsize
        buf = int(rng.integers(1, 2**40)) * 16
        slot = int(rng.integers(1, 4))
        off = _placement.offset(param, buf, itemsize, slot)
        assert off is not None and 0 <= off < PAGE
        assert (buf + off - param) % PAGE == slot * SKEW
        assert (buf + off) % itemsize == 0
    # a param whose address is not a multiple of the state's itemsize: no placed start
    assert _placement.offset(4096 + 2, 8192, 4, 1) is None


def test_every_optimizer_gives_its_states_distinct_slots():
    names = [("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ("square_avg", "momentum_buffer",
             "grad_avg"), ("square_avg", "acc_delta"), ("exp_avg", "exp_inf"),
             ("prev", "step_size")]
    for group in names:
        slots = [_placement.slot_of(n) for n in group]
        assert len(set(slots)) == len(slots) and set(slots) <= {1, 2, 3}, group
    assert _placement.slot_of("some_new_state") == 1


def test_full_like_fills_as_np_full_and_leaves_small_or_strided_arrays_alone():
    p = np.zeros(BIG, np.float32)
    for fill in (0.0, 0.1, -3.5e-7, 1e30):
        a = _placement.full_like(p, "exp_avg_sq", fill)
        b = np.full(BIG, fill, np.float32)
        np.testing.assert_array_equal(a, b, strict=True)
        assert a.flags.c_contiguous and (addr(a) - addr(p)) % PAGE == 2 * SKEW
    for small in (np.zeros(SMALL, np.float32), np.zeros(BIG, np.float32)[:, ::2]):
        a = _placement.full_like(small, "exp_avg", 0.5)
        assert a.flags.owndata and a.shape == small.shape
        np.testing.assert_array_equal(a, np.full(small.shape, 0.5, np.float32), strict=True)


def assert_placed(p, states):
    """Every state of the large param p starts slot KiB past p modulo a page, slots distinct."""
    seen = set()
    for name, a in states.items():
        rel = (addr(a) - addr(p)) % PAGE
        assert rel == _placement.slot_of(name) * SKEW, (name, rel)
        assert rel not in seen, name
        seen.add(rel)
    return seen


CLASSES = [
    (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (optim.AdamW, dict(lr=0.01)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (optim.Adagrad, dict(lr=0.05, initial_accumulator_value=0.1)),
    (optim.Adadelta, dict(weight_decay=0.1)),
    (optim.Adamax, dict(lr=0.01)),
    (optim.NAdam, dict(lr=0.01)),
    (optim.Rprop, dict(lr=0.05)),
    (optim.ASGD, dict(lr=0.05, t0=2)),
]


@pytest.mark.parametrize("cls,options", CLASSES, ids=[c[0].__name__ for c in CLASSES])
def test_numpy_classes_place_large_states_and_still_match_the_oracle(cls, options):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(BIG).astype(np.float32),
              rng.standard_normal(SMALL).astype(np.float32)]
    start = [p.copy() for p in params]
    opt = cls(params, **options)
    names = set(opt.state[0])
    assert names, "every class here has states"
    assert len(assert_placed(params[0], opt.state[0])) == len(names)
    for name, s in opt.state[1].items():
        assert s.flags.owndata, f"small param's state[{name!r}] is a plain allocation"
    grads = make_grads(params, 3)
    for g in grads:
        opt.step(g)
    ref_params, ref_states = reference_run(cls, options, start, grads)
    assert_matches(opt, [0, 1], params, ref_params, ref_states, np.float32)
    # load_state_dict copies into the placed arrays: still placed, same values
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert_placed(params[0], opt.state[0])
    for name in names:
        np.testing.assert_array_equal(opt.state[0][name], sd["state"][0][name], strict=True)


@pytest.mark.parametrize("state_dtype", [None, "float32", "bfloat16", "int8"])
def test_numpy_low_precision_params_place_their_states(state_dtype):
    bf16 = ml_dtypes.bfloat16
    p = np.random.default_rng(2).standard_normal((1024, 1024)).astype(bf16)
    opt = optim.Adagrad([p], lr=0.01, initial_accumulator_value=0.3, state_dtype=state_dtype)
    s = opt.state[0]["sum"]
    if state_dtype == "int8":
        assert isinstance(s, QuantizedState)  # codes and absmax: allocated as before
        return
    assert_placed(p, opt.state[0])
    want = {None: np.full(p.shape, 0.3, bf16), "float32": np.full(p.shape, 0.3, np.float32),
            "bfloat16": np.full(p.shape, 0.3, np.float32).astype(bf16)}[state_dtype]
    np.testing.assert_array_equal(s.view(np.uint8), want.view(np.uint8), strict=True)
    assert s.dtype == want.dtype and s.shape == p.shape


# -- fastoptim.torch ----------------------------------------------------------------------------

torch_cases = [
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adagrad", dict(lr=0.05, initial_accumulator_value=0.1)),
    ("Adadelta", dict()),
    ("Rprop", dict(lr=0.05)),
    ("Adamax", dict(lr=0.01)),
]


def tensor_states(opt, p):
    return {k: v for k, v in opt.state[p].items()
            if hasattr(v, "data_ptr") and v.dim() > 0}


def assert_torch_placed(p, states):
    rels = set()
    for name, t in states.items():
        rel = (t.data_ptr() - p.data_ptr()) % PAGE
        assert rel == _placement.slot_of(name) * SKEW, (name, rel)
        assert t.is_contiguous() and t.shape == p.shape
        rels.add(rel)
    assert len(rels) == len(states)


@pytest.mark.parametrize("name,kwargs", torch_cases, ids=[c[0] for c in torch_cases])
def test_torch_dropins_place_large_states_and_match_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(BIG, generator=gen).requires_grad_(),
              torch.randn(SMALL, generator=gen).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = getattr(ft, name)(params, **kwargs)
    ref = getattr(torch.optim, name)(twins, foreach=False, **kwargs)
    for _ in range(3):
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    states = tensor_states(opt, params[0])
    assert states
    assert_torch_placed(params[0], states)
    # test_torch_optim's bounds, with atol 1e-5: among 266,240 elements a few pass through
    # centred RMSprop's cancellation (square_avg - grad_avg^2), where the fused kernel's last
    # bits show (max 1.9e-6 absolute on a 0.02 state after 3 steps)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
        for key, t in tensor_states(ref, q).items():
            torch.testing.assert_close(opt.state[p][key], t, rtol=1e-5, atol=1e-5)


def test_torch_checkpoint_states_are_moved_off_the_params_offset_on_load():
    """A checkpoint's state tensors that sit at the param's page offset (as separate
    allocations of one size do) are copied to placed tensors on load; the values, and the
    trajectory against torch.optim loading the same checkpoint, are unchanged."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(BIG, generator=gen).requires_grad_()
    twin = p.detach().clone().requires_grad_()
    n = p.numel()
    # states at exactly the param's page offset: slices of one buffer, one page-multiple apart
    buf = torch.empty(2 * n + 2048)
    base = (p.data_ptr() - buf.data_ptr()) % PAGE // 4
    exp_avg = buf[base:base + n].view(BIG)
    assert n % 1024 == 0
    exp_avg_sq = buf[base + n + 1024:base + 2 * n + 1024].view(BIG)  # 4 KiB past its end
    exp_avg.copy_(torch.randn(BIG, generator=gen))
    exp_avg_sq.copy_(torch.rand(BIG, generator=gen))
    for t in (exp_avg, exp_avg_sq):
        assert (t.data_ptr() - p.data_ptr()) % PAGE == 0
    sd = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": exp_avg,
                        "exp_avg_sq": exp_avg_sq}},
          "param_groups": [{**torch.optim.Adam([twin]).state_dict()["param_groups"][0],
                            "lr": 0.01, "foreach": False}]}
    opt = ft.Adam([p], lr=0.01)
    opt.load_state_dict(sd)
    ref = torch.optim.Adam([twin], lr=0.01, foreach=False)
    ref.load_state_dict(sd)
    states = tensor_states(opt, p)
    assert_torch_placed(p, states)
    torch.testing.assert_close(states["exp_avg"], exp_avg, rtol=0, atol=0)
    torch.testing.assert_close(states["exp_avg_sq"], exp_avg_sq, rtol=0, atol=0)
    for _ in range(2):
        g = torch.randn(BIG, generator=gen)
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-5, atol=1e-6)
    # and a fastoptim checkpoint round trip through torch.save keeps the values
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = ft.Adam([p], lr=0.01)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    for key, t in tensor_states(opt, p).items():
        torch.testing.assert_close(again.state[p][key], t, rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(state_dtype="bfloat16"), dict(master_weights=True)],
                         ids=["bf16-states", "master-weights"])
def test_torch_low_precision_params_place_their_states(options):
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft
    gen = torch.Generator().manual_seed(4)
    p = torch.randn((1024, 1024), generator=gen).to(torch.bfloat16).requires_grad_()
    opt = ft.AdamW([p], lr=0.01, **options)
    p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
    opt.step()
    states = {k: v for k, v in tensor_states(opt, p).items() if k in ("exp_avg", "exp_avg_sq")}
    assert set(states) == {"exp_avg", "exp_avg_sq"}
    assert_torch_placed(p, states)
    want = torch.float32 if options.get("master_weights") else torch.bfloat16
    assert all(t.dtype == want for t in states.values())


@pytest.mark.parametrize("which", ["state", "state view"])
def test_numpy_grad_aliasing_a_placed_state_of_another_call_is_refused(which):
    """A placed state is a view of a larger buffer; a gradient that is (a view of) the state
    of a param updated by an earlier call must still be refused before anything is written."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(BIG).astype(np.float32) for _ in range(2)]
    opt = optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], lr=0.05,
                    momentum=0.9)
    opt.step([np.ones(BIG, np.float32)] * 2)
    buf = opt.state[0]["momentum_buffer"]
    assert not buf.flags.owndata  # placed
    bad = buf if which == "state" else buf[:]
    before = [p.copy() for p in params], buf.copy()
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with state\[0\]"):
        opt.step([np.ones(BIG, np.float32), bad])
    np.testing.assert_array_equal(params[0], before[0][0], strict=True)
    np.testing.assert_array_equal(params[1], before[0][1], strict=True)
    np.testing.assert_array_equal(buf, before[1], strict=True)


@pytest.mark.parametrize("options", [{}, dict(state_dtype="float32")], ids=["plain", "format"])
def test_torch_states_keep_the_params_strides(options):
    """preserve_format: a channels_last 1x1 convolution weight is contiguous with odd strides
    on its size-1 dimensions; its placed states have its strides and stay placed."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(512, 520, 1, 1, generator=gen).to(memory_format=torch.channels_last)
    assert w.is_contiguous() and w.stride() != (520, 1, 1, 1)
    p = torch.nn.Parameter(w)
    twin = torch.nn.Parameter(w.clone(memory_format=torch.preserve_format))
    opt = ft.Adam([p], lr=0.01, **options)
    ref = torch.optim.Adam([twin], lr=0.01, foreach=False)
    for _ in range(3):
        g = torch.randn(p.shape, generator=gen)
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        states = tensor_states(opt, p)
        assert_torch_placed(p, states)
        assert all(t.stride() == p.stride() == ref.state[twin][k].stride()
                   for k, t in states.items())
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-5, atol=1e-6)
