"""fastoptim.data: shuffled mini-batches along either examples axis."""
import numpy as np
import pytest

from fastoptim.data import iter_mini_batches, random_mini_batches


def _course_data(m, n=3):
    # Course layout: examples are columns. Column j of X is j*[1, 10, 100...] so that every
    # row of a batch recovers the example index.
    X = np.arange(m, dtype=np.float64)[None, :] * 10.0 ** np.arange(n)[:, None]
    Y = (np.arange(m) % 2)[None, :].astype(np.float64) + np.arange(m)[None, :] * 2
    return X, Y


@pytest.mark.parametrize("m, batch_size", [(148, 64), (128, 64), (1, 64), (5, 1), (7, 7),
                                           (10, 3), (0, 4)])
def test_course_layout(m, batch_size):
    X, Y = _course_data(m)
    batches = random_mini_batches(X, Y, batch_size, seed=1, axis=1)
    assert len(batches) == -(-m // batch_size)
    sizes = [xb.shape[1] for xb, _ in batches]
    assert all(s == batch_size for s in sizes[:-1])
    if m:
        assert sizes[-1] == m - batch_size * (len(batches) - 1)  # the smaller last batch
    seen = []
    for xb, yb in batches:
        assert xb.shape[0] == 3 and yb.shape[0] == 1 and yb.shape[1] == xb.shape[1]
        idx = xb[0].astype(int)
        np.testing.assert_array_equal(xb, X[:, idx])        # columns stay whole
        np.testing.assert_array_equal(yb, Y[:, idx])        # same permutation for Y
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(m))                   # a permutation: every example once
    if m > 3:
        assert seen != list(range(m))                       # and actually shuffled


def test_rows_layout_and_1d_labels():
    m = 23
    X = np.arange(m * 4, dtype=np.float32).reshape(m, 4)
    y = np.arange(m)
    batches = random_mini_batches(X, y, 5, seed=0)  # axis=0 default
    assert [b[0].shape for b in batches] == [(5, 4)] * 4 + [(3, 4)]
    for xb, yb in batches:
        assert xb.dtype == np.float32
        np.testing.assert_array_equal(xb, X[yb])
    # A 1-D label vector with the course layout: its only axis is the examples axis.
    batches = random_mini_batches(X.T, y, 5, seed=0, axis=1)
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, X.T[:, yb])
    # Negative axis.
    for xb, yb in random_mini_batches(X.T, y, 5, seed=0, axis=-1):
        np.testing.assert_array_equal(xb, X.T[:, yb])


def test_higher_rank_examples_axis():
    X = np.random.default_rng(0).standard_normal((4, 9, 2))  # examples along axis 1
    Y = np.arange(9)[None, :, None] * np.ones((3, 1, 5))
    for xb, yb in random_mini_batches(X, Y, 4, seed=3, axis=1):
        idx = yb[0, :, 0].astype(int)
        np.testing.assert_array_equal(xb, X[:, idx])


def test_seed_reproducible_and_generator():
    X, Y = _course_data(50)
    a = random_mini_batches(X, Y, 8, seed=7, axis=1)
    b = random_mini_batches(X, Y, 8, seed=7, axis=1)
    c = random_mini_batches(X, Y, 8, seed=8, axis=1)
    assert all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert not all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    # A Generator is drawn from: a new permutation every epoch, reproducible as a sequence.
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    e1 = [xb for xb, _ in random_mini_batches(X, Y, 50, seed=g1, axis=1)]
    e2 = [xb for xb, _ in random_mini_batches(X, Y, 50, seed=g1, axis=1)]
    assert not np.array_equal(e1[0], e2[0])
    f1 = [xb for xb, _ in random_mini_batches(X, Y, 50, seed=g2, axis=1)]
    np.testing.assert_array_equal(e1[0], f1[0])
    assert len(random_mini_batches(X, Y, 8, seed=None, axis=1)) == 7


def test_iterator_same_batches_and_lazy():
    X, Y = _course_data(37)
    it = iter_mini_batches(X, Y, 10, seed=2, axis=1)
    assert not isinstance(it, list) and iter(it) is it
    first = next(it)
    rest = list(it)
    eager = random_mini_batches(X, Y, 10, seed=2, axis=1)
    assert len(eager) == 1 + len(rest) == 4
    for (x1, y1), (x2, y2) in zip([first] + rest, eager):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_batches_do_not_alias_the_data():
    X, Y = _course_data(12)
    X0 = X.copy()
    for xb, yb in iter_mini_batches(X, Y, 5, seed=0, axis=1):
        assert not np.shares_memory(xb, X) and not np.shares_memory(yb, Y)
        xb[...] = -1
    np.testing.assert_array_equal(X, X0)  # the data set itself is never shuffled in place


@pytest.mark.parametrize("fn", [random_mini_batches, iter_mini_batches])
def test_errors(fn):
    X, Y = _course_data(10)
    with pytest.raises(ValueError, match=r"X\.shape = \(3, 10\).*Y\.shape = \(1, 9\)"):
        fn(X, Y[:, :9], 4, seed=0, axis=1)
    with pytest.raises(ValueError, match="different numbers of examples"):
        fn(X, Y, 4, seed=0)  # axis 0: 3 vs 1 examples
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fn(X, Y, 0, seed=0, axis=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fn(X, Y, -3, seed=0, axis=1)
    for bad in (2.0, 2.5, "4", True, None):
        with pytest.raises(TypeError, match="batch_size must be an integer"):
            fn(X, Y, bad, seed=0, axis=1)
    with pytest.raises(ValueError, match="axis 2 is out of bounds for X"):
        fn(X, Y, 4, seed=0, axis=2)
    with pytest.raises(TypeError, match="seed"):
        fn(X, Y, 4, seed=1.5, axis=1)
    with pytest.raises(TypeError, match="positional"):
        fn(X, Y, 4, 0, 1)  # seed and axis are keyword-only
    with pytest.raises(ValueError, match="scalar"):
        fn(np.float64(1.0), Y, 4, seed=0)


def test_numpy_integer_batch_size():
    X, Y = _course_data(10)
    assert len(random_mini_batches(X, Y, np.int64(4), seed=0, axis=1)) == 3
