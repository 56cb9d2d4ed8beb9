"""fastoptim: fused, single-pass optimizer updates for NumPy arrays.

Functional in-place updates (``adam_``, ``sgd_``, ...), thin stateful classes (``Adam``,
``SGD``, ...), and a readable NumPy oracle in :mod:`fastoptim.reference`.
"""
from __future__ import annotations

import operator
from typing import Any

from . import _core, data, ema, functional, optim, reference, schedules
from .functional import (adadelta_, adagrad_, adam_, adamax_, adamw_, asgd_, ema_, global_norm,
                         lion_, nadam_, radam_, rmsprop_, rprop_, sgd_, unscale_and_check_)
from .optim import (ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Lion, NAdam, Optimizer,
                    RAdam, RMSprop, Rprop)

__version__ = "0.1.0"

__all__ = [
    "sgd_", "rmsprop_", "adam_", "adamw_", "adagrad_", "adadelta_", "nadam_", "radam_",
    "adamax_", "asgd_", "rprop_", "lion_", "ema_", "global_norm", "unscale_and_check_",
    "Optimizer", "SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam",
    "Adamax", "ASGD", "Rprop", "Lion",
    "backend_info", "set_num_threads", "get_num_threads", "set_isa",
]


def backend_info() -> dict[str, Any]:
    """Which CPU path and how many threads are in use, and the CUDA build and devices."""
    info = dict(_core.info())  # "cuda": {"built": ..., "device_count": ..., ...}
    info["version"] = __version__
    return info


def set_num_threads(n: int) -> None:
    """Threads used by one update: an int (not bool) in 1..1024; the default is the number of
    CPUs this process may run on (at most 1024). An update uses at most one thread per 32768
    elements, so arrays under 65536 elements in total always use one. More threads than CPUs
    are allowed but only add contention.

    Raises TypeError if ``n`` is not an integer (``2.5``, ``"2"``, ``True``) and ValueError
    if it is outside 1..1024."""
    if isinstance(n, bool):
        raise TypeError("set_num_threads: n must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}") from None
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def set_isa(name: str) -> None:
    """Force a CPU path: ``"scalar"``, ``"avx2"`` or ``"avx512"`` (must be compiled and
    supported by this CPU). The environment variable ``FASTOPTIM_ISA`` sets it at import."""
    _core.set_isa(name)
