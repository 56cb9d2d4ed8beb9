"""The 16-bit storage formats on CUDA (Note [16-bit formats on the device] in
src/cuda/rule_visitor.h): bfloat16 and float16 params, grads and states, float32 states for
low-precision params, float32 master weights with low-precision grads and a copy written in the
same pass, Kahan-compensated bfloat16 params, stochastic rounding, and grad_scale.

Four groups:

* The CUDA kernel body emulated on the CPU (``_core._emulate_kernel``, CUDA builds): every case
  of the case table in every 16-bit format of format_cases.FORMATS, and every load/store
  option, over slices of odd sizes at odd offsets (the 8-element vector visits, their heads
  and tails, launches split into groups), bit for bit against the CPU kernels on every
  buffer, gaps included.
* The grid walk of the 16-bit launches (``_core._plan_coverage`` with per-stream itemsizes and
  a copies stream), on the CPU.
* Device dtypes, on the CPU (fake CUDA Array Interface objects): per-role dtypes and the
  format table's combinations.
* On a GPU: torch CUDA tensors (bfloat16 and float16 through DLPack) and CuPy float16 arrays
  (the CUDA Array Interface) against the CPU kernels, bit for bit, for every case and format
  and option; a bad combination writes nothing; and all-bfloat16/float16 Adam against
  torch.optim.Adam(fused=True) on the GPU. They skip where there is no GPU, and have never run
  (no GPU was lent to the stop that wrote them).
"""

import numpy as np
import pytest

import fastoptim
import optimizer_cases as cases
from fastoptim import _core
from optimizer_cases import CASES, case_id
from test_cuda import FakeDevice, carve_host as carve
from format_cases import (BF16, FORMATS, FULL_CASES, copy_state, first_name, make_grads,
                          make_state)

CUDA = _core.info()["cuda"]
needs_emulation = pytest.mark.skipif(
    not hasattr(_core, "_emulate_kernel"),
    reason="fastoptim was built without CUDA: there is no CUDA kernel to emulate")

# The load/store options, each with the formats it applies to.
#   grad_scale: grads are scaled up by 2^10 and divided by it in the kernel
#   sr: stochastic rounding of bfloat16 params (no compensation)
#   kahan: bfloat16 params, grads and states with a bfloat16 compensation per param
OPTIONS = {
    "grad_scale": list(FORMATS),
    "sr": ["bfloat16", "bf16-f32states"],
    "kahan": ["bfloat16"],
}


def option_kwargs(option, step, state):
    """The keyword options of a call (``compensation`` is taken from the state)."""
    if option == "grad_scale":
        return {"grad_scale": 1024.0}
    if option == "sr":
        return {"stochastic_rounding": (1234, step, 5)}
    if option == "kahan":
        return {"compensation": state["compensation"]}
    return {}


def scaled(grads, option):
    """The grads a call passes: times 2^10 (exact) where the kernel unscales them."""
    if option != "grad_scale":
        return grads
    out = []
    for g in grads:
        s = (g.astype(np.float32) * np.float32(1024.0)).astype(g.dtype)
        s.flags.writeable = False
        out.append(s)
    return out


def add_compensation(state, rule, rng):
    state["compensation"] = [
        (rng.uniform(-1, 1, p.shape) * 2.0 ** -10).astype(np.float32).astype(BF16)
        for p in state[first_name(rule)]]


def call_kwargs(rule, hyper, state, step):
    kwargs = {n: a for n, a in state.items() if n not in (first_name(rule), "compensation")}
    kwargs.update(cases.scalar_kwargs(rule, hyper, step))
    kwargs.update(hyper)
    return kwargs


class _Recorder:
    """Stands in for fastoptim._core: records the call a functional update makes."""

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.call = (name, args, kwargs)
        return record


def core_call(rule, params, grads, kwargs, options):
    """(rule, positional arguments, keyword options) that fastoptim.<rule>_ passes to _core."""
    from fastoptim import functional
    recorder, saved = _Recorder(), functional._core
    functional._core = recorder
    try:
        getattr(fastoptim, rule + "_")(params, grads, **kwargs, **options)
    finally:
        functional._core = saved
    return recorder.call


def buffers_for(rule, hyper, fmt, option, total, rng):
    """One buffer per stream (params, states, copies, compensation), as make_state fills them."""
    state = make_state(rule, hyper, fmt, [total], rng)
    if option == "kahan":
        add_compensation(state, rule, rng)
    return {name: arrays[0] for name, arrays in state.items()}


GEOMETRIES = [dict(), dict(chunk=13, block=3, grid=2), dict(group=4, chunk=64, block=32, grid=5)]
SLICE_SIZES = [1, 2, 3, 7, 8, 9, 17, 0, 64, 33, 4099]


def run_emulated_vs_cpu(rule, hyper, fmt, option, geometry, seed):
    rng = np.random.default_rng(seed)
    total = sum(SLICE_SIZES) + len(SLICE_SIZES) + 8
    ref_buf = buffers_for(rule, hyper, fmt, option, total, rng)
    emu_buf = {n: b.copy() for n, b in ref_buf.items()}
    names = list(ref_buf)
    for shifts in ({n: 1 for n in names}, {n: k % 3 for k, n in enumerate(names)},
                   {n: 0 for n in names}):
        ref = carve(ref_buf, SLICE_SIZES, shifts)
        emu = carve(emu_buf, SLICE_SIZES, shifts)
        for step in range(1, 4):
            grads = scaled(make_grads(rule, fmt, SLICE_SIZES, rng), option)
            getattr(fastoptim, rule + "_")(ref[first_name(rule)], grads,
                                           **call_kwargs(rule, hyper, ref, step),
                                           **option_kwargs(option, step, ref))
            core_rule, args, opts = core_call(rule, emu[first_name(rule)], grads,
                                              call_kwargs(rule, hyper, emu, step),
                                              option_kwargs(option, step, emu))
            _core._emulate_kernel(core_rule, args, options=opts, **geometry)
            for name in names:
                assert emu_buf[name].tobytes() == ref_buf[name].tobytes(), (
                    f"{name} after step {step} (shifts {shifts})")


@needs_emulation
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_formats_equal_cpu_kernels(case, fmt):
    """Every case in every 16-bit format: the emulated CUDA kernel and the CPU kernels agree
    bit for bit on every buffer over 3 steps, slices at three alignments."""
    rule, hyper = case
    run_emulated_vs_cpu(rule, hyper, fmt, None, dict(), 11)


@needs_emulation
@pytest.mark.parametrize("geometry", GEOMETRIES,
                         ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()) or "launcher")
@pytest.mark.parametrize("fmt,option", [(f, o) for o, fs in OPTIONS.items() for f in fs])
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_emulated_options_equal_cpu_kernels(case, fmt, option, geometry):
    """grad_scale, stochastic rounding and Kahan compensation, every rule's fullest case, with
    the launcher's geometry and with small chunks, blocks and groups."""
    rule, hyper = case
    run_emulated_vs_cpu(rule, hyper, fmt, option, geometry, 12)


@needs_emulation
@pytest.mark.parametrize("n_arrays", [1, 448, 449, 1000])
def test_emulated_formats_many_arrays(n_arrays):
    """The 16-bit formats' launches hold 448 tensors (they carry each tensor's offset and copy
    pointer): 449 and 1,000 arrays take several launches; stochastic rounding's element index
    runs on across them."""
    rng = np.random.default_rng(13)
    rule, hyper = FULL_CASES[[r for r, _ in FULL_CASES].index("adam")]
    sizes = [int(s) for s in rng.integers(1, 40, n_arrays)]
    for fmt, option in (("bfloat16", "sr"), ("f32-bf16grads-copy", None)):
        ref = make_state(rule, hyper, fmt, sizes, rng)
        emu = copy_state(ref)
        grads = make_grads(rule, fmt, sizes, rng)
        opts = option_kwargs(option, 3, ref)
        getattr(fastoptim, rule + "_")(ref[first_name(rule)], grads,
                                       **call_kwargs(rule, hyper, ref, 3), **opts)
        core_rule, args, o = core_call(rule, emu[first_name(rule)], grads,
                                       call_kwargs(rule, hyper, emu, 3), option_kwargs(option, 3, emu))
        _core._emulate_kernel(core_rule, args, options=o)
        for name in ref:
            for k, (a, b) in enumerate(zip(emu[name], ref[name])):
                assert a.tobytes() == b.tobytes(), f"{fmt}: {name}[{k}] of {n_arrays}"


@pytest.mark.skipif(not hasattr(_core, "_plan_coverage"), reason="no plan hooks")
@pytest.mark.parametrize("itemsizes", [(2, 2, 2, 2, 2), (2, 2, 4, 4, 4), (4, 2, 4, 4, 4),
                                       (4, 4, 2, 2, 2), (4, 2, 4, 4, 4, 2), (2, 2, 2, 2, 2, 2)])
@pytest.mark.parametrize("n", [1, 5, 449])
def test_plan_covers_16_bit_streams(itemsizes, n):
    """The grid walk of a 16-bit format's launch (8 elements a vector visit; a float32 stream
    takes two 16-byte pieces), with a copies stream where a sixth itemsize says so: every
    element once, each visit with its own tensor's pointers (the copies stream's included),
    every vector access 16-byte aligned in every stream, at per-stream byte offsets that make
    some spans scalar."""
    rng = np.random.default_rng(n)
    streams = len(itemsizes)
    sizes = [203] + [int(s) for s in rng.integers(0, 300, n - 1)]
    # tensor 0 aligned (it has vector visits); odd tensors misaligned in their last stream only
    # (the copies stream where there is one), even ones anywhere
    offsets = [[0] * streams]
    for t in range(1, n):
        o = [int(k) * b for k, b in zip(rng.integers(0, 8, streams), itemsizes)]
        offsets.append([0] * (streams - 1) + o[-1:] if t % 2 else o)
    d = _core._plan_coverage(sizes, offsets, itemsize=list(itemsizes), chunk=64)
    assert d["counts"].tolist() == [1] * sum(sizes)
    assert d["misaligned_vectors"] == 0 and d["out_of_range"] == 0 and d["wrong_pointers"] == 0
    assert d["vector_visits"] > 0 and d["scalar_visits"] > 0
    assert max(len(l["tensors"]) for l in d["launches"]) <= 448


# =============================================================================================
# Device dtypes, on the CPU (fake CUDA Array Interface objects)


@pytest.mark.skipif(not CUDA["built"], reason="fastoptim was built without CUDA")
def test_fake_device_unsupported_combination_names_the_dtypes():
    params = [FakeDevice((4,), "<f4")]
    grads = [FakeDevice((4,), "<f2")]
    states = [FakeDevice((4,), "<f2")]
    with pytest.raises(TypeError, match=r"unsupported combination of dtypes: params float32"
                                        r".*grads float16.*states float16"):
        fastoptim.sgd_(params, grads, momentum_buffers=states, step=2, lr=0.1, momentum=0.9)


@pytest.mark.skipif(not CUDA["built"], reason="fastoptim was built without CUDA")
def test_fake_device_grads_of_two_dtypes_are_refused():
    params = [FakeDevice((4,), "<f2"), FakeDevice((4,), "<f2")]
    grads = [FakeDevice((4,), "<f2"), FakeDevice((4,), "<f4")]
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float32 but grads\[0\] has dtype "
                                        r"float16; all grads of one call share one dtype"):
        fastoptim.sgd_(params, grads, lr=0.1)


# =============================================================================================
# GPU tests


def _gpu_skip_reason():
    if not CUDA["built"]:
        return "fastoptim was built without CUDA"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
if GPU_SKIP is None:
    import torch


def to_torch(a):
    """A CUDA tensor with a's bits (bfloat16 through its uint16 view)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.array(a)).cuda()  # a writeable copy (grads are read-only)


def from_torch(t, dtype):
    t = t.cpu()
    if dtype == BF16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


GPU_SIZES = [1, 7, 8, 9, 17, 4099, 2**18 + 3]


def run_gpu_vs_cpu(rule, hyper, fmt, option, steps, seed, cupy_arrays=False):
    rng = np.random.default_rng(seed)
    cpu = make_state(rule, hyper, fmt, GPU_SIZES, rng)
    if option == "kahan":
        add_compensation(cpu, rule, rng)
    if cupy_arrays:
        import cupy as cp
        dev = {n: [cp.asarray(a) for a in v] for n, v in cpu.items()}
    else:
        dev = {n: [to_torch(a) for a in v] for n, v in cpu.items()}
    for step in range(1, steps + 1):
        grads = scaled(make_grads(rule, fmt, GPU_SIZES, rng), option)
        dgrads = [cp.asarray(g) for g in grads] if cupy_arrays else [to_torch(g) for g in grads]
        getattr(fastoptim, rule + "_")(cpu[first_name(rule)], grads,
                                       **call_kwargs(rule, hyper, cpu, step),
                                       **option_kwargs(option, step, cpu))
        getattr(fastoptim, rule + "_")(dev[first_name(rule)], dgrads,
                                       **call_kwargs(rule, hyper, dev, step),
                                       **option_kwargs(option, step, dev))
    for name, arrays in cpu.items():
        for k, a in enumerate(arrays):
            got = (dev[name][k].get() if cupy_arrays else from_torch(dev[name][k], a.dtype))
            assert got.tobytes() == a.tobytes(), f"{fmt}: {name}[{k}] after {steps} steps"


@needs_gpu
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_formats_equal_cpu_kernels(case, fmt):
    """Every case in every 16-bit format on torch CUDA tensors: 3 steps, bit for bit against
    the CPU kernels, every array of every stream."""
    rule, hyper = case
    run_gpu_vs_cpu(rule, hyper, fmt, None, 3, 21)


@needs_gpu
@pytest.mark.parametrize("fmt,option", [(f, o) for o, fs in OPTIONS.items() for f in fs])
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_gpu_options_equal_cpu_kernels(case, fmt, option):
    rule, hyper = case
    run_gpu_vs_cpu(rule, hyper, fmt, option, 3, 22)


@needs_gpu
@pytest.mark.parametrize("fmt", ["float16", "f16-f32states", "f32-f16grads-copy"])
def test_gpu_cupy_float16_arrays(fmt):
    """CuPy float16 arrays arrive through the CUDA Array Interface ('<f2')."""
    pytest.importorskip("cupy")
    rule, hyper = FULL_CASES[[r for r, _ in FULL_CASES].index("adamw")]
    run_gpu_vs_cpu(rule, hyper, fmt, None, 3, 23, cupy_arrays=True)


@needs_gpu
def test_gpu_bad_combination_writes_nothing():
    p = torch.ones(10, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(10, dtype=torch.float16, device="cuda")
    before = p.clone()
    with pytest.raises(TypeError, match="unsupported combination of dtypes"):
        fastoptim.sgd_([p], [g], lr=0.1)
    assert torch.equal(p, before)


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_all_low_precision_adam_matches_torch_fused(dtype):
    """All-bf16 / all-fp16 Adam, 20 steps on the GPU, against torch.optim.Adam(fused=True) on
    the same tensors' copies: within one unit in the last place."""
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(5)
    p0 = torch.randn(1 << 16, device="cuda", generator=gen).to(tdt)
    ours, theirs = p0.clone(), torch.nn.Parameter(p0.clone())
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    opt = torch.optim.Adam([theirs], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                           fused=True)
    for step in range(1, 21):
        g = torch.randn(1 << 16, device="cuda", generator=gen).to(tdt)
        theirs.grad = g.clone()
        opt.step()
        fastoptim.adam_([ours], [g], exp_avgs=[m], exp_avg_sqs=[v], step=step, lr=1e-2,
                        beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)
    a, b = ours.float(), theirs.detach().float()
    spacing = torch.where(b == 0, torch.zeros_like(b), torch.abs(b) * (2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10))
    assert bool(torch.all(torch.abs(a - b) <= spacing + 1e-30)), float(torch.max(torch.abs(a - b)))
