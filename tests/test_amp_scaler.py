"""torch.amp.GradScaler with the fastoptim.torch drop-ins: they declare
``_step_supports_amp_scaling``, so the scaler hands them ``grad_scale`` and ``found_inf`` and the
fused kernel unscales the grads as it loads them (the grads stay scaled in memory) or, on an
overflow, leaves params, states and steps untouched: torch's fused optimizers' contract.
"""
import copy

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402

CASES = [
    ("Adam", {"lr": 1e-2}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    ("Adagrad", {"lr": 1e-2}),
]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_grad_scaler_with_injected_inf_matches_torch_fused(name, kwargs):
    model_t = make_model()
    model_f = copy.deepcopy(model_t)
    opt_t = getattr(torch.optim, name)(model_t.parameters(), fused=True, **kwargs)
    opt_f = getattr(fot, name)(model_f.parameters(), **kwargs)
    assert opt_t._step_supports_amp_scaling and opt_f._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    for step in range(10):
        before = [p.detach().clone() for p in model_f.parameters()]
        for model, opt, scaler in ((model_t, opt_t, scalers[0]), (model_f, opt_f, scalers[1])):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            scaler.scale(loss).backward()
            if step in (3, 4):  # an overflow: both skip the step and halve the scale
                next(model.parameters()).grad[0, 0] = float("inf" if step == 3 else "nan")
            grads = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if opt is opt_f:
                # the scale went to the kernel: the grads in memory are still the scaled ones
                # (torch's fused CPU kernels write the unscaled grads back; ours only read)
                for g, p in zip(grads, model.parameters()):
                    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(p.grad))
        assert scalers[0].get_scale() == scalers[1].get_scale(), step
        for pt, pf in zip(model_t.parameters(), model_f.parameters()):
            torch.testing.assert_close(pf, pt, rtol=1e-5, atol=1e-6)
        if step in (3, 4):
            for b, p in zip(before, model_f.parameters()):
                assert torch.equal(b, p), "an overflow step must not change the params"
    steps_t = [s["step"] for s in opt_t.state.values() if "step" in s]
    steps_f = [s["step"] for s in opt_f.state.values() if "step" in s]
    assert [float(s) for s in steps_f] == [float(s) for s in steps_t] == [8.0] * len(steps_t)


def test_grad_scale_and_found_inf_attributes_drive_the_step():
    """What GradScaler does, by hand: optimizer.grad_scale / found_inf set before step()."""
    model = make_model()
    ref = copy.deepcopy(model)
    opt = fot.Adam(model.parameters(), lr=1e-2)
    opt_ref = fot.Adam(ref.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    for m in (model, ref):
        m(x).sum().backward()
    for p in model.parameters():
        p.grad.mul_(256.0)
    opt.grad_scale = torch.tensor(256.0)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in model.parameters()]
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())
    opt.grad_scale = torch.tensor(-1.0)
    opt.found_inf = torch.tensor(0.0)
    with pytest.raises(ValueError, match="grad_scale must be finite and > 0"):
        opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


LOW = [torch.bfloat16, torch.float16]


def ulps_apart(a, b):
    """Distance in units in the last place of a's dtype (bf16: 7 mantissa bits; f16: 10)."""
    bits = 7 if a.dtype == torch.bfloat16 else 10
    a64, b64 = a.double(), b.double()
    scale = torch.exp2(torch.floor(torch.log2(torch.maximum(a64.abs(), b64.abs()).clamp_min(1e-30))))
    return ((a64 - b64).abs() / (scale * 2.0**-bits)).max().item()


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name, kwargs", [("Adam", {"lr": 1e-2}),
                                          ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
                                          ("Adam", {"lr": 1e-2, "amsgrad": True})])
def test_low_precision_drop_ins_match_torch_fused(dtype, name, kwargs):
    """bfloat16/float16 params (states in the params' dtype, torch fused's behaviour): 20
    steps on the same gradients, params and states within one ulp of torch fused's."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (5,), (4099,)]
    pt = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    pf = [p.detach().clone().requires_grad_() for p in pt]
    opt_t = getattr(torch.optim, name)(pt, fused=True, **kwargs)
    opt_f = getattr(fot, name)(pf, **kwargs)
    for _ in range(20):
        for a, b in zip(pt, pf):
            g = torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt_t.step()
        opt_f.step()
        for a, b in zip(pt, pf):
            assert b.dtype == dtype
            assert ulps_apart(b.detach(), a.detach()) <= 1
    for a, b in zip(pt, pf):
        st, sf = opt_t.state[a], opt_f.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            assert sf[key].dtype == dtype
            assert ulps_apart(sf[key], st[key]) <= 1, key
