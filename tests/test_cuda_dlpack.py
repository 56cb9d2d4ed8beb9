"""DLPack input (Note [DLPack input] in src/cpp/bindings.cpp), on the CPU.

Fake DLPack producers build a real 'dltensor' capsule (ctypes) around FAKE device pointers,
and record the ``stream`` that fastoptim passes to ``__dlpack__`` (DLPack's stream
handshake). Every check runs before the first CUDA call, so these tests run on any build with
the CUDA backend compiled in, GPU or not; the pointers are never dereferenced. On a GPU,
tests/test_cuda.py runs torch tensors (read through DLPack) for real.
"""

import ctypes
import math

import numpy as np
import pytest

import fastoptim
from fastoptim import _core

CUDA = _core.info()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA["built"], reason="fastoptim was built without CUDA")

PASSED_CHECKS = r"(?i:no CUDA device|not CUDA device memory|cudaError)"
KDLCPU, KDLCUDA, KDLCUDAHOST, KDLCUDAMANAGED = 1, 2, 3, 13


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeDLPack:
    """A DLPack producer with no memory behind it (no __cuda_array_interface__)."""

    _next = 0x7A00_0000_0000

    def __init__(self, shape, *, code=2, bits=32, device=(KDLCUDA, 0), strides=None,
                 byte_offset=0, ptr=None, capsule_device=None):
        size = math.prod(shape)
        if ptr is None:
            ptr = FakeDLPack._next
            FakeDLPack._next += (size * 8 + 4095) // 4096 * 4096 + 4096
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        self.device = device
        self.managed = DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = ptr
        t.device = DLDevice(*(capsule_device or device))
        t.ndim = len(shape)
        t.dtype = DLDataType(code, bits, 1)
        t.shape = self.shape
        t.strides = self.strides if strides is not None else None
        t.byte_offset = byte_offset
        self.streams = []  # the `stream` of every __dlpack__ call

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return _new_capsule(ctypes.addressof(self.managed), b"dltensor", None)


class FakeCAI:
    def __init__(self, shape, stream=None, ptr=None, typestr="<f4"):
        ptr = ptr or FakeDLPack._next
        FakeDLPack._next += (math.prod(shape) * 8 + 4095) // 4096 * 4096 + 4096
        self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=typestr, data=(ptr, False),
                                             version=3, strides=None, stream=stream)


def _listed(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def sgd(params, grads, momentum_buffers=None, guard="<f4", **kw):
    """fastoptim.sgd_ with one more tensor in each list: a CUDA Array Interface fake, whose
    pointer the driver is asked about. DLPack names its arrays' device, so a call of DLPack
    fakes alone would pass every check and LAUNCH on a GPU machine; the guard makes it stop at
    'not CUDA device memory' there (and at 'no CUDA device' without a GPU)."""
    kw.setdefault("lr", 0.1)
    params, grads = _listed(params) + [FakeCAI((1,), typestr=guard)], _listed(grads) + [FakeCAI((1,), typestr=guard)]
    if momentum_buffers is not None:
        kw.setdefault("momentum", 0.9)
        kw.setdefault("step", 2)
        momentum_buffers = _listed(momentum_buffers) + [FakeCAI((1,), typestr=guard)]
    fastoptim.sgd_(params, grads, momentum_buffers=momentum_buffers, **kw)


def passes(fn):
    with pytest.raises((RuntimeError, ValueError), match=PASSED_CHECKS):
        fn()


def test_dlpack_arrays_pass_validation():
    p, g, m = ([FakeDLPack((4, 5)) for _ in range(3)] for _ in range(3))
    passes(lambda: sgd(p, g, m))


def test_handshake_uses_the_legacy_stream_without_a_launch_stream():
    """params[0] reports no stream: the launch is on the legacy default stream (1), and every
    DLPack producer is asked to order its work before it."""
    p, g = [FakeDLPack((7,)) for _ in range(2)], [FakeDLPack((7,)) for _ in range(2)]
    passes(lambda: sgd(p, g))
    assert [a.streams for a in p + g] == [[1]] * 4


def test_handshake_uses_params0_stream():
    """params[0] is a CUDA Array Interface array on stream S: the DLPack arrays are exported
    for S."""
    s = 0x5555_0000
    p = [FakeCAI((7,), stream=s), FakeDLPack((7,))]
    g = [FakeDLPack((7,)), FakeDLPack((7,))]
    passes(lambda: sgd(p, g))
    assert [a.streams for a in p[1:] + g] == [[s]] * 3


def test_stream_less_interface_with_dlpack_goes_through_dlpack():
    """torch's case: an interface without 'stream' (v2) plus DLPack: read through DLPack, so
    the producer gets the handshake."""

    class Both(FakeDLPack):
        def __init__(self, shape):
            super().__init__(shape)
            self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr="<f4",
                                                 data=(0x10, False), version=2)

    p, g = Both((3,)), Both((3,))
    passes(lambda: sgd(p, g))
    assert p.streams == [1] and g.streams == [1]


def test_interface_with_stream_is_preferred():
    class Both(FakeDLPack):
        def __init__(self, shape):
            super().__init__(shape)
            self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr="<f4",
                                                 data=(self.managed.dl_tensor.data, False),
                                                 version=3, stream=None)

    p, g = Both((3,)), Both((3,))
    passes(lambda: sgd(p, g))
    assert p.streams == [] and g.streams == []


@pytest.mark.parametrize("code,bits,name", [(0, 32, "int32"), (5, 64, "complex64"),
                                            (2, 8, "float8")])
def test_dtype(code, bits, name):
    g = FakeDLPack((4,), code=code, bits=bits)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype " + name + ".*float32, float64, "
                                        "float16 and bfloat16 on CUDA"):
        sgd(FakeDLPack((4,)), g)


def test_16_bit_dtypes():
    """float16 (kDLFloat, 16 bits) and bfloat16 (kDLBfloat, 16 bits) are the 16-bit formats'
    element types: float16 arrays pass every check (a float16 guard), bfloat16 ones are
    named so in the one-dtype-per-role message (no CUDA Array Interface typestr names it)."""
    passes(lambda: sgd(FakeDLPack((4,), bits=16), FakeDLPack((4,), bits=16), guard="<f2"))
    with pytest.raises(TypeError, match=r"params\[1\] has dtype float32 but params\[0\] has "
                                        r"dtype bfloat16"):
        sgd(FakeDLPack((4,), code=4, bits=16), FakeDLPack((4,), code=4, bits=16))


def test_float64_and_mixed_dtypes():
    passes(lambda: sgd(FakeDLPack((4,), bits=64), FakeDLPack((4,), bits=64), guard="<f8"))
    # each role shares one dtype (the guard's float32 grad beside a float64 one; a role of
    # one dtype outside the format table: tests/test_cuda.py's test_mixed_dtypes)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float32 but grads\[0\] has dtype "
                                        r"float64; all grads of one call share one dtype"):
        sgd(FakeDLPack((4,)), FakeDLPack((4,), bits=64))


def test_shape_and_strides():
    with pytest.raises(ValueError, match=r"grads.*shape"):
        sgd(FakeDLPack((4, 5)), FakeDLPack((5, 4)))
    # strides are in elements in DLPack: (5, 1) is C order for (4, 5)
    passes(lambda: sgd(FakeDLPack((4, 5), strides=(5, 1)), FakeDLPack((4, 5))))
    with pytest.raises(ValueError, match=r"params.*contiguous"):
        sgd(FakeDLPack((4, 5), strides=(1, 4)), FakeDLPack((4, 5)))


def test_byte_offset_counts_in_alignment_and_overlap():
    base = FakeDLPack._next
    FakeDLPack._next += 1 << 20
    with pytest.raises(ValueError, match=r"params.*aligned"):
        sgd(FakeDLPack((4,), ptr=base, byte_offset=2), FakeDLPack((4,)))
    p = FakeDLPack((4,), ptr=base)
    m = FakeDLPack((4,), ptr=base, byte_offset=8)  # overlaps params
    with pytest.raises(ValueError, match=r"overlaps"):
        sgd(p, FakeDLPack((4,)), m)


def test_devices():
    with pytest.raises(ValueError, match=r"grads.*pinned host memory"):
        sgd(FakeDLPack((4,)), FakeDLPack((4,), device=(KDLCUDAHOST, 0)))
    with pytest.raises(TypeError, match=r"grads.*DLPack array on the CPU.*numpy"):
        sgd(FakeDLPack((4,)), FakeDLPack((4,), device=(KDLCPU, 0)))
    passes(lambda: sgd(FakeDLPack((4,)), FakeDLPack((4,), device=(KDLCUDAMANAGED, 0))))
    with pytest.raises(TypeError, match=r"grads.*invalid DLPack.*device"):
        sgd(FakeDLPack((4,)), FakeDLPack((4,), capsule_device=(KDLCUDA, 1)))


def test_dlpack_devices_must_agree():
    """DLPack names the device: two devices in one call are refused before any CUDA call
    other than the device count."""
    if CUDA["device_count"] == 0:
        pytest.skip("without a device the call stops at the device check first")
    with pytest.raises(ValueError, match=r"grads.*device 1.*params.*device 0"):
        fastoptim.sgd_(FakeDLPack((4,)), FakeDLPack((4,), device=(KDLCUDA, 1)), lr=0.1)


def test_host_and_dlpack_mixed():
    with pytest.raises(TypeError, match=r"grads.*CUDA device array.*params.*numpy"):
        fastoptim.sgd_(np.zeros(4, np.float32), FakeDLPack((4,)), lr=0.1)
    with pytest.raises(TypeError, match=r"grads.*numpy.*params.*CUDA"):
        fastoptim.sgd_(FakeDLPack((4,)), np.zeros(4, np.float32), lr=0.1)


def test_bad_exports():
    class NoCapsule(FakeDLPack):
        def __dlpack__(self, stream=None):
            return object()

    class BadDevice(FakeDLPack):
        def __dlpack_device__(self):
            return "cuda"

    with pytest.raises(TypeError, match=r"grads.*invalid DLPack.*capsule"):
        sgd(FakeDLPack((4,)), NoCapsule((4,)))
    with pytest.raises(TypeError, match=r"grads.*invalid DLPack.*__dlpack_device__"):
        sgd(FakeDLPack((4,)), BadDevice((4,)))


def test_device_arrays_larger_than_the_address_space_are_refused():
    """A CUDA Array Interface or DLPack shape whose bytes pass the end of the address space (a
    producer's claim) made a span that wrapped, which the overlap check missed; the element
    count overflowed int64 first for (2^62, 4). Refused by name (stop 38); an empty array with
    a huge other dimension is still an empty array."""
    top = 2**64 - 2**20  # a pointer near the top of the address space
    free = FakeDLPack._next  # FakeCAI moves it past its (claimed) size
    huge = [FakeCAI((2**62, 4), ptr=free), FakeCAI((2**20,), ptr=top), FakeDLPack((2**62, 4)),
            FakeDLPack((2**20,), ptr=top)]
    empty = FakeCAI((2**62, 0), ptr=free)
    FakeDLPack._next = free
    for grads in huge:
        with pytest.raises(ValueError, match=r"grads\[0\] has shape \(.*\) at data pointer \d+, "
                                             r"more bytes than the address space holds"):
            sgd(FakeDLPack((2**20,)), grads)
    passes(lambda: sgd(FakeDLPack((2**62, 0)), empty))


@pytest.mark.parametrize("device", ["cuda", (2.0, 0), (KDLCUDA, "0"), (True, 0), (KDLCUDA, -1),
                                    (KDLCUDA, 2**40)])
def test_dlpack_device_must_be_two_small_ints(device):
    """__dlpack_device__() returning a tuple of non-ints (or out of range) gave pybind11's
    'Unable to cast' naming nothing (stop 38): an error naming the array and the value."""
    class BadDevice(FakeDLPack):
        def __dlpack_device__(self):
            return device

    with pytest.raises(TypeError, match=r"grads\[0\] has an invalid DLPack export: "
                                        r"__dlpack_device__\(\) must return \(device_type, device_id\)"):
        sgd(FakeDLPack((4,)), BadDevice((4,)))


def test_dlpack_stride_overflowing_in_bytes_is_refused():
    """A DLPack stride (in elements) whose byte count overflows int64 was multiplied unchecked
    (signed overflow); refused by name (stop 38)."""
    with pytest.raises(TypeError, match=r"grads\[0\] has an invalid DLPack export: stride "
                                        r"4611686018427387904 overflows in bytes"):
        sgd(FakeDLPack((2, 2)), FakeDLPack((2, 2), strides=(2**62, 1)))
