"""The CUDA backend: device arrays (``__cuda_array_interface__``) through the same API.

Three groups of tests:

* Validation of device arrays, on the CPU. Objects that expose a (fake) CUDA Array Interface
  go through every check of the contract (dtype, shape, count, C-contiguity, read-only,
  overlap, host/device mixing, malformed interfaces). All of them run before the first CUDA
  call, so they run on any build that has the CUDA backend compiled in, GPU or not; the fake
  pointers are never dereferenced. A build without CUDA must reject device arrays with a
  TypeError saying so.
* The CUDA kernel body (launch plan, RuleVisitor, flag dispatch) emulated on the CPU over
  NumPy arrays, bit for bit against the CPU kernels, for every rule and option.
* GPU tests, with CuPy arrays: every rule and option against the NumPy oracle
  (``fastoptim.reference``) and bit for bit against fastoptim's own CPU kernels (the same rule
  text; CUDA compiled with --fmad=false), lists of 1 to 5,000 arrays of odd sizes (one to nine
  launches), slices at odd offsets of one buffer, streams joined both ways, CUDA graph capture
  and replay after 100 other calls, the current context of a fresh thread, bad inputs that
  must leave every array unchanged, and a buffer of more than 2^31 elements. They skip, with
  the reason, where fastoptim was built without CUDA, CuPy is missing, or no GPU is visible.
  They ran once, on an H200 (2026-12-04; docs/cuda.md), before the changes made since.

The launcher's host-side decisions (capture states, device switch) are tested on the CPU in
tests/test_cuda_host_logic.py, the launch groups and grid walk in tests/test_launch_plan.py.
"""

import math

import numpy as np
import pytest

import fastoptim
from fastoptim import _core, reference
import optimizer_cases as cases
from optimizer_cases import CASES, active_states, case_id
from format_cases import first_name, grad_name, update as call

CUDA = _core.info()["cuda"]


def _gpu_skip_reason():
    if not CUDA["built"]:
        return "fastoptim was built without CUDA (FASTOPTIM_CUDA=OFF or no nvcc at build time)"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device, driver too old for CuPy
        return f"no usable GPU for CuPy: {type(e).__name__}: {e}"
    if count < 1:
        return "no GPU visible"
    return None


GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
needs_cuda_build = pytest.mark.skipif(
    not CUDA["built"], reason="fastoptim was built without CUDA (FASTOPTIM_CUDA=OFF or no nvcc)")

if GPU_SKIP is None:
    import cupy as cp


# =============================================================================================
# Build information


def test_info_reports_cuda():
    c = CUDA
    assert set(c) >= {"built", "device_count", "devices", "compute_capabilities",
                      "runtime_version", "driver_version", "architectures", "error"}
    assert isinstance(c["built"], bool)
    assert len(c["devices"]) == len(c["compute_capabilities"]) == c["device_count"]
    if c["device_count"] == 0:
        assert c["error"], "with no device, info() says why"
    if c["built"]:
        assert c["runtime_version"] >= 12000
        assert c["architectures"]
    else:
        assert c["device_count"] == 0


# =============================================================================================
# Validation of device arrays, on the CPU (fake CUDA Array Interface objects)


class FakeDevice:
    """An object with a CUDA Array Interface (v3) and no memory behind it."""

    _next = 0x7F00_0000_0000

    def __init__(self, shape, typestr="<f4", *, ptr=None, read_only=False, strides=None,
                 stream=None, **extra):
        size = math.prod(shape)
        if ptr is None:
            ptr = FakeDevice._next
            FakeDevice._next += (size * 8 + 4095) // 4096 * 4096 + 4096
        self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=typestr,
                                             data=(ptr, read_only), strides=strides,
                                             version=3, stream=stream, **extra)


def fake_call(fn="adam_", n=3, shape=(4, 5), **override):
    """A valid call on fake device arrays (lists of n), with every optional state on."""
    args = {
        "adam_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"],
                  dict(step=3, amsgrad=True, weight_decay=0.1)),
        "sgd_": (["params", "grads", "momentum_buffers"], dict(step=2, momentum=0.9)),
        "ema_": (["averages", "values"], dict(beta=0.9)),
    }[fn]
    names, hyper = args
    arrays = {name: [FakeDevice(shape) for _ in range(n)] for name in names}
    for name, value in override.items():
        if name in arrays:
            arrays[name] = value
        else:
            hyper[name] = value
    return lambda: getattr(fastoptim, fn)(**arrays, **hyper), arrays


# What a call that passed every check raises here: there is no GPU behind the fake pointers.
PASSED_CHECKS = r"(?i:no CUDA device|not CUDA device memory|cudaError)"


def assert_passes_validation(call):
    with pytest.raises((RuntimeError, ValueError), match=PASSED_CHECKS):
        call()


@needs_cuda_build
def test_fake_device_call_reaches_the_device_check():
    call, _ = fake_call()
    assert_passes_validation(call)


@needs_cuda_build
@pytest.mark.parametrize("fn", ["adam_", "sgd_", "ema_"])
def test_fake_device_single_arrays_and_empty(fn):
    call, _ = fake_call(fn, n=1)
    assert_passes_validation(call)
    # All arrays empty: nothing to launch, so no CUDA call at all.
    call, _ = fake_call(fn, n=2, shape=(0, 3))
    call()
    call, _ = fake_call(fn, n=0)
    call()


def _last(arrays, name, new):
    arrays[name] = arrays[name][:-1] + [new]
    return arrays[name]


@needs_cuda_build
@pytest.mark.parametrize("typestr,name", [("<u2", "uint16"), ("<i4", "int32"),
                                          (">f4", ">f4"), ("|b1", "bool")])
def test_unsupported_dtype(typestr, name):
    _, arrays = fake_call()
    _last(arrays, "exp_avgs", FakeDevice((4, 5), typestr))
    call, _ = fake_call(exp_avgs=arrays["exp_avgs"])
    with pytest.raises(TypeError, match=r"exp_avgs\[2\].*" + name):
        call()


@needs_cuda_build
def test_mixed_dtypes():
    _, arrays = fake_call()
    grads = _last(arrays, "grads", FakeDevice((4, 5), "<f8"))
    call, _ = fake_call(grads=grads)
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype float64 but grads\[0\] has dtype "
                                        r"float32; all grads of one call share one dtype"):
        call()
    # one dtype per role, but no row of the format table (docs/api.md) has float64 grads
    # for float32 params
    call, _ = fake_call(grads=[FakeDevice((4, 5), "<f8") for _ in range(3)])
    with pytest.raises(TypeError, match=r"unsupported combination of dtypes: params float32 "
                                        r"\(params\[0\]\), grads float64"):
        call()


@needs_cuda_build
def test_shape_and_count_mismatch():
    _, arrays = fake_call()
    call, _ = fake_call(exp_avg_sqs=_last(arrays, "exp_avg_sqs", FakeDevice((5, 4))))
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[2\].*shape"):
        call()
    call, _ = fake_call(grads=[FakeDevice((4, 5)) for _ in range(2)])
    with pytest.raises(ValueError, match=r"grads has 2 array"):
        call()


@needs_cuda_build
def test_not_c_contiguous():
    _, arrays = fake_call()
    call, _ = fake_call(max_exp_avg_sqs=_last(arrays, "max_exp_avg_sqs",
                                              FakeDevice((4, 5), strides=(4, 16))))
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[2\].*contiguous"):
        call()


@needs_cuda_build
@pytest.mark.parametrize("shape,strides", [((4, 5), (20, 4)), ((4, 1), (4, 999)),
                                           ((1, 5), (-3, 4)), ((0, 5), (7, 7)), ((), ())])
def test_c_strides_are_contiguous(shape, strides):
    """Explicit C strides, any stride on a size-1 dimension and empty arrays are accepted,
    as numpy's C_CONTIGUOUS flag accepts them."""
    _, arrays = fake_call(shape=shape)
    call, _ = fake_call(shape=shape,
                        grads=_last(arrays, "grads", FakeDevice(shape, strides=strides)))
    if math.prod(shape) == 0:
        call()
    else:
        assert_passes_validation(call)


@needs_cuda_build
def test_read_only():
    _, arrays = fake_call()
    call, _ = fake_call(exp_avgs=_last(arrays, "exp_avgs", FakeDevice((4, 5), read_only=True)))
    with pytest.raises(ValueError, match=r"exp_avgs\[2\].*read-only"):
        call()
    # A read-only gradient is fine.
    _, arrays = fake_call()
    call, _ = fake_call(grads=[FakeDevice((4, 5), read_only=True) for _ in range(3)])
    assert_passes_validation(call)


@needs_cuda_build
def test_overlap():
    _, arrays = fake_call()
    base = arrays["params"][0].__cuda_array_interface__["data"][0]
    alias = FakeDevice((4, 5), ptr=base + 8)
    call, _ = fake_call(params=arrays["params"], exp_avgs=_last(arrays, "exp_avgs", alias))
    with pytest.raises(ValueError, match=r"exp_avgs\[2\].*overlaps.*params\[0\]|"
                                         r"params\[0\].*overlaps.*exp_avgs\[2\]"):
        call()


@needs_cuda_build
def test_host_and_device_mixed():
    _, arrays = fake_call()
    call, _ = fake_call(grads=_last(arrays, "grads", np.zeros((4, 5), np.float32)))
    with pytest.raises(TypeError, match=r"grads\[2\].*numpy.*params\[0\].*CUDA.*same device"):
        call()
    call, _ = fake_call(params=[np.zeros((4, 5), np.float32) for _ in range(3)])
    with pytest.raises(TypeError, match=r"grads\[0\].*CUDA.*params\[0\].*numpy"):
        call()


@needs_cuda_build
@pytest.mark.parametrize("interface,match", [
    (5, "not a dict"),
    (dict(typestr="<f4", data=(4096, False), version=3), "shape"),
    (dict(shape=(4, 5), data=(4096, False), version=3), "typestr"),
    (dict(shape=(4, 5), typestr="<f4", version=3), "data"),
    (dict(shape=(4, 5), typestr="<f4", data=(4096, False), strides=(4,), version=3), "strides"),
    (dict(shape=(4, -5), typestr="<f4", data=(4096, False), version=3), "shape"),
    (dict(shape=(4, 5), typestr="<f4", data=(4096, False), stream="x", version=3), "stream"),
    (dict(shape=(4, 5), typestr="<f4", data=(4096, False), stream=-1, version=3), "stream"),
    (dict(shape=(4, 5), typestr="<f4", data=(4096, False), stream=2**64, version=3), "stream"),
    (dict(shape=(4, 5), typestr="<f4", data=(4096, False), strides=(20, 2**63), version=3),
     "strides"),
    (dict(shape=(4, 2**63), typestr="<f4", data=(4096, False), version=3), "shape"),
    (dict(shape=(4, 5), typestr="<f4", data=(-4096, False), version=3), "data"),
])
def test_malformed_interface(interface, match):
    class Odd:
        __cuda_array_interface__ = interface

    _, arrays = fake_call()
    call, _ = fake_call(grads=_last(arrays, "grads", Odd()))
    with pytest.raises(TypeError, match=r"grads\[2\].*__cuda_array_interface__.*" + match):
        call()


@needs_cuda_build
def test_masked_stream0_and_bad_pointers():
    cases = [
        (FakeDevice((4, 5), mask=object()), "mask"),
        (FakeDevice((4, 5), stream=0), "stream 0"),
        (FakeDevice((4, 5), ptr=0x7E00_0000_0002), "aligned"),
        (FakeDevice((4, 5), ptr=0), "aligned"),
    ]
    for bad, match in cases:
        _, arrays = fake_call()
        call, _ = fake_call(grads=_last(arrays, "grads", bad))
        with pytest.raises(ValueError, match=r"grads\[2\].*" + match):
            call()


@needs_cuda_build
def test_streams_are_accepted():
    _, arrays = fake_call()
    for name, stream in (("params", 1), ("grads", 2), ("exp_avgs", 0x5555_0000)):
        arrays[name] = [FakeDevice((4, 5), stream=stream) for _ in range(3)]
    call, _ = fake_call(**arrays)
    assert_passes_validation(call)


def test_not_an_array_at_all():
    with pytest.raises(TypeError, match=r"averages.*numpy\.ndarray.*__cuda_array_interface__"):
        fastoptim.ema_(object(), np.zeros(3, np.float32), beta=0.5)


@pytest.mark.skipif(CUDA["built"], reason="this build has CUDA")
def test_built_without_cuda_rejects_device_arrays():
    call, _ = fake_call()
    with pytest.raises(TypeError, match=r"params\[0\].*built without CUDA"):
        call()


# =============================================================================================
# Cases and helpers (the emulation and the GPU tests)

# The cases are the kernel tests' table (optimizer_cases.py): every option of every rule.
FULL = {rule: hyper for rule, hyper in CASES}  # the last (fullest) case of each rule

# Tolerances against the NumPy oracle (the kernels fuse x + a*y into one fma where NumPy
# rounds twice; ~6 operations of ~1 ulp each): one step from the same state float32 1e-6,
# float64 1e-12; after 100 steps without resynchronising float32 1e-5 (the one-step
# differences compound), float64 1e-12. atol: ulps of the array's scale, for results that
# cancel towards zero (their error is an ulp of the operands).
STEP_RTOL = {np.float32: 1e-6, np.float64: 1e-12}
TRAJ_RTOL = {np.float32: 1e-5, np.float64: 1e-12}
STEP_ATOL_ULPS, TRAJ_ATOL_ULPS = 8, 64
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 4099, 2**20 + 3]






def initial_state(rule, hyper, sizes, dtype, rng):
    state = {first_name(rule): [rng.uniform(-2.0, 2.0, s).astype(dtype) for s in sizes]}
    for name in active_states(rule, hyper):
        fill = 0.1 if rule == "adagrad" else cases.initial_state(rule, name, hyper)
        state[name] = [np.full(s, fill, dtype) for s in sizes]
    return state


def random_grads(sizes, dtype, rng):
    """|grad| in [0.5, 2], random sign, every 7th exactly zero (see test_functional.py,
    Note [no cancelled gradients])."""
    out = []
    for s in sizes:
        g = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
        g.reshape(-1)[::7] = 0.0
        out.append(g.astype(dtype))
    return out


def to_device(state):
    return {name: [cp.asarray(a) for a in arrays] for name, arrays in state.items()}


def to_host(state):
    return {name: [cp.asnumpy(a) for a in arrays] for name, arrays in state.items()}


def assert_close(actual, expected, dtype, rtol, atol_ulps, where):
    for name in expected:
        for k, (a, e) in enumerate(zip(actual[name], expected[name])):
            finite = np.abs(e[np.isfinite(e)])
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_ulps * np.finfo(dtype).eps * scale,
                                       err_msg=f"{where}: {name}[{k}]")


def odd_sizes(n, rng):
    return (rng.integers(0, 2048, size=n) * 2 + 1).tolist()


def assert_bitwise(actual, expected, where):
    for name in expected:
        for k, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.tobytes() == e.tobytes(), (
                f"{where}: {name}[{k}] differs from fastoptim's CPU kernels "
                f"(max |diff| {np.nanmax(np.abs(a.astype(np.float64) - e)):.3g})")


# =============================================================================================
# The kernel body, emulated on the CPU (_core._emulate_kernel, built with the CUDA backend)
#
# The launch plan, RuleVisitor and the flag dispatch of the CUDA launchers run on the CPU
# over NumPy arrays, thread after thread (src/cuda/emulate.cpp), and must give bit for bit
# what fastoptim's CPU kernels give: the CUDA kernel's data flow (which slots are loaded and
# stored, the lanes of 16-byte accesses, heads and tails, the flags -> rule mapping) is
# checked without a GPU. Only the load/store instructions themselves differ.

needs_emulation = pytest.mark.skipif(
    not hasattr(_core, "_emulate_kernel"),
    reason="fastoptim was built without CUDA: there is no CUDA kernel to emulate")

# Slots of the kernel, in bindings.cpp's order: param, grad, then the states (None: unused).


class _RecordCore:
    """Stands in for fastoptim._core: records the call a functional update makes."""

    def __getattr__(self, name):
        def record(*args):
            self.call = (name, args)
        return record


def core_call(rule, state, grads, hyper, step):
    """(rule name, positional arguments) that ``fastoptim.<rule>_`` passes to ``_core`` for
    these arrays: the arguments _core._emulate_kernel takes."""
    from fastoptim import functional
    recorder, saved = _RecordCore(), functional._core
    functional._core = recorder
    try:
        call(fastoptim, rule, hyper, state, grads, step)
    finally:
        functional._core = saved
    return recorder.call


def carve_host(buffers, sizes, shifts):
    """Per slot, consecutive slices of that slot's buffer, the first at element shifts[slot];
    a one-element gap between slices makes their starts alternate in alignment."""
    out = {}
    for name, buf in buffers.items():
        pos, arrays = shifts[name], []
        for s in sizes:
            arrays.append(buf[pos:pos + s])
            pos += s + 1
        out[name] = arrays
    return out


# group: tensors per launch (Note [launch groups]); 1 and 4 split the 9 slices into 9 and 3
# launches, as 5,000 tensors are split into groups of 576.
GEOMETRIES = [dict(), dict(chunk=13, block=3, grid=2), dict(chunk=64, block=32, grid=5),
              dict(chunk=4, block=1, grid=1), dict(group=1), dict(group=4, chunk=13, block=3)]


@needs_emulation
@pytest.mark.parametrize("geometry", GEOMETRIES,
                         ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()) or "launcher")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernel_equals_cpu_kernels(case, dtype, geometry):
    """Every case, slices of odd sizes at odd offsets (the same in every slot, or different
    per slot), 3 steps: the emulated CUDA kernel and the CPU kernels agree bit for bit on
    every buffer, gaps between the slices included."""
    rule, hyper = case
    rng = np.random.default_rng(8)
    sizes = [1, 2, 3, 7, 17, 0, 64, 33, 4099]
    names = [first_name(rule), grad_name(rule)] + active_states(rule, hyper)
    total = sum(sizes) + len(sizes) + 8
    ref_buffers = {name: rng.uniform(-2, 2, total).astype(dtype) for name in names}
    for name in active_states(rule, hyper):
        ref_buffers[name][:] = 0.1 if rule == "adagrad" else 0.0
    emu_buffers = {name: b.copy() for name, b in ref_buffers.items()}
    for shifts in ({n: 1 for n in names}, {n: k % 3 for k, n in enumerate(names)}):
        ref = carve_host(ref_buffers, sizes, shifts)
        emu = carve_host(emu_buffers, sizes, shifts)
        for step in range(1, 4):
            grads = random_grads(sizes, dtype, rng)
            for k, g in enumerate(grads):  # fresh gradients, same in both copies
                ref[grad_name(rule)][k][:] = g
                emu[grad_name(rule)][k][:] = g
            state = {n: a for n, a in ref.items() if n != grad_name(rule)}
            call(fastoptim, rule, hyper, state, ref[grad_name(rule)], step)
            emu_state = {n: a for n, a in emu.items() if n != grad_name(rule)}
            core_rule, args = core_call(rule, emu_state, emu[grad_name(rule)], hyper, step)
            _core._emulate_kernel(core_rule, args, **geometry)
            for name in names:
                assert emu_buffers[name].tobytes() == ref_buffers[name].tobytes(), (
                    f"{name} after step {step} (shifts {shifts})")


@needs_emulation
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n_arrays", [1, 9, 576, 577, 1000])
def test_emulated_kernel_many_arrays(n_arrays, dtype):
    """Up to 1,000 arrays of odd sizes with the launcher's own geometry and groups (577 and
    1,000 arrays: two launches)."""
    rng = np.random.default_rng(9)
    sizes = odd_sizes(n_arrays, rng)
    hyper = FULL["adam"]
    ref = initial_state("adam", hyper, sizes, dtype, rng)
    emu = {n: [a.copy() for a in v] for n, v in ref.items()}
    grads = random_grads(sizes, dtype, rng)
    call(fastoptim, "adam", hyper, ref, grads, 5)
    core_rule, args = core_call("adam", emu, grads, hyper, 5)
    _core._emulate_kernel(core_rule, args)
    assert_bitwise(emu, ref, f"{n_arrays} arrays")


# =============================================================================================
# GPU tests (CuPy)


@needs_gpu
def test_fastoptim_runtime_sees_the_gpu():
    """CuPy sees a GPU, so fastoptim's own (static) CUDA runtime must see it too; otherwise
    the driver is too old for the CUDA version fastoptim was built with."""
    assert CUDA["device_count"] >= 1, CUDA["error"]


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_step_each_case(case, dtype):
    """Every case, a list of arrays of all the sizes: 3 steps, each from the oracle's state.
    Compared with the oracle (tolerance) and with fastoptim's CPU kernels (bit for bit)."""
    rule, hyper = case
    rng = np.random.default_rng(1)
    host = initial_state(rule, hyper, SIZES, dtype, rng)
    for step in range(1, 4):
        grads = random_grads(SIZES, dtype, rng)
        dev = to_device(host)
        cpu = {n: [a.copy() for a in v] for n, v in host.items()}
        call(fastoptim, rule, hyper, dev, [cp.asarray(g) for g in grads], step)
        call(fastoptim, rule, hyper, cpu, grads, step)
        call(reference, rule, hyper, host, grads, step)
        got = to_host(dev)
        assert_bitwise(got, cpu, f"step {step}")
        assert_close(got, host, dtype, STEP_RTOL[dtype], STEP_ATOL_ULPS, f"step {step}")


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", sorted(FULL))
def test_trajectory_100_steps(rule, dtype):
    hyper = FULL[rule]
    rng = np.random.default_rng(2)
    sizes = [1, 17, 4099, 65537]
    host = initial_state(rule, hyper, sizes, dtype, rng)
    dev = to_device(host)
    cpu = {n: [a.copy() for a in v] for n, v in host.items()}
    for step in range(1, 101):
        grads = random_grads(sizes, dtype, rng)
        call(fastoptim, rule, hyper, dev, [cp.asarray(g) for g in grads], step)
        call(fastoptim, rule, hyper, cpu, grads, step)
        call(reference, rule, hyper, host, grads, step)
    got = to_host(dev)
    assert_bitwise(got, cpu, "after 100 steps")
    # Against the oracle, elementwise: 70,000 elements, some of them params hovering around 0
    # (test_functional.random_grads, Note [no cancelled gradients]), where 100 steps of 1-ulp
    # differences land ~1e-10 apart relative (adamax, float64, seen on an H200: 2 elements).
    assert_close(got, host, dtype, TRAJ_RTOL[dtype], 4 * TRAJ_ATOL_ULPS, "after 100 steps")


@needs_gpu
# 8 / 9: the small / large parameter block; 576 / 577: one / two launches
@pytest.mark.parametrize("n_arrays", [1, 2, 8, 9, 100, 576, 577, 5000])
@pytest.mark.parametrize("rule", ["adam", "sgd", "ema"])
def test_many_arrays_odd_sizes(rule, n_arrays):
    hyper = FULL[rule]
    rng = np.random.default_rng(n_arrays)
    sizes = odd_sizes(n_arrays, rng)
    host = initial_state(rule, hyper, sizes, np.float32, rng)
    dev = to_device(host)
    for step in range(1, 4):
        grads = random_grads(sizes, np.float32, rng)
        call(fastoptim, rule, hyper, dev, [cp.asarray(g) for g in grads], step)
        call(fastoptim, rule, hyper, host, grads, step)  # the CPU kernels, bit for bit
    assert_bitwise(to_host(dev), host, f"{n_arrays} arrays")


def carve(buffer, sizes, start):
    """Consecutive slices of one 1-D device buffer, the first at element `start`."""
    out, pos = [], start
    for s in sizes:
        out.append(buffer[pos:pos + s])
        pos += s + 1  # a one-element gap: consecutive slices start at alternating parities
    return out


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n_arrays", [1, 50, 5000])
@pytest.mark.parametrize("shifts", [(1, 1, 1, 1, 1), (2, 2, 2, 2, 2), (1, 2, 3, 0, 1),
                                    (0, 0, 0, 0, 0)])
def test_slices_at_odd_offsets(shifts, n_arrays, dtype):
    """Slices of one big buffer per argument, starting at odd element offsets: the same
    misalignment in every argument (vectorised after a scalar head) or different ones
    (scalar spans)."""
    rule, hyper = "adam", FULL["adam"]
    rng = np.random.default_rng(3)
    sizes = odd_sizes(n_arrays, rng)
    total = sum(sizes) + n_arrays + 8
    names = [first_name(rule), grad_name(rule)] + active_states(rule, hyper)
    host_buffers = {name: rng.uniform(0.5, 1.5, total).astype(dtype) for name in names}
    for name in active_states(rule, hyper):
        host_buffers[name][:] = 0.0
    dev_buffers = {name: cp.asarray(b) for name, b in host_buffers.items()}
    shift = dict(zip(names, shifts))
    dev = {name: carve(dev_buffers[name], sizes, shift[name]) for name in names}
    host = {name: carve(host_buffers[name], sizes, shift[name]) for name in names}
    grads_dev, grads_host = dev.pop(grad_name(rule)), host.pop(grad_name(rule))
    for step in range(1, 3):
        call(fastoptim, rule, hyper, dev, grads_dev, step)
        call(fastoptim, rule, hyper, host, grads_host, step)
    for name in names:  # whole buffers: the gaps between slices were not touched either
        assert cp.asnumpy(dev_buffers[name]).tobytes() == host_buffers[name].tobytes(), name


@needs_gpu
def test_bad_inputs_write_nothing():
    """Errors found after some arrays were checked leave every device array unchanged."""
    rng = np.random.default_rng(4)
    sizes = [7, 4099, 33]
    host = initial_state("adam", FULL["adam"], sizes, np.float32, rng)
    grads = [cp.asarray(g) for g in random_grads(sizes, np.float32, rng)]
    dev = to_device(host)
    before = to_host(dev)

    def attempt(**change):
        state = {name: list(arrays) for name, arrays in dev.items()}
        g = list(grads)
        for name, (index, value) in change.items():
            (g if name == "grads" else state[name])[index] = value
        kwargs = {name: arrays for name, arrays in state.items() if name != "params"}
        fastoptim.adam_(state["params"], g, step=2, **kwargs, **FULL["adam"])

    bad = {
        "host array": dict(max_exp_avg_sqs=(2, np.zeros(33, np.float32))),
        "dtype": dict(exp_avg_sqs=(2, cp.zeros(33, cp.float64))),
        "shape": dict(grads=(2, cp.zeros(34, cp.float32))),
        "strided": dict(exp_avgs=(2, cp.zeros(66, cp.float32)[::2])),
        "overlap": dict(exp_avgs=(2, dev["params"][2])),
    }
    for what, change in bad.items():
        with pytest.raises((TypeError, ValueError)):
            attempt(**change)
        after = to_host(dev)
        for name in before:
            for k, (a, b) in enumerate(zip(after[name], before[name])):
                assert a.tobytes() == b.tobytes(), f"{what}: {name}[{k}] was written"


@needs_gpu
def test_runs_on_the_arrays_stream():
    """Work queued by CuPy on a non-blocking stream (which exports it in the interface) is
    ordered before the update: the update reads the gradients that stream wrote."""
    n = 1 << 22
    rng = np.random.default_rng(5)
    p0 = rng.uniform(-1, 1, n).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        p = cp.asarray(p0)
        g = cp.zeros(n, cp.float32)
        for _ in range(20):  # a long producer on `stream`
            g = cp.sin(g + 1.0)
        expected_g = g
        fastoptim.sgd_(p, g, lr=0.5)
    stream.synchronize()
    want = p0.copy()
    fastoptim.sgd_(want, cp.asnumpy(expected_g), lr=0.5)  # the CPU kernels, bit for bit
    np.testing.assert_array_equal(cp.asnumpy(p), want)


@needs_gpu
def test_many_calls_many_streams():
    """Many calls queued without waiting while the GPU is busy (a large first array), lists of
    changing length around the group size (one or two launches), then calls alternating
    between streams; one check against the CPU kernels at the end."""
    rng = np.random.default_rng(6)
    sizes = [1 << 22] + odd_sizes(700, rng)
    host = initial_state("ema", FULL["ema"], sizes, np.float32, rng)
    dev = to_device(host)
    values = [rng.uniform(-1, 1, s).astype(np.float32) for s in sizes]
    dvalues = [cp.asarray(v) for v in values]
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for k in range(60):
            m = 9 + (k * 37) % 690
            fastoptim.ema_(dev["averages"][:m], dvalues[:m], beta=0.9)
            fastoptim.ema_(host["averages"][:m], values[:m], beta=0.9)
    stream.synchronize()
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(3)]
    for k in range(20):
        m = 9 + 7 * k % 31
        with streams[k % 3]:
            fastoptim.ema_(dev["averages"][:m], dvalues[:m], beta=0.9)
        streams[k % 3].synchronize()  # the arrays are shared between the streams
        fastoptim.ema_(host["averages"][:m], values[:m], beta=0.9)
    assert_bitwise(to_host(dev), host, "after 80 calls")


def _slow_fill(x, value, rounds=30):
    """Queues a slow kernel sequence on the current stream that ends with x[:] = value."""
    tmp = cp.zeros_like(x)
    for _ in range(rounds):
        tmp = cp.sin(tmp + 1.0)
    x[:] = tmp * 0 + value


@needs_gpu
def test_streams_joined_both_ways():
    """Note [stream joins]: params on stream A, grads reported on stream B. Before: the
    update waits for B's producer (a slow fill of the grads). After: work queued on B right
    after the call (zeroing the grads) waits for the update, which must read the filled
    grads. Without either join the result would (very likely) differ."""
    n = 1 << 24
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    p, g = cp.ones(n, cp.float32), cp.zeros(n, cp.float32)
    cp.cuda.Device().synchronize()
    with b:
        _slow_fill(g, 2.0)  # the producer of the grads, on B
    fastoptim.sgd_(_Reported(p, a.ptr), _Reported(g, b.ptr), lr=0.5)  # launched on A
    with b:
        g.fill(0)  # queued on B right after the call
    a.synchronize()
    b.synchronize()
    # 1 - 0.5 * 2: the update read the filled grads (1 - 0.5 * 0 if either join was missing)
    np.testing.assert_array_equal(cp.asnumpy(p[:: n // 64]), np.zeros(64, np.float32))


class _Reported:
    """A device array that reports a given stream in its interface (as CuPy does for its
    current stream at the time of the access)."""

    def __init__(self, array, stream_ptr):
        iface = dict(array.__cuda_array_interface__)
        iface["stream"] = stream_ptr
        self.__cuda_array_interface__ = iface
        self._keep = array


def _capture(stream, fn):
    stream.begin_capture()
    try:
        fn()
    finally:
        graph = stream.end_capture()
    return graph


@needs_gpu
@pytest.mark.parametrize("n_arrays", [3, 9, 1500])  # small block, large block, 3 launches
def test_graph_replays_after_100_other_calls(n_arrays):
    """A captured update replays correctly after 100 other calls (with other arrays and list
    lengths) have run: everything it needs was captured by value."""
    rng = np.random.default_rng(10)
    sizes = odd_sizes(n_arrays, rng)
    hyper = FULL["adam"]
    host = initial_state("adam", hyper, sizes, np.float32, rng)
    grads = random_grads(sizes, np.float32, rng)
    dev = to_device(host)
    dgrads = [cp.asarray(g) for g in grads]
    other = to_device(initial_state("adam", hyper, odd_sizes(700, rng), np.float32, rng))
    other_g = [cp.ones_like(a) for a in other["params"]]
    cp.cuda.Device().synchronize()  # the uploads ran on the null stream, the replays do not
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        graph = _capture(stream, lambda: call(fastoptim, "adam", hyper, dev, dgrads, 4))
        for k in range(100):
            m = 1 + (k * 53) % 700
            part = {name: arrays[:m] for name, arrays in other.items()}
            call(fastoptim, "adam", hyper, part, other_g[:m], 4)
        for _ in range(3):
            graph.launch(stream)
    stream.synchronize()
    for _ in range(3):
        call(fastoptim, "adam", hyper, host, grads, 4)
    assert_bitwise(to_host(dev), host, "3 replays after 100 other calls")


@needs_gpu
def test_capture_refuses_an_uncaptured_stream():
    """grads reported on a stream that is not being captured while params' stream is: a
    RuntimeError naming grads[0], and the capture is still usable (nothing was enqueued)."""
    p, g = cp.ones(1000, cp.float32), cp.ones(1000, cp.float32)
    cp.cuda.Device().synchronize()
    capturing, other = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with capturing:
        capturing.begin_capture()
        try:
            with pytest.raises(RuntimeError, match=r"grads\[0\].*not being captured"):
                fastoptim.sgd_([p], [_Reported(g, other.ptr)], lr=0.5)
            fastoptim.sgd_([p], [g], lr=0.5)
        finally:
            graph = capturing.end_capture()
        graph.launch(capturing)
    capturing.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(p), np.full(1000, 0.5, np.float32))


def _driver():
    import ctypes
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        pytest.skip(f"libcuda.so.1 cannot be loaded: {e}")


@needs_gpu
def test_fresh_thread_keeps_no_context():
    """Note [current device]: a thread that never used CUDA has no current context; after a
    call it still has none (restoring with cudaSetDevice(0) would have created one)."""
    import ctypes
    import threading
    cuda = _driver()
    p, g = cp.ones(4096, cp.float32), cp.ones(4096, cp.float32)
    cp.cuda.Device().synchronize()
    # The interfaces are read here: the worker makes no CUDA call but fastoptim's (and ctypes').
    fp, fg = _Reported(p, 1), _Reported(g, 1)
    seen = {}

    def worker():
        ctx = ctypes.c_void_p()
        seen["rc_before"] = cuda.cuCtxGetCurrent(ctypes.byref(ctx))
        seen["before"] = ctx.value
        fastoptim.sgd_(fp, fg, lr=0.5)
        seen["rc_after"] = cuda.cuCtxGetCurrent(ctypes.byref(ctx))
        seen["after"] = ctx.value

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["rc_before"] == 0 and seen["rc_after"] == 0
    assert seen["before"] is None, "the fresh thread already had a context"
    assert seen["after"] is None, "the call left a current context in the thread"
    cp.cuda.Device().synchronize()
    np.testing.assert_array_equal(cp.asnumpy(p), np.full(4096, 0.5, np.float32))


@needs_gpu
def test_other_device_leaves_current_device():
    """With two GPUs: arrays on device 1 from a thread whose current device is 0 run on
    device 1 and leave device 0 current."""
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        p, g = cp.ones(4096, cp.float32), cp.ones(4096, cp.float32)
        cp.cuda.Device().synchronize()
    with cp.cuda.Device(0):
        fastoptim.sgd_(p, g, lr=0.5)
        assert cp.cuda.runtime.getDevice() == 0
    with cp.cuda.Device(1):
        cp.cuda.Device().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(p), np.full(4096, 0.5, np.float32))


@needs_gpu
def test_torch_cuda_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(7)
    p0, g0 = (rng.uniform(-1, 1, 1001).astype(np.float32) for _ in range(2))
    p, g = torch.tensor(p0, device="cuda"), torch.tensor(g0, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    fastoptim.adam_(p, g, m, v, step=1, lr=0.01)
    torch.cuda.synchronize()
    hp, hm, hv = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    fastoptim.adam_(hp, g0, hm, hv, step=1, lr=0.01)
    assert p.cpu().numpy().tobytes() == hp.tobytes()


@needs_gpu
def test_torch_stream_handshake():
    """torch tensors are read through DLPack (their interface has no stream): under
    torch.cuda.stream(s), the update runs after the work queued on s (a slow producer of the
    grads), by DLPack's stream handshake."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    n = 1 << 24
    p = torch.ones(n, device="cuda")
    g = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tmp = torch.zeros_like(g)
        for _ in range(30):
            tmp = torch.sin(tmp + 1.0)
        g.copy_(tmp * 0 + 2.0)  # the grads are ready only at the end of this on s
        fastoptim.sgd_(p, g, lr=0.5)
    torch.cuda.synchronize()
    assert torch.count_nonzero(p).item() == 0, "the update read the grads before s wrote them"


@needs_gpu
def test_more_than_2_31_elements():
    """One launch over 2^31 + 5 float32 elements (2 x 8 GiB): the elements around 2^31 and at
    the end are updated like the first ones."""
    n = 2**31 + 5
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 2 * 4 * n + (1 << 30):
        pytest.skip(f"needs {2 * 4 * n / 2**30:.0f} GiB of free GPU memory")
    avg = cp.full(n, 1.0, cp.float32)
    val = cp.full(n, 3.0, cp.float32)
    fastoptim.ema_(avg, val, beta=0.5)
    cp.cuda.Device().synchronize()
    for lo in (0, 2**31 - 3, n - 4):
        np.testing.assert_array_equal(cp.asnumpy(avg[lo:lo + 4]), np.full(4, 2.0, np.float32))
    assert int(cp.count_nonzero(avg != 2.0)) == 0
    del avg, val
