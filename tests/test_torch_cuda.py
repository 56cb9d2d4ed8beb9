"""fastoptim.torch on CUDA tensors: routed to fastoptim's CUDA kernels when fastoptim is built
with CUDA and a device is present (docs/torch.md); skipped, saying which is missing, otherwise.
"""

import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as ft  # noqa: E402


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not fastoptim.backend_info()["cuda"]["built"]:
        pytest.skip("fastoptim is built without CUDA (FASTOPTIM_CUDA, docs/cuda.md)")
    return torch.device("cuda")


CASES = [("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01, weight_decay=0.1)),
         ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("RMSprop", dict(lr=0.01)),
         ("Adagrad", dict(lr=0.05)), ("NAdam", dict(lr=0.01)), ("Rprop", dict(lr=0.01))]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_params_step_like_torch(cuda, name, kwargs, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (17,), (0,), (4099,)]
    expected = [torch.randn(s, generator=gen, dtype=dtype).to(cuda).requires_grad_()
                for s in shapes]
    actual = [p.detach().clone().requires_grad_() for p in expected]
    ref = getattr(torch.optim, name)(expected, foreach=False, **kwargs)
    opt = getattr(ft, name)(actual, **kwargs)
    for _ in range(10):
        for p, q in zip(expected, actual):
            g = torch.randn(p.shape, generator=gen, dtype=dtype).to(cuda)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
    for p, q in zip(expected, actual):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=rtol, atol=atol)
        for key, want in ref.state[p].items():
            got = opt.state[q][key]
            if want.device.type == "cuda":
                assert got.device == want.device
            torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol,
                                       check_dtype=key not in ("step", "mu_product"))


def test_cpu_and_cuda_params_in_one_group(cuda):
    """One kernel call per (dtype, device): a group may mix CPU and CUDA parameters."""
    gen = torch.Generator().manual_seed(0)
    expected = [torch.randn(7, generator=gen).requires_grad_(),
                torch.randn(9, generator=gen).to(cuda).requires_grad_()]
    actual = [p.detach().clone().requires_grad_() for p in expected]
    ref = torch.optim.Adam(expected, lr=0.01, foreach=False)
    opt = ft.Adam(actual, lr=0.01)
    for _ in range(3):
        for p, q in zip(expected, actual):
            g = torch.randn(p.shape, generator=gen).to(p.device)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    for p, q in zip(expected, actual):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_a_cpu_gradient_of_a_cuda_param_is_refused(cuda):
    p = torch.randn(5, device=cuda, requires_grad=True)
    try:
        p.grad = torch.randn(5)
    except RuntimeError as e:  # torch itself refuses the pair (seen with torch 2.11 on an H200)
        assert "device" in str(e)
        return
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"params'\]\[0\]: its gradient is on cpu"):
        ft.Adam([p], lr=0.01).step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("name, kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16_bit_params_equal_cpu_bit_for_bit(cuda, name, kwargs, dtype):
    """bfloat16 / float16 CUDA params (the all-16-bit format on the device, Note [16-bit
    formats on the device]): 10 steps of the drop-in equal the same drop-in on CPU copies bit
    for bit, params and every state."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (17,), (0,), (4099,)]
    on_cpu = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    on_gpu = [p.detach().to(cuda).requires_grad_() for p in on_cpu]
    cpu_opt, gpu_opt = getattr(ft, name)(on_cpu, **kwargs), getattr(ft, name)(on_gpu, **kwargs)
    for _ in range(10):
        for p, q in zip(on_cpu, on_gpu):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.to(cuda)
        cpu_opt.step()
        gpu_opt.step()
    for p, q in zip(on_cpu, on_gpu):
        assert torch.equal(q.detach().cpu(), p.detach())
        for key, want in cpu_opt.state[p].items():
            got = gpu_opt.state[q][key]
            if isinstance(want, torch.Tensor):
                assert torch.equal(got.cpu(), want), key


def test_grad_scaler_on_cuda_like_torch_fused(cuda):
    """torch.amp.GradScaler drives the drop-in on CUDA (grad_scale and found_inf: the grads
    unscaled in the kernel), an inf injected at step 3: the same params as
    torch.optim.Adam(fused=True) under its own scaler."""
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(64, 33, generator=gen)
    ours = torch.nn.Parameter(w0.clone().to(cuda))
    theirs = torch.nn.Parameter(w0.clone().to(cuda))
    opts = (ft.Adam([ours], lr=1e-2), torch.optim.Adam([theirs], lr=1e-2, fused=True))
    scalers = (torch.amp.GradScaler("cuda", init_scale=2.0**10),
               torch.amp.GradScaler("cuda", init_scale=2.0**10))
    for step in range(6):
        x = torch.randn(33, 8, generator=gen).to(cuda)
        for p, opt, scaler in zip((ours, theirs), opts, scalers):
            opt.zero_grad()
            loss = (p @ x).square().mean()
            if step == 3:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
