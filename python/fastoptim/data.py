"""Shuffled mini-batches for NumPy training loops.

``random_mini_batches`` returns the whole epoch as a list; ``iter_mini_batches`` yields the
same batches one at a time. Both draw ONE permutation of the examples and cut it into
consecutive slices of ``batch_size`` indices (the last one smaller when ``batch_size`` does not
divide the number of examples), so batch ``k`` of either is::

    X.take(perm[k*batch_size:(k+1)*batch_size], axis=axis)

Each batch is a fresh array gathered with its slice of the permutation: the data set itself is
never shuffled or copied as a whole (an epoch of ``random_mini_batches`` holds one copy of the
data split into batches; ``iter_mini_batches`` only one batch at a time).

``axis`` is the examples axis. The deeplearning.ai course stores examples as COLUMNS,
``X.shape == (n_features, m)`` and ``Y.shape == (1, m)``: use ``axis=1``. The usual NumPy /
scikit-learn layout has examples as rows, ``X.shape == (m, n_features)``: the default
``axis=0``. A 1-D array (a label vector of shape ``(m,)``) has a single axis, which is its
examples axis whatever ``axis`` says.

``seed`` is required (keyword only) so that a run is reproducible by default: an integer
``>= 0``, a ``numpy.random.Generator`` (drawn from; pass the same generator every epoch to get a
new permutation each time), or ``None`` for fresh OS entropy.

X and Y are anything ``numpy.asarray`` makes an array of at least one dimension (``TypeError``
for ``None``, a dict, a generator, ...; ``ValueError`` for a number or a ragged nested list). A
``numpy.ma.MaskedArray`` is refused (``TypeError``): the batches would silently lose its mask.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterator, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["random_mini_batches", "iter_mini_batches"]

SeedLike = Union[None, int, np.random.Generator]


def _as_array(name: str, a: Any) -> NDArray[Any]:
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray; the batches would lose its mask "
                        f"(pass its .data to ignore the mask, or drop the masked examples)")
    try:
        arr = np.asarray(a)
    except ValueError as e:  # a ragged nested list: NumPy's "inhomogeneous shape"
        raise ValueError(f"{name} cannot be made into an array: {e}") from None
    if arr.ndim == 0 and not isinstance(a, (numbers.Number, np.generic, np.ndarray)):
        # None, a dict, a set, a generator, a str: a 0-d array of one object
        raise TypeError(f"{name} must be an array of examples, got {type(a).__name__}")
    return arr


def _examples_axis(name: str, a: NDArray[Any], axis: int) -> int:
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the examples), got a scalar")
    if a.ndim == 1:
        return 0
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis {axis} is out of bounds for {name} with shape {a.shape}")
    return axis % a.ndim


def _prepare(X: ArrayLike, Y: ArrayLike, batch_size: Any, seed: SeedLike, axis: Any
             ) -> tuple[NDArray[Any], NDArray[Any], int, int, NDArray[np.int64], int]:
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if seed is not None and not isinstance(seed, np.random.Generator) and (
            isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int, a numpy.random.Generator or None, got {seed!r}")
    if isinstance(seed, numbers.Integral) and seed < 0:
        shown = repr(seed) if int(seed).bit_length() <= 64 else "a large negative integer"
        raise ValueError(f"seed must be >= 0, got {shown}")
    X = _as_array("X", X)
    Y = _as_array("Y", Y)
    x_axis = _examples_axis("X", X, int(axis))
    y_axis = _examples_axis("Y", Y, int(axis))
    m = X.shape[x_axis]
    if Y.shape[y_axis] != m:
        raise ValueError(
            f"X and Y have different numbers of examples along the examples axis: X.shape = "
            f"{X.shape} has {m} (axis {x_axis}), Y.shape = {Y.shape} has {Y.shape[y_axis]} "
            f"(axis {y_axis})"
        )
    perm = np.random.default_rng(seed).permutation(m)
    return X, Y, x_axis, y_axis, perm, int(batch_size)


def iter_mini_batches(X: ArrayLike, Y: ArrayLike, batch_size: int, *, seed: SeedLike,
                      axis: int = 0) -> Iterator[tuple[NDArray[Any], NDArray[Any]]]:
    """Yield ``(X_batch, Y_batch)`` pairs of one shuffled epoch, one batch at a time.

    X and Y are shuffled with the same permutation along the examples ``axis`` (see the module
    docstring for the layouts) and cut into ``ceil(m / batch_size)`` batches, the last one
    smaller when ``batch_size`` does not divide ``m``. Arguments are checked when this is
    called, before the first batch is asked for: ``TypeError`` for a non-integer
    ``batch_size``, ``seed`` or ``axis``, or an X or Y that is not an array (see the module
    docstring), ``ValueError`` for ``batch_size < 1``, ``seed < 0``, an ``axis`` out of bounds,
    or when X and Y hold different numbers of examples.
    """
    X, Y, x_axis, y_axis, perm, batch_size = _prepare(X, Y, batch_size, seed, axis)
    return _batches(X, Y, x_axis, y_axis, perm, batch_size)


def _batches(X: NDArray[Any], Y: NDArray[Any], x_axis: int, y_axis: int,
             perm: NDArray[np.int64], batch_size: int
             ) -> Iterator[tuple[NDArray[Any], NDArray[Any]]]:
    for start in range(0, perm.size, batch_size):
        idx = perm[start:start + batch_size]
        yield X.take(idx, axis=x_axis), Y.take(idx, axis=y_axis)


def random_mini_batches(X: ArrayLike, Y: ArrayLike, batch_size: int, *, seed: SeedLike,
                        axis: int = 0) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    """Shuffle X and Y with the same permutation along ``axis`` and split them into batches.

    Returns the list of ``(X_batch, Y_batch)`` of one epoch: ``ceil(m / batch_size)`` pairs,
    the last one smaller when ``batch_size`` does not divide ``m``. Same batches, in the same
    order, as ``list(iter_mini_batches(X, Y, batch_size, seed=seed, axis=axis))``.
    """
    return list(iter_mini_batches(X, Y, batch_size, seed=seed, axis=axis))
