"""fastoptim.torch's storage options (docs/torch.md, "Storage options"): fp32 master weights for
bfloat16/float16 params, stochastic rounding of bfloat16 params, and compressed states
(``state_dtype``), against the functional updates and the NumPy classes (which are tested
against fastoptim.reference elsewhere), with state_dict round trips both ways between the
drop-ins and torch.optim, and bad arguments that raise before anything is written.
"""

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import fastoptim  # noqa: E402
import fastoptim.optim as fo  # noqa: E402
import fastoptim.torch as ft  # noqa: E402
from fastoptim.quant import MIN_QUANTIZED_SIZE, QuantizedState  # noqa: E402

# Hyperparameters every drop-in and its NumPy class accept, with every state in use.
CASES = {
    "SGD": dict(lr=0.01, momentum=0.9),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01),
    "Adagrad": dict(lr=0.1, initial_accumulator_value=0.1),
    "Adadelta": dict(lr=1.0),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
    "Adamax": dict(lr=0.01),
    "ASGD": dict(lr=0.01, t0=2),
    "Rprop": dict(lr=0.01),
    "Lion": dict(lr=1e-3),
}
NAMES = list(CASES)
STEPS = 4
# 5000 is quantized (>= MIN_QUANTIZED_SIZE), 300 keeps float32 states; 5000 also ends in a
# partial block of 256 and of 128.
SIZES = (5000, 300)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def params_of(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def grads_of(params, step, dtype=None):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(dtype or p.dtype) for p in params]


def run(opt, params, steps=STEPS, first=0, dtype=None):
    for s in range(first, first + steps):
        for p, g in zip(params, grads_of(params, s, dtype)):
            p.grad = g
        opt.step()


def bits(t):
    """A tensor's bits, to compare bitwise (NaN == NaN)."""
    t = t.detach()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(
        torch.int32 if t.element_size() == 4 else torch.int64)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def assert_same_state(a, b):
    """Two ``state`` entries of a parameter, value by value."""
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, dict):
            assert x["bits"] == y["bits"] and x["shape"] == y["shape"]
            assert torch.equal(x["codes"], y["codes"]), name
            assert torch.equal(bits(x["absmax"]), bits(y["absmax"])), name
        else:
            assert_same(x, y)


def roundtrip(sd):
    """A state_dict through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def continue_both(make, opt, params, sd):
    """Steps `opt` on from where `sd` (its saved state_dict) was taken, and a fresh optimizer
    `make(params2)` loaded from `sd` on copies of the params as they were; asserts that both
    runs give the same params, bit for bit. Returns the fresh optimizer and its params."""
    saved = [p.detach().clone() for p in params]
    run(opt, params, first=STEPS)
    params2 = [torch.nn.Parameter(p) for p in saved]
    opt2 = make(params2)
    opt2.load_state_dict(sd)
    run(opt2, params2, first=STEPS)
    for p, q in zip(params, params2):
        assert_same(p.detach(), q.detach())
    return opt2, params2


# ---- master weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_master_weights_are_the_fp32_update(name, low):
    """The master weights and states equal, bit for bit, the same drop-in stepping float32
    params with the low-precision gradients widened (widening is exact, and the kernel's math
    is float32 in both); the param is the master rounded to nearest even."""
    params = params_of(low)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = getattr(ft, name)(params, master_weights=True, **CASES[name])
    opt32 = getattr(ft, name)(ref, **CASES[name])
    for s in range(STEPS):
        for p, q, g in zip(params, ref, grads_of(params, s)):
            p.grad, q.grad = g, g.float()
        opt.step()
        opt32.step()
        for p, q in zip(params, ref):
            state, state32 = opt.state[p], opt32.state[q]
            assert_same(state["master_weight"], q.detach())
            assert_same(p.detach(), q.detach().to(low))
            for key, value in state32.items():
                if key == "step" and key not in state:
                    continue
                assert_same(state[key], value)


def test_master_weights_against_torch_fp32():
    """fastoptim's master weights against torch.optim.AdamW in float32 on the same (bf16)
    gradients: float32 agreement (the kernels use fused multiply-adds)."""
    params = params_of(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = ft.AdamW(params, lr=1e-3, master_weights=True)
    topt = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    for s in range(20):
        for p, q, g in zip(params, ref, grads_of(params, s)):
            p.grad, q.grad = g, g.float()
        opt.step()
        topt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(opt.state[p]["master_weight"], q.detach(), rtol=1e-5,
                                   atol=1e-6)


def test_master_weights_against_the_reference_step_by_step():
    """Each step's master weights and states against fastoptim.reference.adamw_ (the NumPy
    oracle, float32) applied to the step's inputs, with the bf16 gradients widened: within
    test_functional.py's one-step float32 tolerance (the kernel fuses multiply-adds)."""
    from fastoptim import reference
    params = params_of(torch.bfloat16)
    opt = ft.AdamW(params, lr=1e-2, weight_decay=0.1, master_weights=True)
    run(opt, params, steps=1)
    for s in range(1, STEPS):
        before = [{k: v.detach().numpy().copy() for k, v in opt.state[p].items()
                   if k != "step"} for p in params]
        grads = grads_of(params, s)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, g, b in zip(params, grads, before):
            master = b["master_weight"]
            reference.adamw_(master, g.float().numpy(), b["exp_avg"], b["exp_avg_sq"],
                             step=s + 1, lr=1e-2, weight_decay=0.1)
            scale = max(1.0, float(np.abs(master).max()))
            atol = 8 * np.finfo(np.float32).eps * scale
            for key, want in (("master_weight", master), ("exp_avg", b["exp_avg"]),
                              ("exp_avg_sq", b["exp_avg_sq"])):
                np.testing.assert_allclose(opt.state[p][key].numpy(), want, rtol=1e-6,
                                           atol=atol, err_msg=key)
            assert_same(p.detach(), opt.state[p]["master_weight"].to(torch.bfloat16))


def test_grad_scaler_with_float16_master_weights():
    """torch.amp.GradScaler with float16 params and master weights: the scaler hands the step
    grad_scale and found_inf; an overflow step changes nothing; the others equal a float32
    drop-in fed the unscaled gradients (a power-of-two scale: exact in float32)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8).half()
    ref = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    opt = ft.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    opt_ref = ft.AdamW(ref, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for s in range(4):
        x = torch.randn(16, 32).half()
        model.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        scale = scaler.get_scale()
        for p, q in zip(model.parameters(), ref):
            q.grad = p.grad.float() / scale
        if s == 2:
            model.weight.grad[0, 0] = float("inf")
            kept = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if s == 2:
            assert all(torch.equal(p.detach(), k) for p, k in zip(model.parameters(), kept))
            assert scaler.get_scale() < scale
            continue
        opt_ref.step()
        for p, q in zip(model.parameters(), ref):
            assert_same(opt.state[p]["master_weight"], q.detach())
            assert_same(p.detach(), q.detach().half())


def test_compiled_step_with_storage_options():
    """torch.compile(fullgraph=True) of a step with master weights: one custom op, the same
    bits as the eager step."""
    params = params_of(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ft.Adam(params, lr=1e-2, master_weights=True)
    opt_ref = ft.Adam(ref, lr=1e-2, master_weights=True)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for s in range(3):
        for p, q, g in zip(params, ref, grads_of(params, s)):
            p.grad, q.grad = g, g.clone()
        step()
        opt_ref.step()
    for p, q in zip(params, ref):
        assert_same(p.detach(), q.detach())
        assert_same(opt.state[p]["master_weight"], opt_ref.state[q]["master_weight"])


def test_states_replaced_between_steps_are_used():
    """The format path caches each param's arrays while its memory, options and state objects
    stay the same: a state replaced by hand, a param's ``.data`` swapped and a changed option
    are picked up."""
    params = params_of(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = ft.Adam(params, lr=1e-2, master_weights=True)
    opt32 = ft.Adam(ref, lr=1e-2)

    def both(s):
        for p, q, g in zip(params, ref, grads_of(params, s)):
            p.grad, q.grad = g, g.float()
        opt.step()
        opt32.step()
        for p, q in zip(params, ref):
            assert_same(opt.state[p]["master_weight"], q.detach())
            assert_same(opt.state[p]["exp_avg"], opt32.state[q]["exp_avg"])

    both(0)
    both(1)
    for p, q in zip(params, ref):
        opt.state[p]["exp_avg"] = torch.full(p.shape, 0.5)
        opt32.state[q]["exp_avg"] = torch.full(q.shape, 0.5)
    both(2)
    params[0].data = params[0].data.clone()
    opt.state[params[1]]["exp_avg_sq"].data = opt.state[params[1]]["exp_avg_sq"].data.clone()
    both(3)
    opt.param_groups[0]["state_dtype"] = "bfloat16"  # refused with master weights
    with pytest.raises(ValueError, match="state_dtype"):
        both(4)


def test_master_weights_track_fp32_training():
    """Least squares with Adam steps (lr 1e-3) below half a bf16 ulp of the weights (in [1, 2):
    1/256): bf16 params alone stall at the start; with master weights (and, less closely,
    with stochastic rounding) the run follows the float32 one."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 32, generator=gen)
    w0 = 1.0 + torch.rand(32, 1, generator=gen)
    y = x @ (w0 + 0.05 * torch.randn(32, 1, generator=gen))

    def train(dtype, **options):
        w = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = ft.Adam([w], lr=1e-3, **options)
        for _ in range(400):
            opt.zero_grad()
            loss = ((x.to(dtype) @ w - y.to(dtype)).float() ** 2).mean()
            loss.backward()
            opt.step()
        if options.get("master_weights"):
            assert_same(w.detach(), opt.state[w]["master_weight"].to(dtype))
            return opt.state[w]["master_weight"]
        return w.detach().float()

    def loss(w):
        return ((x @ w - y) ** 2).mean().item()

    w32 = train(torch.float32)
    plain = train(torch.bfloat16)
    master = train(torch.bfloat16, master_weights=True)
    sr = train(torch.bfloat16, stochastic_rounding=True)
    assert loss(plain) > 0.9 * loss(w0)  # stalled
    assert (master - w32).abs().max() < 0.1 * (plain - w32).abs().max()
    assert loss(master) < 0.02 * loss(plain)
    assert loss(sr) < 0.05 * loss(plain)


def test_master_weights_state_dict_round_trip():
    """Saved (through torch.save with weights_only) and loaded into a new drop-in, the run
    continues with the same bits; the master weights are saved in float32."""
    params = params_of(torch.bfloat16)
    opt = ft.Adam(params, lr=1e-2, master_weights=True)
    run(opt, params)
    sd = roundtrip(opt.state_dict())
    for entry in sd["state"].values():
        assert entry["master_weight"].dtype == torch.float32
        assert entry["exp_avg"].dtype == torch.float32
    opt2, params2 = continue_both(lambda ps: ft.Adam(ps, lr=1e-2, master_weights=True), opt,
                                  params, sd)
    for p, q in zip(params, params2):
        assert_same_state(opt.state[p], opt2.state[q])


def test_master_weights_state_dict_into_torch_and_back():
    """A master-weights state_dict loads into torch.optim.Adam (which casts its states to the
    params' bf16 and keeps the extra master_weight); torch's state_dict loads into the drop-in,
    which then starts its master weights from the params."""
    params = params_of(torch.bfloat16)
    opt = ft.Adam(params, lr=1e-2, master_weights=True)
    run(opt, params)
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
    topt = torch.optim.Adam(tparams, lr=1e-2, foreach=False)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, tparams):
        assert_same(topt.state[q]["exp_avg"], opt.state[p]["exp_avg"].to(torch.bfloat16))
    run(topt, tparams, steps=2, first=STEPS)  # torch steps with it

    # torch -> drop-in: master weights from the params, states widened from bf16.
    params2 = [torch.nn.Parameter(q.detach().clone()) for q in tparams]
    opt2 = ft.Adam(params2, lr=1e-2, master_weights=True)
    opt2.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert all("master_weight" not in opt2.state[p] for p in params2)
    ref = [torch.nn.Parameter(q.detach().float()) for q in tparams]
    opt32 = ft.Adam(ref, lr=1e-2)
    sd32 = copy.deepcopy(topt.state_dict())
    opt32.load_state_dict(sd32)  # torch's cast: bf16 states -> float32, exactly
    for p, q, g in zip(params2, ref, grads_of(params2, 99)):
        p.grad, q.grad = g, g.float()
    opt2.step()
    opt32.step()
    for p, q in zip(params2, ref):
        assert_same(opt2.state[p]["master_weight"], q.detach())
        assert_same(opt2.state[p]["exp_avg_sq"], opt32.state[q]["exp_avg_sq"])
        assert_same(p.detach(), q.detach().to(torch.bfloat16))


def test_master_weights_leave_fp32_params_alone():
    """float32 params are their own master: same bits as without the option, no copy kept."""
    params = params_of(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ft.AdamW(params, master_weights=True)
    opt_ref = ft.AdamW(ref)
    run(opt, params)
    run(opt_ref, ref)
    for p, q in zip(params, ref):
        assert_same(p.detach(), q.detach())
        assert "master_weight" not in opt.state[p]


# ---- stochastic rounding ----------------------------------------------------------------------

def np_bf16(t):
    return t.detach().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("state_dtype", [None, "float32", "int8"])
def test_stochastic_rounding_is_the_functional_update(state_dtype):
    """The drop-in's bits equal fastoptim.adamw_ on the group's bf16 params as one list with
    stochastic_rounding=(sr_seed, step); with int8 states the 5000-element param (quantized)
    and the 300-element one (float32 states) are two calls, the second numbering its elements
    after the first's (first_index 5000): the same random bits as one list."""
    params = params_of(torch.bfloat16)
    opt = ft.AdamW(params, lr=1e-3, stochastic_rounding=True, sr_seed=1234,
                   state_dtype=state_dtype)
    ps = [np_bf16(p) for p in params]
    if state_dtype == "int8":
        assert ps[0].size >= MIN_QUANTIZED_SIZE > ps[1].size
        m = [QuantizedState.zeros(ps[0].shape, 8), np.zeros(ps[1].shape, np.float32)]
        v = [QuantizedState.zeros(ps[0].shape, 8, non_negative=True),
             np.zeros(ps[1].shape, np.float32)]
    else:
        sdt = np.float32 if state_dtype == "float32" else ml_dtypes.bfloat16
        m = [np.zeros(p.shape, sdt) for p in ps]
        v = [np.zeros(p.shape, sdt) for p in ps]
    for s in range(STEPS):
        grads = grads_of(params, s)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        gs = [np_bf16(g) for g in grads]
        if state_dtype == "int8":
            fastoptim.adamw_(ps[:1], gs[:1], m[:1], v[:1], step=s + 1, lr=1e-3,
                             stochastic_rounding=(1234, s + 1))
            fastoptim.adamw_(ps[1:], gs[1:], m[1:], v[1:], step=s + 1, lr=1e-3,
                             stochastic_rounding=(1234, s + 1, ps[0].size))
        else:
            fastoptim.adamw_(ps, gs, m, v, step=s + 1, lr=1e-3,
                             stochastic_rounding=(1234, s + 1))
        for p, want in zip(params, ps):
            assert np.array_equal(np_bf16(p).view(np.int16), want.view(np.int16))
    if state_dtype == "int8":
        q = opt.state[params[0]]["exp_avg"]
        assert np.array_equal(q["codes"].numpy(), m[0].codes)
    assert float(opt.state[params[0]]["step"]) == STEPS


def test_stochastic_rounding_differs_from_nearest_and_from_another_seed():
    outs = []
    for options in (dict(), dict(stochastic_rounding=True, sr_seed=1),
                    dict(stochastic_rounding=True, sr_seed=2)):
        params = params_of(torch.bfloat16)
        run(ft.Adam(params, lr=1e-3, **options), params)
        outs.append(params[0].detach())
    assert not torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("name", ["SGD", "Lion", "Adam"])
def test_stochastic_rounding_resumes_with_the_same_bits(name):
    """The counter is the param's step count, saved in the state_dict (SGD and Lion keep one
    with this option), so a resumed run repeats the uninterrupted one bit for bit."""
    params = params_of(torch.bfloat16)
    opt = getattr(ft, name)(params, stochastic_rounding=True, sr_seed=5, **CASES[name])
    run(opt, params)
    sd = roundtrip(opt.state_dict())
    opt2, params2 = continue_both(
        lambda ps: getattr(ft, name)(ps, stochastic_rounding=True, sr_seed=5, **CASES[name]),
        opt, params, sd)
    for q in params2:
        assert float(opt2.state[q]["step"]) == 2 * STEPS


def test_stochastic_rounding_keeps_fp32_params_nearest():
    params = params_of(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run(ft.Adam(params, stochastic_rounding=True), params)
    run(ft.Adam(ref), ref)
    for p, q in zip(params, ref):
        assert_same(p.detach(), q.detach())


# ---- state dtypes -------------------------------------------------------------------------------

def numpy_state(x):
    return x.to_float() if isinstance(x, QuantizedState) else np.asarray(x)


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_is_the_numpy_class(name, state_dtype):
    """Params and every state, bit for bit, against fastoptim.optim's class with the same
    state_dtype (a 5000-element param quantized, a 300-element one kept float32). NAdam's
    mu_product is a Python float in the NumPy class and a tensor of torch's default dtype in
    the drop-in (as in torch), so NAdam runs with float64 as the default dtype."""
    default = torch.get_default_dtype()
    if name == "NAdam":
        torch.set_default_dtype(torch.float64)
    try:
        check_against_numpy_class(name, state_dtype)
    finally:
        torch.set_default_dtype(default)


def np_view(t):
    """A NumPy copy of a tensor (bfloat16 as ml_dtypes.bfloat16)."""
    return np_bf16(t) if t.dtype == torch.bfloat16 else t.detach().numpy().copy()


def raw(a):
    """An array's bits."""
    return a.view({2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize])


def check_against_numpy_class(name, state_dtype, dtype=torch.float32):
    params = params_of(dtype)
    nps = [np_view(p) for p in params]
    opt = getattr(ft, name)(params, state_dtype=state_dtype, **CASES[name])
    ref = getattr(fo, name)(nps, state_dtype=state_dtype, **CASES[name])
    for s in range(STEPS):
        grads = grads_of(params, s)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([np_view(g) for g in grads])
    for k, p in enumerate(params):
        assert np.array_equal(raw(np_view(p)), raw(nps[k]))
        theirs = ref.state[k]
        for key, value in theirs.items():
            mine = opt.state[p][key]
            if isinstance(value, QuantizedState):
                assert k == 0 and isinstance(mine, dict)
                assert np.array_equal(mine["codes"].numpy(), value.codes), key
                assert np.array_equal(mine["absmax"].numpy().view(np.int32),
                                      value.absmax.view(np.int32)), key
            else:
                assert np.array_equal(raw(np_view(mine)), raw(value)), key
                assert mine.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                      "int8": torch.float32, "int4": torch.float32}[state_dtype]


@pytest.mark.parametrize("state_dtype,dtype", [("float32", torch.bfloat16),
                                               ("float32", torch.float16),
                                               ("bfloat16", torch.bfloat16),
                                               ("int8", torch.bfloat16),
                                               ("int4", torch.bfloat16),
                                               ("int8", torch.float16)])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad", "NAdam"])
def test_state_dtype_with_low_precision_params(name, state_dtype, dtype):
    """bfloat16/float16 params with float32 (or bfloat16) states, and bfloat16 params with
    int8/int4 states, against the NumPy classes; int8 on float16 params: the small param keeps
    float32 states, the large one is refused (TypeError, as the NumPy class at construction)."""
    default = torch.get_default_dtype()
    if name == "NAdam":
        torch.set_default_dtype(torch.float64)
    try:
        if state_dtype == "int8" and dtype == torch.float16:
            params = params_of(dtype)
            with pytest.raises(TypeError, match="int8"):  # the NumPy class, at construction
                getattr(fo, name)([np_view(p) for p in params], state_dtype="int8")
            opt = getattr(ft, name)(params, state_dtype="int8", **CASES[name])
            kept = [p.detach().clone() for p in params]
            with pytest.raises(TypeError, match=r"\['params'\]\[0\] has dtype .*int8"):
                run(opt, params, steps=1)
            for p, k in zip(params, kept):
                assert_same(p.detach(), k)
            params = params_of(dtype, sizes=(300,))
            opt = getattr(ft, name)(params, state_dtype="int8", **CASES[name])
            run(opt, params, steps=1)
            assert all(v.dtype == torch.float32 for k, v in opt.state[params[0]].items()
                       if k not in ("step", "mu_product"))
        else:
            check_against_numpy_class(name, state_dtype, dtype)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_quantized_state_dict_round_trip(state_dtype):
    params = params_of(torch.float32)
    opt = ft.AdamW(params, lr=1e-2, state_dtype=state_dtype)
    run(opt, params)
    sd = roundtrip(opt.state_dict())
    entry = sd["state"][0]["exp_avg"]
    assert entry["codes"].dtype == torch.uint8 and entry["bits"] == int(state_dtype[3:])
    assert sd["state"][1]["exp_avg"].dtype == torch.float32  # 300 < MIN_QUANTIZED_SIZE
    opt2, params2 = continue_both(lambda ps: ft.AdamW(ps, lr=1e-2, state_dtype=state_dtype),
                                  opt, params, sd)
    for p, q in zip(params, params2):
        assert_same_state(opt.state[p], opt2.state[q])


def test_dequantized_state_dict_loads_into_torch_and_back():
    """dequantized_state_dict gives torch.optim's float32 layout; torch.optim.AdamW loads and
    steps with it; a torch.optim state_dict loads into an int8 drop-in, which quantizes it,
    as the NumPy class does."""
    params = params_of(torch.float32)
    opt = ft.AdamW(params, lr=1e-2, state_dtype="int8")
    run(opt, params)
    sd = ft.dequantized_state_dict(opt.state_dict())
    q = opt.state[params[0]]["exp_avg"]
    want = QuantizedState(q["codes"].numpy(), q["absmax"].numpy(), 8, q["shape"]).to_float()
    assert np.array_equal(sd["state"][0]["exp_avg"].numpy(), want)
    assert isinstance(opt.state_dict()["state"][0]["exp_avg"], dict)  # the input is unchanged
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
    topt = torch.optim.AdamW(tparams, lr=1e-2, foreach=False)
    topt.load_state_dict(copy.deepcopy(sd))
    run(topt, tparams, steps=2, first=STEPS)

    tsd = copy.deepcopy(topt.state_dict())
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in tparams]
    opt2 = ft.AdamW(params2, lr=1e-2, state_dtype="int8")
    opt2.load_state_dict(tsd)
    nps = [p.detach().numpy().copy() for p in tparams]
    ref = fo.AdamW(nps, lr=1e-2, state_dtype="int8")
    ref.load_state_dict({"state": {k: {n: (int(v) if n == "step" else v.numpy())
                                       for n, v in e.items()} for k, e in tsd["state"].items()},
                         "param_groups": [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=1e-2, amsgrad=False,
                                               maximize=False, decoupled_weight_decay=True,
                                               params=[0, 1])]})
    grads = grads_of(params2, 50)
    for p, g in zip(params2, grads):
        p.grad = g
    opt2.step()
    ref.step([g.numpy() for g in grads])
    for k, p in enumerate(params2):
        assert np.array_equal(p.detach().numpy(), nps[k])
    assert np.array_equal(opt2.state[params2[0]]["exp_avg"]["codes"].numpy(),
                          ref.state[0]["exp_avg"].codes)


def test_quantized_state_loads_into_a_plain_drop_in_dequantized():
    params = params_of(torch.float32)
    opt = ft.Adam(params, lr=1e-2, state_dtype="int4")
    run(opt, params)
    plain = ft.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    p0 = plain.param_groups[0]["params"][0]
    assert plain.state[p0]["exp_avg"].dtype == torch.float32
    assert "state_dtype" not in plain.param_groups[0]  # the loading optimizer's options
    run(plain, plain.param_groups[0]["params"], steps=1)


def test_state_nbytes():
    n = 1 << 16
    sizes = {}
    for sd in (None, "bfloat16", "int8", "int4"):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = ft.Adam([p], state_dtype=sd)
        p.grad = torch.ones(n)
        opt.step()
        sizes[sd] = opt.state_nbytes() - 4  # the float32 step count
    assert sizes[None] == 2 * 4 * n
    assert sizes["bfloat16"] == 2 * 2 * n
    assert sizes["int8"] == 2 * (n + 4 * n // 256)
    assert sizes["int4"] == 2 * (n // 2 + 4 * n // 128)
    assert sizes["int8"] <= 0.27 * sizes[None]
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    opt = ft.Adam([p], master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_nbytes() - 4 == 3 * 4 * n  # exp_avg, exp_avg_sq, master_weight


# ---- per-group options, AMP -------------------------------------------------------------------

def test_options_per_param_group():
    a, b = params_of(torch.bfloat16, sizes=(5000, 5000))
    opt = ft.Adam([{"params": [a]}, {"params": [b], "master_weights": True}], lr=1e-2)
    assert "master_weights" not in opt.param_groups[0]
    run(opt, [a, b])
    assert "master_weight" not in opt.state[a] and opt.state[a]["exp_avg"].dtype == a.dtype
    assert opt.state[b]["master_weight"].dtype == torch.float32


def test_grad_scaler_semantics_in_the_format_path():
    params = params_of(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ft.Adam(params, lr=1e-2, master_weights=True)
    opt_ref = ft.Adam(ref, lr=1e-2, master_weights=True)
    for s in range(3):
        grads = grads_of(params, s)
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g * 1024, g
        opt.grad_scale = torch.tensor(1024.0)
        opt.step()
        opt_ref.step()
    for p, q in zip(params, ref):
        assert_same(p.detach(), q.detach())
    before = copy.deepcopy(opt.state_dict())
    kept = [p.detach().clone() for p in params]
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for p, k in zip(params, kept):
        assert_same(p.detach(), k)
    assert float(opt.state[params[0]]["step"]) == float(before["state"][0]["step"])


# ---- bad arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,kind,match", [
    (dict(master_weights="yes"), TypeError, "master_weights"),
    (dict(stochastic_rounding=1), TypeError, "stochastic_rounding"),
    (dict(sr_seed=1.5), TypeError, "sr_seed"),
    (dict(sr_seed=True), TypeError, "sr_seed"),
    (dict(sr_seed=-1), ValueError, "sr_seed"),
    (dict(sr_seed=2**64), ValueError, "sr_seed"),
    (dict(state_dtype="int3"), ValueError, "state_dtype"),
    (dict(state_dtype=8), TypeError, "state_dtype"),
    (dict(state_dtype=torch.float32), TypeError, "state_dtype"),
    (dict(master_weights=True, stochastic_rounding=True), ValueError, "exclude"),
    (dict(master_weights=True, state_dtype="int8"), ValueError, "state_dtype"),
    (dict(master_weights=True, state_dtype="bfloat16"), ValueError, "state_dtype"),
])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion", "NAdam"])
def test_bad_options_are_refused(name, kwargs, kind, match):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(kind, match=match):
        getattr(ft, name)([p], **kwargs)
    opt = getattr(ft, name)([p])
    with pytest.raises(kind, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **kwargs})
    assert len(opt.param_groups) == 1


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, params, snap):
    for p, k in zip(params, snap[0]):
        assert_same(p.detach(), k)
    now = opt.state_dict()
    assert now["state"].keys() == snap[1]["state"].keys()
    for key, entry in snap[1]["state"].items():
        assert now["state"][key].keys() == entry.keys()


@pytest.mark.parametrize("bad,kind,match", [
    ("fp16_sr", ValueError, r"param_groups\[1\]\['params'\]\[0\].*stochastic_rounding"),
    ("fp16_int8", TypeError, r"param_groups\[1\]\['params'\]\[0\].*int8"),
    ("grad_dtype", TypeError, r"param_groups\[1\]\['params'\]\[0\].*gradient has dtype"),
    ("alias", ValueError, "shares memory"),
])
def test_a_bad_step_writes_nothing(bad, kind, match):
    """Group 0 is fine and would be stepped first; group 1 is bad: the step raises naming the
    param, and neither group's params nor states change."""
    good = params_of(torch.float32, sizes=(5000,))
    dtype = {"fp16_sr": torch.float16, "fp16_int8": torch.float16}.get(bad, torch.float32)
    other = params_of(dtype, sizes=(5000,), seed=1)
    options = {"fp16_sr": dict(stochastic_rounding=True),
               "fp16_int8": dict(state_dtype="int8")}.get(bad, dict(state_dtype="int8"))
    opt = ft.Adam([{"params": good}, {"params": other, **options}], lr=1e-2)
    run(opt, good)  # group 0 has states now
    snap = snapshot(opt, good + other)
    good[0].grad = torch.ones_like(good[0])
    other[0].grad = torch.ones_like(other[0])
    if bad == "grad_dtype":
        other[0].grad_dtype = None  # torch 2.13 refuses another dtype unless told
        other[0].grad = torch.ones(5000, dtype=torch.float64)
    if bad == "alias":
        other[0].grad = good[0].detach()[:5000]  # group 0's param, written by its call
    with pytest.raises(kind, match=match):
        opt.step()
    assert_unchanged(opt, good + other, snap)


def test_bad_quantized_state_in_a_state_dict():
    params = params_of(torch.float32)
    opt = ft.Adam(params, state_dtype="int8")
    run(opt, params, steps=1)
    original = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"]["codes"] = sd["state"][0]["exp_avg"]["codes"][:-1]
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\].*codes"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"]["codes"] = sd["state"][0]["exp_avg"]["codes"].float()
    with pytest.raises(TypeError, match="codes"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"]["absmax"][0] = -1.0
    with pytest.raises(ValueError, match="absmax"):
        opt.load_state_dict(sd)
    for k, p in enumerate(params):  # nothing was loaded
        assert_same_state(opt.state[p], original["state"][k])
    with pytest.raises(TypeError, match="state_dict"):
        ft.dequantized_state_dict([1, 2])


def test_small_tensors_keep_float32_states():
    assert MIN_QUANTIZED_SIZE == 4096
    small = torch.nn.Parameter(torch.zeros(MIN_QUANTIZED_SIZE - 1))
    big = torch.nn.Parameter(torch.zeros(MIN_QUANTIZED_SIZE))
    opt = ft.RMSprop([small, big], state_dtype="int8")
    run(opt, [small, big], steps=1)
    assert opt.state[small]["square_avg"].dtype == torch.float32
    assert isinstance(opt.state[big]["square_avg"], dict)
