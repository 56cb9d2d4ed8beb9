"""Block-wise quantized optimizer states (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"), the NumPy side: the :class:`QuantizedState` that the functional
updates take in place of a state array, the quantizer and dequantizer written plainly in NumPy
(the oracle of the kernels' load and store), the paper's dynamic map (for comparison), and the
quantized update built on :mod:`fastoptim.reference`.

A state of a tensor of ``n`` elements is stored as ``n`` codes and one float32 ``absmax`` per
block of that tensor's elements:

* 8 bits: blocks of 256, one code per byte (``codes`` has ``n`` bytes);
* 4 bits: blocks of 128, two codes per byte, element ``2j`` in the low nibble of byte ``j``
  (``codes`` has ``(n + 1) // 2`` bytes).

The map from a code to a value (src/cpp/quant_api.h, Note [quantized states]) is a small
float of ``|x| / absmax`` with 3 mantissa bits at 8 bits and none at 4 bits, its exponent in the
code's other bits, offset so that the top code is 1.0. Signed states (first moments, momentum
buffers) spend a bit on the sign and hold zero; non-negative states (second moments, sums of
squares, step sizes: rules.h declares which) have no zero, so a second moment never reads back
as 0. Encoding is an integer add and shift of the float's bit pattern, so the kernels need no
square root and no nearest-code search; docs/quantized_states.md measures this map against the
paper's dynamic map and a square-root companding map. All arithmetic below is float32 (or exact
integer), operation by operation in the kernels' order, so this module reproduces the kernels'
codes bit for bit.

Functional use::

    m = QuantizedState.zeros(p.shape, bits=8)                  # exp_avg
    v = QuantizedState.zeros(p.shape, bits=8, non_negative=True)  # exp_avg_sq
    fastoptim.adamw_(p, g, m, v, step=1, lr=1e-3)

All states of one call share one format (all int8 or all int4); params and grads are float32.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["QuantizedState", "BLOCK", "MIN_QUANTIZED_SIZE", "quantize", "dequantize",
           "dynamic_map", "quantize_dynamic", "dequantize_dynamic", "non_negative_states",
           "reference_update"]

# Elements per block, by bits.
BLOCK = {8: 256, 4: 128}
# The classes (fastoptim.optim) keep float32 states for tensors with fewer elements than this
# (bitsandbytes' min_8bit_size): their absmax and per-call overhead outweigh the bytes saved.
MIN_QUANTIZED_SIZE = 4096

_F32 = np.float32


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return int(bits)


def _params(bits: int, non_negative: bool) -> tuple[int, int, int, int]:
    """(mantissa bits F, dropped fp32 mantissa bits, top code, offset) of the map."""
    f = 3 if bits == 8 else 0
    top = (1 << bits) - 1 if non_negative else (1 << (bits - 1)) - 1
    return f, 23 - f, top, (127 << f) - top


def _shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _blocks(n: int, bits: int) -> int:
    return -(-n // BLOCK[bits])


def _decode(c: NDArray[np.int64], bits: int, non_negative: bool,
            absmax_per_elem: NDArray[np.float32]) -> NDArray[np.float32]:
    """Codes -> float32 values: the code's small float, times absmax (one rounding)."""
    _, shift, top, bias = _params(bits, non_negative)
    if non_negative:
        val = ((c + bias) << shift).astype(np.uint32).view(_F32)
        return val * absmax_per_elem
    k = c & top
    sign = (c >> (bits - 1)) & 1
    val = (((k + bias) << shift) | (sign << 31)).astype(np.uint32).view(_F32)
    return np.where(k == 0, _F32(0), val) * absmax_per_elem


def _encode(x: NDArray[np.float32], bits: int, non_negative: bool,
            inv_per_elem: NDArray[np.float32]) -> NDArray[np.int64]:
    """float32 values -> codes: |x| * inv rounded to F mantissa bits (ties away from zero, on
    the bit pattern), minus the offset, clamped; a sign bit for signed states."""
    _, shift, top, bias = _params(bits, non_negative)
    u = (np.abs(x) * inv_per_elem).astype(_F32).view(np.uint32).astype(np.int64)
    r = ((u + (1 << (shift - 1))) >> shift) - bias
    if non_negative:
        return np.asarray(np.clip(r, 0, top), np.int64)
    k = np.where(r < 1, 0, np.minimum(r, top))
    return np.asarray(k | np.where((x < 0) & (k != 0), 1 << (bits - 1), 0), np.int64)


def _pack(q: NDArray[np.int64], bits: int) -> NDArray[np.uint8]:
    c = (q & ((1 << bits) - 1)).astype(np.uint8)
    if bits == 8:
        return c
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.uint8)])
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


def _unpack(codes: NDArray[np.uint8], n: int, bits: int) -> NDArray[np.int64]:
    if bits == 8:
        return codes[:n].astype(np.int64)
    c = np.empty(2 * codes.size, np.int64)
    c[0::2] = codes & 15
    c[1::2] = codes >> 4
    return c[:n]


def code_values(bits: int = 8, non_negative: bool = False) -> NDArray[np.float32]:
    """Every value a code can hold when absmax is 1, by code (for inspection and plots)."""
    bits = _check_bits(bits)
    return _decode(np.arange(1 << bits, dtype=np.int64), bits, non_negative,
                   np.ones(1 << bits, _F32))


def quantize(x: NDArray[Any], bits: int = 8, non_negative: bool = False
             ) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """``(codes, absmax)`` of the values ``x`` (flattened; converted to float32 first).

    A block whose values include a NaN or an Inf gets absmax NaN and all-zero codes (it reads
    back as NaN), as in the kernels."""
    bits = _check_bits(bits)
    x = np.ascontiguousarray(x, _F32).reshape(-1)
    n, b = x.size, BLOCK[bits]
    nb = _blocks(n, bits)
    pad = np.zeros(nb * b, _F32)
    pad[:n] = x
    blocks = pad.reshape(nb, b)
    with np.errstate(invalid="ignore"):
        finite: NDArray[np.bool_] = np.asarray(np.isfinite(blocks).all(axis=1))
        absmax = np.where(finite, np.abs(blocks).max(axis=1, initial=_F32(0)), _F32(np.nan))
        absmax = absmax.astype(_F32)
        safe = np.where(finite & (absmax > 0), absmax, _F32(1))
        inv = np.where(finite & (absmax > 0), _F32(1) / safe, _F32(0)).astype(_F32)
        q = _encode(np.where(finite[:, None], blocks, _F32(0)), bits, non_negative,
                    np.repeat(inv, b).reshape(nb, b)).reshape(-1)[:n]
    return _pack(q, bits), absmax


def dequantize(codes: NDArray[np.uint8], absmax: NDArray[np.float32], n: int, bits: int = 8,
               non_negative: bool = False) -> NDArray[np.float32]:
    """The ``n`` float32 values that ``(codes, absmax)`` hold (flat)."""
    bits = _check_bits(bits)
    q = _unpack(np.asarray(codes, np.uint8).reshape(-1), n, bits)
    per_elem = np.repeat(np.asarray(absmax, _F32), BLOCK[bits])[:n]
    return _decode(q, bits, non_negative, per_elem)


class QuantizedState:
    """One quantized optimizer state of one tensor: ``codes`` (uint8), ``absmax`` (float32, one
    per block), ``bits`` (8 or 4), ``shape`` (the tensor's) and ``non_negative`` (which map).

    Pass it to a functional update (``fastoptim.adam_(p, g, m, v, ...)``) in place of the
    state array, or a list of them in place of a list of arrays. The update rewrites
    ``codes`` and ``absmax`` in place. ``non_negative`` must match the state's declaration
    (second moments and the like; :func:`non_negative_states`), else the call is a
    ValueError.
    """

    __slots__ = ("codes", "absmax", "bits", "shape", "non_negative")

    def __init__(self, codes: NDArray[np.uint8], absmax: NDArray[np.float32], bits: int,
                 shape: Sequence[int] | int, non_negative: bool = False) -> None:
        self.bits = _check_bits(bits)
        self.shape = _shape(shape)
        self.non_negative = bool(non_negative)
        n = int(np.prod(self.shape, dtype=np.int64))
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 1:
            raise TypeError("codes must be a 1-D numpy.ndarray of dtype uint8")
        want = n if self.bits == 8 else (n + 1) // 2
        if codes.size != want:
            raise ValueError(f"codes has {codes.size} bytes; shape {self.shape} at {self.bits} "
                             f"bits needs {want}")
        if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32 or absmax.ndim != 1:
            raise TypeError("absmax must be a 1-D numpy.ndarray of dtype float32")
        if absmax.size != _blocks(n, self.bits):
            raise ValueError(f"absmax has {absmax.size} entries; shape {self.shape} at "
                             f"{self.bits} bits needs {_blocks(n, self.bits)}")
        self.codes = codes
        self.absmax = absmax

    @classmethod
    def zeros(cls, shape: Sequence[int] | int, bits: int = 8,
              non_negative: bool = False) -> QuantizedState:
        """The zero state (all codes 0, every absmax 0)."""
        bits = _check_bits(bits)
        shp = _shape(shape)
        n = int(np.prod(shp, dtype=np.int64))
        return cls(np.zeros(n if bits == 8 else (n + 1) // 2, np.uint8),
                   np.zeros(_blocks(n, bits), _F32), bits, shp, non_negative)

    @classmethod
    def from_float(cls, x: NDArray[Any], bits: int = 8,
                   non_negative: bool = False) -> QuantizedState:
        """Quantize the array ``x`` (torch.optim's fp32 state layout -> this one)."""
        x = np.asarray(x)
        codes, absmax = quantize(x, bits, non_negative)
        return cls(codes, absmax, bits, x.shape, non_negative)

    def to_float(self) -> NDArray[np.float32]:
        """The float32 array this state holds, in the tensor's shape (-> torch.optim's layout)."""
        n = int(np.prod(self.shape, dtype=np.int64))
        return dequantize(self.codes, self.absmax, n, self.bits,
                          self.non_negative).reshape(self.shape)

    @property
    def dtype(self) -> str:
        return "int8" if self.bits == 8 else "int4"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus absmax."""
        return int(self.codes.nbytes + self.absmax.nbytes)

    def copy(self) -> QuantizedState:
        return QuantizedState(self.codes.copy(), self.absmax.copy(), self.bits, self.shape,
                              self.non_negative)

    def __repr__(self) -> str:
        kind = "non_negative" if self.non_negative else "signed"
        return f"QuantizedState(shape={self.shape}, bits={self.bits}, {kind})"


def non_negative_states(rule: str) -> frozenset[str]:
    """The state arguments of ``rule`` (``"adam"``, ...) stored with the non-negative map."""
    from . import _core
    name = "adam" if rule == "adamw" else rule
    return frozenset(_core.rules[name]["non_negative_states"])


# ---- the paper's dynamic map, for comparison -------------------------------------------------
def dynamic_map(bits: int = 8, signed: bool = True) -> NDArray[np.float32]:
    """The dynamic (tree) quantization map of Dettmers et al. (2022, section 2 and appendix),
    sorted: a code is a sign bit (signed maps only), then E zero bits giving the exponent
    10**-E, an indicator 1 bit, and the remaining bits a linear fraction of [0.1, 1] (bin
    centres). The unsigned map (second moments) spends the sign bit on one more exponent or
    fraction bit (its smallest exponent, one value, is left out). Zero and 1.0 complete the
    map to 2**bits values (and -1.0 for signed maps
    when a code is left)."""
    bits = _check_bits(bits)
    r = bits - 1 if signed else bits
    vals: list[float] = [0.0, 1.0]
    # The unsigned map has one more bit than needed for 2**bits - 2 magnitudes: its last
    # exponent (a single value) is left out.
    for e in range(r if signed else r - 1):
        f = r - 1 - e
        k = np.arange(2 ** f)
        mags = 10.0 ** (-e) * (0.1 + 0.9 * (k + 0.5) / 2 ** f)
        vals.extend(mags.tolist())
        if signed:
            vals.extend((-mags).tolist())
    if signed and len(vals) < 2 ** bits:
        vals.append(-1.0)
    out = np.unique(np.array(vals, np.float64)).astype(_F32)
    return out[: 2 ** bits]


def quantize_dynamic(x: NDArray[Any], bits: int = 8, signed: bool = True
                     ) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Block-wise quantization with :func:`dynamic_map`: each value is normalised by its
    block's absmax and takes the nearest map entry (binary search). Codes are indices into the
    map, one per byte (not packed: this is for measurement)."""
    bits = _check_bits(bits)
    table = dynamic_map(bits, signed)
    x = np.ascontiguousarray(x, _F32).reshape(-1)
    n, b = x.size, BLOCK[bits]
    nb = _blocks(n, bits)
    pad = np.zeros(nb * b, _F32)
    pad[:n] = x
    absmax = np.abs(pad.reshape(nb, b)).max(axis=1).astype(_F32)
    y = (pad.reshape(nb, b) / np.where(absmax > 0, absmax, 1)[:, None]).reshape(-1)[:n]
    hi = np.clip(np.searchsorted(table, y), 1, table.size - 1)
    lo = hi - 1
    idx = np.where(np.abs(y - table[lo]) <= np.abs(table[hi] - y), lo, hi)
    return idx.astype(np.uint8), absmax


def dequantize_dynamic(codes: NDArray[np.uint8], absmax: NDArray[np.float32], n: int,
                       bits: int = 8, signed: bool = True) -> NDArray[np.float32]:
    table = dynamic_map(bits, signed)
    return (table[codes[:n]] * np.repeat(absmax, BLOCK[bits])[:n]).astype(_F32)


# ---- the quantized update, built on fastoptim.reference ---------------------------------------
def reference_update(fn: Callable[..., None], params: Any, grads: Any,
                     states: dict[str, Any], *, map: str = "companding", **kwargs: Any) -> None:
    """One quantized update in NumPy: dequantize every state, run ``fn`` (a function of
    :mod:`fastoptim.reference`, or any fp32 update with that signature) on float32 copies,
    requantize each state with its block's new absmax.

    ``states`` maps state argument names to a :class:`QuantizedState` or a list of them
    (updated in place). ``map="dynamic"`` stores with the paper's dynamic map instead (then
    the codes are :func:`quantize_dynamic`'s and the objects are only containers)."""
    if map not in ("companding", "dynamic"):
        raise ValueError(f"map must be 'companding' or 'dynamic', got {map!r}")
    floats: dict[str, Any] = {}
    lists: dict[str, list[QuantizedState]] = {}
    for name, st in states.items():
        qs = [st] if isinstance(st, QuantizedState) else list(st)
        lists[name] = qs
        if map == "companding":
            fl = [q.to_float() for q in qs]
        else:
            fl = [dequantize_dynamic(q.codes, q.absmax, q.size, q.bits,
                                     not q.non_negative).reshape(q.shape) for q in qs]
        floats[name] = fl[0] if isinstance(st, QuantizedState) else fl
    fn(params, grads, **floats, **kwargs)
    for name, qs in lists.items():
        fl = floats[name]
        fl = [fl] if isinstance(fl, np.ndarray) else fl
        for q, x in zip(qs, fl):
            if map == "companding":
                q.codes[...], q.absmax[...] = quantize(x, q.bits, q.non_negative)
            else:
                c, a = quantize_dynamic(x, q.bits, not q.non_negative)
                q.codes = c
                q.absmax[...] = a
