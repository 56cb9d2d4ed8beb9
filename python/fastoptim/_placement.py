"""Where the optimizers put the states they allocate (Note [state placement]).

Note [state placement]
    Two large arrays whose start addresses differ by certain amounts evict each other's lines
    from the L1 data cache while a kernel streams through both at the same index. On a Zen 4
    the aliasing distances are multiples of 4 KiB whose address bits 12-27 hash alike (the
    linear-address way predictor of AMD's L1, src/cpp/kernels.h, Note [slot-major order]); the
    distance that separate allocations of one size get, n x itemsize + 4 KiB, is one of them
    for 2^26 16-bit elements (2^27 + 4 KiB). AdamW all-bf16 at 2^26 on such arrays took 39-40
    ms at 1 thread where it takes 29 ms when nothing aliases.
    The params and grads belong to the user; the states the optimizer classes allocate do not.
    So a state of a large parameter starts 1, 2 or 3 KiB past the param's offset within a 4 KiB
    page (by state name: STATE_SLOT), which makes its distance to the param, to every other
    state and to any grad that shares the param's page offset (separate allocations of one
    size do) not a multiple of 4 KiB, whatever the hash. Measured with the params and grads
    left 2^27 + 4 KiB apart and the states so placed: 30.2 ms at 1 thread, 17.7 at 2 (against
    39.4 and 21.4 with all four aliasing; 29.1 and 17.2 with nothing aliasing). The cost is one
    page per state of each parameter of at least MIN_BYTES (0.4% at most); smaller parameters'
    states are plain allocations. The state is a view of a slightly larger buffer, with the
    param's shape and alignment modulo 1 KiB; its values and dtype are what they were.
"""
from __future__ import annotations

from typing import Any

import numpy as np

PAGE = 4096
SKEW = 1024
# States of one parameter get different slots (Adam with amsgrad: three; RMSprop centred with
# momentum: three); a name missing here gets slot 1.
STATE_SLOT = {"exp_avg": 1, "square_avg": 1, "sum": 1, "prev": 1, "ax": 1,
              "exp_avg_sq": 2, "exp_inf": 2, "momentum_buffer": 2, "acc_delta": 2,
              "step_size": 2, "max_exp_avg_sq": 3, "grad_avg": 3}
MIN_BYTES = 1 << 20


def slot_of(name: str) -> int:
    """The placement slot of a state (1, 2 or 3): its start sits slot KiB past the param's."""
    return STATE_SLOT.get(name, 1)


def offset(param_addr: int, buf_addr: int, itemsize: int, slot: int) -> int | None:
    """Bytes into a buffer at buf_addr (with PAGE bytes to spare) where a state of a param at
    param_addr starts so that it lies slot x SKEW bytes past the param modulo PAGE; None when
    that start would not be aligned to the state's itemsize (a misaligned param)."""
    off = (param_addr + slot * SKEW - buf_addr) % PAGE
    return off if (buf_addr + off) % itemsize == 0 else None


def full_like(p: np.ndarray, name: str, fill: float | np.floating[Any],
              dtype: Any = None) -> np.ndarray:
    """A C-contiguous array of p's shape filled with fill, placed (Note [state placement])
    when p is a C-contiguous array of at least MIN_BYTES."""
    dt = np.dtype(p.dtype if dtype is None else dtype)
    nbytes = p.size * dt.itemsize
    if nbytes >= MIN_BYTES and p.flags.c_contiguous:
        buf = np.empty(nbytes + PAGE, np.uint8)
        off = offset(p.__array_interface__["data"][0], buf.__array_interface__["data"][0],
                     dt.itemsize, slot_of(name))
        if off is not None:
            out = buf[off:off + nbytes].view(dt).reshape(p.shape)
            np.copyto(out, fill, casting="unsafe")  # as np.full converts it
            return out
    return np.full(p.shape, fill, dtype=dt)
