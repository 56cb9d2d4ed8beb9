"""_core.stream_bytes, the benchmarks' byte ceiling (kernel_api.h and kernels.h, Note [byte
ceiling]): any mix of streams read, written or both, in place, on every ISA and thread count,
in every loop shape; a stream read (alone or with its write) keeps every bit, a write-only
stream is zeroed, and bad arguments are refused by name before anything is written."""
import ml_dtypes
import numpy as np
import pytest

import fastoptim
from fastoptim import _core

BLOCK = 128  # elements per block (kByteBlock)
ISAS = ("scalar", "avx2", "avx512", "avx512bf16")


def usable_isas():
    info = fastoptim.backend_info()
    return [i for i in ISAS if i in info["isas_supported"] and i in info["isas_compiled"]]


@pytest.fixture
def backend():
    """Restores the ISA and thread count a test changes."""
    saved = fastoptim.backend_info()["isa"], fastoptim.get_num_threads()
    yield
    fastoptim.set_isa(saved[0])
    fastoptim.set_num_threads(saved[1])


def random_bits(rng, n, dtype):
    """n elements of `dtype` with random bit patterns (NaN payloads, -0.0 and subnormals of the
    float types included)."""
    itemsize = np.dtype(dtype).itemsize
    return rng.integers(0, 256, n * itemsize, dtype=np.uint8).view(dtype)


def streams_of(rng, n):
    """One stream of every element width the benchmarks pass, with its mode: fp32 and bf16
    read and written, fp16 and int8 codes read, int4 codes (n / 2 bytes) read and written, a
    float64 stream and a bf16 copy written only."""
    return [
        (random_bits(rng, n, np.float32), "rw"),
        (random_bits(rng, n, ml_dtypes.bfloat16), "rw"),
        (random_bits(rng, n, np.float16), "r"),
        (random_bits(rng, n, np.uint8), "r"),
        (random_bits(rng, n // 2, np.uint8), "rw"),
        (random_bits(rng, n, np.float64), "w"),
        (random_bits(rng, n, ml_dtypes.bfloat16), "w"),
    ]


@pytest.mark.parametrize("shape", [(0, 1), (256, 1), (0, 8), (64, 3), (0, 1024)])
@pytest.mark.parametrize("threads", [1, 2])
def test_reads_keep_every_bit_and_writes_zero(backend, shape, threads):
    """2^18 + 5 blocks' worth minus a few: several chunks for two threads, a run that does not
    divide a chunk (3), runs longer than a chunk (1024); every ISA."""
    n = (2**11 + 5) * BLOCK
    fastoptim.set_num_threads(threads)
    for isa in usable_isas():
        fastoptim.set_isa(isa)
        rng = np.random.default_rng([threads, *shape, ISAS.index(isa)])
        streams = streams_of(rng, n)
        before = [a.view(np.uint8).copy() for a, _ in streams]
        _core.stream_bytes([a for a, _ in streams], [m for _, m in streams], n, *shape)
        for k, ((a, mode), b) in enumerate(zip(streams, before)):
            got = a.view(np.uint8)
            if mode == "w":
                assert not got.any(), (isa, k)
            else:
                np.testing.assert_array_equal(got, b, err_msg=f"{isa} stream {k} ({mode})")


def test_views_and_one_block(backend):
    """A C-contiguous 2-D array and a view into a larger buffer are streams like any other;
    one block (128 elements) is the smallest call."""
    buf = np.arange(4 * BLOCK, dtype=np.float32)
    view = buf[BLOCK:2 * BLOCK]
    grid = np.ones((4, BLOCK // 4), np.float32)
    copy = np.full(BLOCK, 7, np.int16)
    _core.stream_bytes([view, grid, copy], ["rw", "r", "w"], BLOCK)
    np.testing.assert_array_equal(buf, np.arange(4 * BLOCK, dtype=np.float32))
    assert not copy.any()


def good_call():
    n = 2 * BLOCK
    return [np.zeros(n, np.float32), np.zeros(n, np.float32)], ["rw", "r"], n


@pytest.mark.parametrize("change, error, match", [
    (lambda s, m, n: (s, m, n + 1), ValueError, r"elements must be a positive multiple of 128"),
    (lambda s, m, n: (s, m, 0), ValueError, r"elements must be a positive multiple of 128"),
    (lambda s, m, n: (s, m, -BLOCK), ValueError, r"elements must be a positive multiple"),
    (lambda s, m, n: (s, m, 2**70), ValueError, r"elements must be a positive multiple"),
    (lambda s, m, n: (s, m, True), TypeError, r"elements must be an int, got bool"),
    (lambda s, m, n: (s, m, 256.0), TypeError, r"elements must be an int, got float"),
    (lambda s, m, n: ([], [], n), ValueError, r"streams must hold 1 to 8 arrays, got 0"),
    (lambda s, m, n: ([np.zeros(n, np.float32) for _ in range(9)], ["r"] * 9, n), ValueError,
     r"streams must hold 1 to 8 arrays, got 9"),
    (lambda s, m, n: (s, m[:1], n), ValueError, r"modes must hold one mode per stream \(2\), got 1"),
    (lambda s, m, n: (s, ["rw", "x"], n), ValueError,
     r"modes\[1\] must be 'r', 'w' or 'rw', got 'x'"),
    (lambda s, m, n: (s, ["rw", 1], n), ValueError, r"modes\[1\] must be 'r', 'w' or 'rw', got 1"),
    (lambda s, m, n: ([s[0], [0.0] * n], m, n), TypeError,
     r"streams\[1\] must be a numpy.ndarray, got list"),
    (lambda s, m, n: ([s[0], np.zeros(2 * n, np.float32)[::2]], m, n), ValueError,
     r"streams\[1\] must be C-contiguous"),
    (lambda s, m, n: ([s[0], np.zeros(n + 16, np.float32)], m, n), ValueError,
     r"streams\[1\] has 1088 bytes, not a positive multiple of 64 bytes per block of 128"),
    (lambda s, m, n: ([s[0], np.zeros(n // 4, np.uint8)], m, n), ValueError,
     r"streams\[1\] has 64 bytes, not a positive multiple of 64 bytes per block"),
    (lambda s, m, n: ([s[0], np.zeros(0, np.float32)], m, n), ValueError,
     r"streams\[1\] has 0 bytes"),
    (lambda s, m, n: ([s[0], s[0]], m, n), ValueError, r"streams\[1\] overlaps streams\[0\]"),
    (lambda s, m, n: ([s[0], s[0]], ["r", "r"], n), None, None),  # reading twice is fine
])
def test_bad_arguments_are_refused_by_name(change, error, match):
    streams, modes, n = change(*good_call())
    marker = [a.copy() for a in streams if isinstance(a, np.ndarray)]
    if error is None:
        _core.stream_bytes(streams, modes, n)
        return
    with pytest.raises(error, match=f"^stream_bytes: {match}"):
        _core.stream_bytes(streams, modes, n)
    for a, b in zip([a for a in streams if isinstance(a, np.ndarray)], marker):
        np.testing.assert_array_equal(a, b)


def test_read_only_arrays_may_only_be_read():
    streams, modes, n = good_call()
    streams[1].flags.writeable = False
    _core.stream_bytes(streams, modes, n)  # read: fine
    with pytest.raises(ValueError, match=r"^stream_bytes: streams\[1\] is read-only"):
        _core.stream_bytes(streams, ["rw", "w"], n)


@pytest.mark.parametrize("kw, match", [
    (dict(prefetch_ahead=-1), r"prefetch_ahead must be in 0\.\.65536, got -1"),
    (dict(prefetch_ahead=2**16 + 1), r"prefetch_ahead must be in 0\.\.65536, got 65537"),
    (dict(run=0), r"run must be in 1\.\.1024, got 0"),
    (dict(run=1025), r"run must be in 1\.\.1024, got 1025"),
])
def test_loop_shape_is_checked(kw, match):
    streams, modes, n = good_call()
    streams[0][:] = 3
    with pytest.raises(ValueError, match=f"^stream_bytes: {match}"):
        _core.stream_bytes(streams, modes, n, **kw)
    assert (streams[0] == 3).all()
