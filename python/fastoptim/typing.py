"""Types of fastoptim's public API, to annotate code that calls it (checked by mypy --strict,
tests/test_typing.py).

``ArrayOrList`` is what every array argument of the updates (:mod:`fastoptim.functional`,
:mod:`fastoptim.reference`) takes: ONE array, or a list or tuple of arrays, where an array is

* a NumPy array (``FloatArray``, ``NDArray[Any]``: ``ml_dtypes.bfloat16`` is not a
  ``np.floating`` to a type checker): the kernels take float32, float64, float16 and
  ml_dtypes.bfloat16 in the combinations of docs/api.md ("Storage formats") and raise
  TypeError for any other dtype, which this type lets through, or
* a CUDA array (``CudaArray``): any object with ``__cuda_array_interface__`` (CuPy, Numba,
  torch CUDA tensors). This is a structural type, so every ``torch.Tensor`` matches it, CPU
  ones included; the kernels refuse what is not CUDA memory when they are called.
  :mod:`fastoptim.reference` has the same annotations but computes with NumPy only.

The sequence part is ``Sequence`` (so a ``list[NDArray[np.float32]]`` is accepted, which an
invariant ``list[...]`` would reject), but at run time only a ``list`` or a ``tuple`` counts
as several arrays. Nothing here is checked at run time: these are annotations only.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, SupportsFloat, TypeAlias, TypedDict, Union

import numpy as np
from numpy.typing import NDArray

__all__ = ["FloatArray", "CudaArray", "Array", "ArrayOrList", "Params", "UpdateOptions"]


class CudaArray(Protocol):
    """An object that exposes CUDA device memory through ``__cuda_array_interface__``."""

    @property
    def __cuda_array_interface__(self) -> Mapping[str, Any]: ...


#: A NumPy array (float32, float64, float16 or ml_dtypes.bfloat16 at run time).
FloatArray: TypeAlias = NDArray[Any]
#: One array argument: a NumPy float array or a CUDA array.
Array: TypeAlias = Union[FloatArray, CudaArray]
#: One array, or a list/tuple of them (one per parameter).
ArrayOrList: TypeAlias = Union[Array, Sequence[Array]]
#: What the classes of :mod:`fastoptim.optim` take as ``params``: arrays, or param-group dicts
#: (``{"params": [...], "lr": ...}``).
Params: TypeAlias = Union[Iterable[FloatArray], Iterable[Mapping[str, Any]]]


class UpdateOptions(TypedDict, total=False):
    """The keyword options every update of :mod:`fastoptim.functional` takes (docs/api.md,
    "Mixed precision"): torch.amp's ``grad_scale`` (grads are divided by it as they are
    loaded) and ``found_inf`` (nonzero: nothing is written), stochastic rounding of bfloat16
    params keyed by ``(seed, counter)``, and the Kahan ``compensation`` of bfloat16 params."""

    grad_scale: SupportsFloat | None
    found_inf: SupportsFloat | None
    stochastic_rounding: tuple[int, int] | tuple[int, int, int] | None
    compensation: ArrayOrList | None
