"""Storage-format conversions of src/cpp/vec.h (Note [storage formats]), through the test hooks
_core._convert (fp32 -> bfloat16/float16 bits) and _core._widen (bits -> fp32).

What is pinned, on every ISA this machine runs:
  * every one of the 2^32 fp32 bit patterns narrows to the reference bits: bfloat16 as
    ml_dtypes (round to nearest even, NaN -> sign | 0x7FC0); float16 as NumPy's cast for every
    value in the normal f16 range, as exact float64 rounding for the subnormal range, +-inf
    from 65520 up, and for NaN the quieted, truncated payload that vcvtps2ph writes;
  * every ISA gives bitwise the scalar path's bits for all 2^32 inputs (hardware F16C against
    the scalar emulation, NaN payloads included);
  * all 2^16 bfloat16 and float16 patterns widen exactly (ml_dtypes / NumPy; an f16 NaN is
    quieted as vcvtph2ps does);
  * sizes and start offsets that split an array into head, vectors and tail in every way,
    elements not aligned to their size, and FTZ/DAZ set on the calling thread.
"""
import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from fastoptim import _core  # noqa: E402

ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]
SUPPORTED = [isa for isa in ISAS if isa in _core.info()["isas_supported"]]
FORMATS = ["bfloat16", "float16"]
CHUNK = 1 << 24  # fp32 patterns per step of the exhaustive sweep (64 MiB of input)


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in SUPPORTED:
        pytest.skip(f"ISA {request.param} is not supported by this CPU or not compiled in")
    return request.param


def _same(a, b):
    """Bitwise equality of two uint16 arrays, 4 elements per comparison where possible."""
    if a.size % 4 == 0 and a.flags.c_contiguous and b.flags.c_contiguous:
        return bool((a.view(np.uint64) == b.view(np.uint64)).all())
    return np.array_equal(a, b)


def _check(got, want, inputs, what):
    if _same(got, want):
        return
    bad = np.flatnonzero(got != want)
    i = bad[0]
    raise AssertionError(f"{what}: {bad.size} elements differ; first: input {int(inputs[i]):#x} "
                         f"gave {int(got[i]):#x}, expected {int(want[i]):#x}")


def _narrow(u32, fmt, isa):
    out = np.empty(u32.size, np.uint16)
    _core._convert(np.ascontiguousarray(u32).view(np.float32), out, fmt, isa)
    return out


def _widen(u16, fmt, isa):
    out = np.empty(u16.size, np.float32)
    _core._widen(np.ascontiguousarray(u16), out, fmt, isa)
    return out.view(np.uint32)


def _f16_nan_bits(u32):
    """vcvtps2ph on a NaN: sign, quiet bit, the top 9 payload bits kept."""
    return (((u32 >> 16) & 0x8000) | 0x7E00 | ((u32 >> 13) & 0x3FF)).astype(np.uint16)


def _f16_subnormal_bits(u32):
    """|x| < 2^-14 to f16 units of 2^-24, rounded to nearest even in exact float64 arithmetic."""
    mag = np.abs(u32.view(np.float32)).astype(np.float64) * 2.0**24
    return (((u32 >> 16) & 0x8000) | np.rint(mag).astype(np.uint32)).astype(np.uint16)


# fp32 magnitudes (bits without the sign) -> how the f16 reference is computed; the
# boundaries are 2^-25 (and below: a signed zero), 2^-14 (smallest normal f16), 65520 (rounds
# to inf), inf. NumPy's cast raises an underflow flag per subnormal result and takes ~1.5 s
# per 2^24 elements there, hence the float64 oracle for that range.
F16_SEGMENTS = [(0x00000000, 0x33000000, "zero"), (0x33000000, 0x38800000, "subnormal"),
                (0x38800000, 0x477FF000, "numpy"), (0x477FF000, 0x7F800001, "inf"),
                (0x7F800001, 0x80000000, "nan")]


def _f16_reference(u32, first, ref):
    """ref[:] = the f16 bits of the CHUNK consecutive patterns u32 starting at `first`."""
    sign = np.uint16(0x8000 if first & 0x80000000 else 0)
    lo = first & 0x7FFFFFFF
    for a, b, kind in F16_SEGMENTS:
        s = slice(max(a, lo) - lo, max(min(b, lo + u32.size), lo) - lo)
        if s.start >= s.stop:
            continue
        if kind == "zero":
            ref[s] = sign
        elif kind == "subnormal":
            ref[s] = _f16_subnormal_bits(u32[s])
        elif kind == "numpy":
            ref[s].view(np.float16)[...] = u32[s].view(np.float32)
        elif kind == "inf":
            ref[s] = sign | 0x7C00
        else:
            ref[s] = _f16_nan_bits(u32[s])


@pytest.mark.parametrize("fmt", FORMATS)
def test_narrow_every_fp32_pattern(fmt):
    base = np.arange(CHUNK, dtype=np.uint32)
    u32 = np.empty_like(base)
    ref = np.empty(CHUNK, np.uint16)
    got = {isa: np.empty(CHUNK, np.uint16) for isa in SUPPORTED}
    for first in range(0, 1 << 32, CHUNK):
        np.add(base, np.uint32(first), out=u32)
        for isa in SUPPORTED:
            _core._convert(u32.view(np.float32), got[isa], fmt, isa)
        with np.errstate(all="ignore"):
            if fmt == "bfloat16":
                ref.view(ml_dtypes.bfloat16)[...] = u32.view(np.float32)
            else:
                _f16_reference(u32, first, ref)
        _check(got["scalar"], ref, u32, f"scalar {fmt}, patterns from {first:#010x}")
        for isa in SUPPORTED[1:]:
            _check(got[isa], got["scalar"], u32, f"{isa} vs scalar {fmt}, from {first:#010x}")


# Low halves that meet every rounding case of both formats under every high half: exact,
# just below / at / just above a bf16 tie (bit 15), an f16 tie (bit 12) with and without sticky
# bits, all ones, and random ones.
LOW_HALVES = np.array([0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x7FFF, 0x8000,
                       0x8001, 0x9000, 0xEFFF, 0xF000, 0xF001, 0xFFFF]
                      + list(np.random.default_rng(0).integers(0, 1 << 16, 17)), np.uint32)


def _every_high_half():
    return ((np.arange(1 << 16, dtype=np.uint32)[:, None] << 16) | LOW_HALVES).ravel()


def test_narrow_bfloat16_policy_against_ml_dtypes(isa):
    u32 = _every_high_half()
    got = _narrow(u32, "bfloat16", isa)
    with np.errstate(all="ignore"):
        want = u32.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    _check(got, want, u32, f"{isa} bfloat16 vs ml_dtypes")
    nan = np.isnan(u32.view(np.float32))
    assert (got[nan] == (((u32[nan] >> 16) & 0x8000) | 0x7FC0)).all()  # canonical quiet NaN
    tiny = (u32 & 0x7F800000) == 0  # fp32 subnormals are rounded, never flushed
    assert (got[tiny] & 0x7FFF).any()


def test_narrow_float16_against_numpy(isa):
    u32 = _every_high_half()
    got = _narrow(u32, "float16", isa)
    with np.errstate(all="ignore"):
        want = u32.view(np.float32).astype(np.float16)
    nan = np.isnan(u32.view(np.float32))
    _check(got[~nan], want.view(np.uint16)[~nan], u32[~nan], f"{isa} float16 vs numpy")
    # NaN: a NaN for NumPy too, but NumPy keeps a signalling NaN signalling (0x7F800001 ->
    # 0x7C01); every ISA writes what vcvtps2ph writes.
    assert np.isnan(want[nan]).all()
    _check(got[nan], _f16_nan_bits(u32[nan]), u32[nan], f"{isa} float16 NaN")
    subnormal = (u32 & 0x7FFFFFFF) < 0x38800000
    _check(got[subnormal], _f16_subnormal_bits(u32[subnormal]), u32[subnormal],
           f"{isa} float16 subnormal vs float64 rounding")


def test_widen_every_bfloat16_pattern(isa):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _widen(h, "bfloat16", isa)
    _check(got.view(np.uint16)[1::2], h, h, f"{isa} bfloat16 widen, high half")
    assert not got.view(np.uint16)[0::2].any()  # exactly bits << 16, NaNs included
    _check(got.view(np.uint16), h.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint16),
           np.repeat(h, 2), f"{isa} bfloat16 widen vs ml_dtypes")
    _check(got.view(np.uint16), _widen(h, "bfloat16", "scalar").view(np.uint16),
           np.repeat(h, 2), f"{isa} vs scalar")


def test_widen_every_float16_pattern(isa):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _widen(h, "float16", isa)
    want = h.view(np.float16).astype(np.float32).view(np.uint32)
    nan = np.isnan(h.view(np.float16))
    assert (got[~nan] == want[~nan]).all(), f"{isa} float16 widen vs numpy"
    # NaN: vcvtph2ps sets the quiet bit and keeps the payload; NumPy does not quiet.
    h32 = h[nan].astype(np.uint32)
    assert (got[nan] == (((h32 & 0x8000) << 16) | 0x7FC00000 | ((h32 & 0x3FF) << 13))).all()
    assert (got[nan] == (want[nan] | 0x00400000)).all()
    assert (got == _widen(h, "float16", "scalar")).all(), f"{isa} vs scalar"


def _pool(n, seed):
    """n fp32 patterns: random bits mixed with ties, subnormals, overflow and NaN payloads."""
    specials = np.array([0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x33000000, 0x33000001,
                         0x387FF000, 0x38800000, 0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000,
                         0x477FEFFF, 0x477FF000, 0x7F7F7FFF, 0x7F7F8000, 0x7F800000, 0xFF800000,
                         0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0xFFC12345, 0x7FFFFFFF], np.uint32)
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    pick = rng.random(n) < 0.5
    out[pick] = rng.choice(specials, int(pick.sum()))
    return out


SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 33, 4099]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", SIZES)
def test_head_vectors_tail_split(isa, fmt, size):
    """Every start offset (in elements) against the scalar path, with guards around dst."""
    u32 = _pool(size + 40, seed=size)
    want = _narrow(u32, fmt, "scalar")
    want_wide = _widen(want, fmt, "scalar")
    for offset in range(0, 18):
        src = np.empty(size + 40, np.uint32)
        src[offset:offset + size] = u32[:size]
        dst = np.full(size + 40, 0xABCD, np.uint16)
        _core._convert(src[offset:offset + size].view(np.float32), dst[offset + 3:offset + 3 + size],
                       fmt, isa)
        _check(dst[offset + 3:offset + 3 + size], want[:size], u32, f"{isa} {fmt} offset {offset}")
        assert (dst[:offset + 3] == 0xABCD).all() and (dst[offset + 3 + size:] == 0xABCD).all()
        wide = np.full(size + 40, 0xDEADBEEF, np.uint32)
        _core._widen(dst[offset + 3:offset + 3 + size], wide[offset:offset + size].view(np.float32),
                     fmt, isa)
        assert (wide[offset:offset + size] == want_wide[:size]).all(), f"{isa} {fmt} offset {offset}"
        assert (wide[:offset] == 0xDEADBEEF).all() and (wide[offset + size:] == 0xDEADBEEF).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_unaligned_elements(isa, fmt):
    """Arrays whose elements are not aligned to their itemsize (odd byte offset)."""
    n = 37
    u32 = _pool(n, seed=7)
    raw = bytearray(4 * n + 1)
    src = np.frombuffer(raw, np.float32, n, offset=1)
    src.view(np.uint32)[...] = u32  # frombuffer over a bytearray is writeable
    raw16 = bytearray(2 * n + 1)
    dst = np.frombuffer(raw16, np.uint16, n, offset=1)
    assert not src.flags.aligned and not dst.flags.aligned
    _core._convert(src, dst, fmt, isa)
    _check(dst, _narrow(u32, fmt, "scalar"), u32, f"{isa} {fmt} unaligned")
    raw_w = bytearray(4 * n + 1)
    wide = np.frombuffer(raw_w, np.float32, n, offset=1)
    _core._widen(dst, wide, fmt, isa)
    assert (wide.view(np.uint32) == _widen(dst.copy(), fmt, "scalar")).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_flush_to_zero_mode_changes_nothing(isa, fmt):
    """FTZ/DAZ set on this thread (torch.set_flush_denormal) leave every conversion as it was:
    subnormals of both directions are converted exactly / rounded, never flushed."""
    torch = pytest.importorskip("torch")
    u32 = _every_high_half()
    u32 = u32[(u32 & 0x7F800000) < 0x39000000]  # fp32 subnormals and the f16 subnormal range
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want, want_wide = _narrow(u32, fmt, isa), _widen(h, fmt, isa)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got, got_wide = _narrow(u32, fmt, isa), _widen(h, fmt, isa)
    finally:
        torch.set_flush_denormal(False)
    _check(got, want, u32, f"{isa} {fmt} with FTZ/DAZ")
    assert (got_wide == want_wide).all(), f"{isa} {fmt} widen with FTZ/DAZ"


def test_hook_rejects_bad_arguments():
    f = np.zeros(4, np.float32)
    h = np.zeros(4, np.uint16)
    with pytest.raises(TypeError, match="src must be a C-contiguous float32"):
        _core._convert(np.zeros(4), h, "bfloat16", "scalar")
    with pytest.raises(TypeError, match="dst must be a C-contiguous float32"):
        _core._widen(h, np.zeros(4, np.float64), "float16", "scalar")
    with pytest.raises(TypeError, match="src must be an ndarray"):
        _core._convert([0.0] * 4, h, "bfloat16", "scalar")
    with pytest.raises(TypeError, match="C-contiguous"):
        _core._convert(np.zeros(8, np.float32)[::2], h, "bfloat16", "scalar")
    with pytest.raises(ValueError, match="of src's size"):
        _core._convert(f, np.zeros(5, np.uint16), "bfloat16", "scalar")
    h.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core._convert(f, h, "bfloat16", "scalar")
    with pytest.raises(ValueError, match="fmt must be 'bfloat16' or 'float16', got 'fp8'"):
        _core._convert(f, np.zeros(4, np.uint16), "fp8", "scalar")
    with pytest.raises(ValueError, match="unknown ISA 'neon'"):
        _core._convert(f, np.zeros(4, np.uint16), "float16", "neon")
    for isa in set(ISAS) - set(SUPPORTED):
        with pytest.raises(ValueError, match=isa):
            _core._convert(f, np.zeros(4, np.uint16), "float16", isa)


@pytest.mark.parametrize("index0", [0, 5, 2**32 - 21, 2**33 - 3, 2**40 + 7, 2**48 - 100])
def test_stochastic_rounding_store_matches_reference_across_index_carries(isa, index0):
    """vstore_sr's random bits are sr_hash of each element's 64-bit index (vec.h, Note
    [stochastic rounding]); the vector stores compute it per vector from the first lane's
    index, so a vector whose low index halves wrap past a multiple of 2^32 must carry into the
    high half in exactly the wrapped lanes (Note [sr_hash strength reduction]). Every head
    length, infinities and NaN included."""
    from fastoptim import reference
    rng = np.random.default_rng(index0 % 997)
    x = (rng.standard_normal(300) * 1e3).astype(np.float32)
    x[[3, 40, 77]] = [np.inf, -np.inf, np.nan]
    key = 0x9E37F00D
    for offset in range(17):
        src = x[offset:offset + 250]
        got = np.empty(src.size, np.uint16)
        _core._convert(src, got, "bfloat16", isa, sr_key=key, sr_index=index0)
        want = reference.round_bf16_stochastic(src, key, index0)
        _check(got, want, src.view(np.uint32), f"{isa} offset {offset} index {index0}")
    # the random bits matter: round to nearest differs from these stores somewhere
    assert not _same(got, _narrow(src.view(np.uint32), "bfloat16", isa))


def test_stochastic_rounding_hook_refuses_float16():
    src = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="sr_key needs fmt='bfloat16'"):
        _core._convert(src, np.empty(4, np.uint16), "float16", "scalar", sr_key=1)


@pytest.mark.parametrize("index0", [0, 2**32 - 4000])
def test_stochastic_rounding_store_on_every_kind_of_pattern(isa, index0):
    """The vector stores branch per vector: finite lanes only (x + r) >> 16, and a vector with
    an inf or NaN lane rounds those lanes to nearest (Note [sr_hash strength reduction]).
    Patterns from _pool (random bits, half of them specials: ties, subnormals, the largest
    finite values, which may round up to inf, infinities, NaN payloads) at every vector
    position, against the reference, and a pool with no specials at all."""
    from fastoptim import reference
    for u32 in (_pool(4099, seed=11), np.random.default_rng(3).integers(
            0, 0x7F7FFFFF, 4099, dtype=np.uint64).astype(np.uint32)):
        src = u32.view(np.float32)
        got = np.empty(src.size, np.uint16)
        _core._convert(src, got, "bfloat16", isa, sr_key=0x1234567, sr_index=index0)
        with np.errstate(all="ignore"):
            want = reference.round_bf16_stochastic(src, 0x1234567, index0)
        _check(got, want, u32, f"{isa} index {index0}")
