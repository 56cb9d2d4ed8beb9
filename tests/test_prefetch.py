"""The software prefetch distance (Note [software prefetch], src/cpp/kernels.h) is a tuning
knob only: every distance, none and the default (None) included, writes the same bits, in every storage format and
the quantized-state driver, on one thread and on two. _core._set_prefetch_ahead validates its
argument and returns the previous setting."""

import ml_dtypes
import numpy as np
import pytest

import fastoptim
from fastoptim import _core

BF16 = ml_dtypes.bfloat16
DISTANCES = [None, 0, 1, 7, 64, 256, 512, 1000, 65536]
N = 2**16 + 4096 + 37  # two threads' chunks, several vector bodies, an unaligned head and a tail


@pytest.fixture(autouse=True)
def restore_distance():
    previous = _core._set_prefetch_ahead(None)
    yield
    _core._set_prefetch_ahead(previous)


def _case(name, rng):
    """(step function, the arrays it writes) for one format on fresh arrays."""
    def arr(dtype, scale=1.0, positive=False):
        x = rng.standard_normal(N) * scale
        return (np.abs(x) if positive else x).astype(np.float32).astype(dtype)[1:]  # offset
    kw = dict(step=3, lr=1e-3, weight_decay=0.01)
    if name == "fp32":
        p, g, m, v = arr(np.float32), arr(np.float32, 1e-2), arr(np.float32, 1e-3), arr(np.float32, 1e-5, True)
        return (lambda: fastoptim.adamw_(p, g, m, v, **kw)), (p, m, v)
    if name in ("bf16", "bf16 sr", "bf16 kahan"):
        p, g, m, v = arr(BF16), arr(BF16, 1e-2), arr(BF16, 1e-3), arr(BF16, 1e-5, True)
        extra = {}
        written = (p, m, v)
        if name == "bf16 sr":
            extra = dict(stochastic_rounding=(7, 3))
        if name == "bf16 kahan":
            c = arr(BF16, 1e-4)
            extra = dict(compensation=c)
            written = (p, m, v, c)
        return (lambda: fastoptim.adamw_(p, g, m, v, **kw, **extra)), written
    if name == "fp16":
        p, g, m, v = (arr(np.float16), arr(np.float16, 1e-2), arr(np.float16, 1e-3),
                      arr(np.float16, 1e-3, True))
        return (lambda: fastoptim.adamw_(p, g, m, v, **kw)), (p, m, v)
    if name == "f32 master + bf16 copy":
        p, g, m, v = arr(np.float32), arr(BF16, 1e-2), arr(np.float32, 1e-3), arr(np.float32, 1e-5, True)
        copy = np.zeros_like(g)
        return (lambda: fastoptim.adamw_(p, g, m, v, **kw, param_copies=copy)), (p, m, v, copy)
    if name in ("int8", "int4"):
        p, g = arr(np.float32), arr(np.float32, 1e-2)
        opt = fastoptim.AdamW([p], lr=1e-3, state_dtype=name)
        opt.step([g])
        return (lambda: opt.step([g])), (p,)
    raise AssertionError(name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["fp32", "bf16", "bf16 sr", "bf16 kahan", "fp16",
                                  "f32 master + bf16 copy", "int8", "int4"])
def test_every_distance_writes_the_same_bits(name, threads):
    saved = fastoptim.get_num_threads()
    fastoptim.set_num_threads(threads)
    try:
        results = []
        for d in DISTANCES:
            step, written = _case(name, np.random.default_rng(0))
            _core._set_prefetch_ahead(d)
            for _ in range(3):
                step()
            results.append([w.view(np.uint8).copy() for w in written])
        for d, r in zip(DISTANCES[1:], results[1:]):
            for k, (a, b) in enumerate(zip(r, results[0])):
                assert np.array_equal(a, b), f"{name}: distance {d} changed written array {k}"
    finally:
        fastoptim.set_num_threads(saved)


def test_returns_the_previous_setting():
    assert _core._set_prefetch_ahead(100) is None  # the default, by the params' width
    assert _core._set_prefetch_ahead(0) == 100
    assert _core._set_prefetch_ahead(65536) == 0
    assert _core._set_prefetch_ahead(None) == 65536
    assert _core._set_prefetch_ahead(None) is None


@pytest.mark.parametrize("bad, exc, text", [
    ("256", TypeError, "elements must be an int or None, got str"),
    (256.0, TypeError, "elements must be an int or None, got float"),
    (True, TypeError, "elements must be an int or None, got bool"),
    (-1, ValueError, r"elements must be in \[0, 65536\], got -1"),
    (65537, ValueError, r"elements must be in \[0, 65536\], got 65537"),
    (2**70, ValueError, r"elements must be in \[0, 65536\], got 1180591620717411303424"),
])
def test_bad_argument(bad, exc, text):
    with pytest.raises(exc, match=r"_set_prefetch_ahead: " + text):
        _core._set_prefetch_ahead(bad)
    assert _core._set_prefetch_ahead(None) is None  # unchanged by the refused call
