"""The CUDA launch plan (src/cpp/launch_plan.h), executed on the CPU.

``_core._plan_coverage`` splits a call into launches as the CUDA launcher does (groups of at
most 576 non-empty tensors, Note [launch groups]) and runs the kernel body of the CUDA backend
(``plan::block_body``, the same code the GPU runs) for every (block, thread) of every launch
over FAKE device pointers, recording what each thread would load and store. These tests
prove, without a GPU, that

* a call is split into launches of at most 576 tensors, in order, empty tensors left out, and
  each tensor is cut into its own chunks (one block per (tensor, chunk), Note [chunks per
  tensor]): 5,000 tensors of 17 elements are 5,000 chunks, not 21;

* every element of every tensor is visited exactly once (``counts == 1``): tails, chunk
  boundaries, empty tensors, misaligned starts, 1 to 5,000 tensors of odd sizes, and tiny
  chunks/blocks/grids that force the grid-stride loop and many spans per chunk;
* every 16-byte (float4/double2) visit is 16-byte aligned in EVERY slot, no visit leaves its
  tensor, and each visit uses its own tensor's pointers;
* the vector path is taken wherever the pointers allow it (exact counts for one tensor);
* the index math is 64-bit: chunks around 2^31 and 2^32 and the last chunk of a buffer of
  more than 2^32 elements cover exactly their global ranges (walked sparsely, nothing is
  allocated).

The hook is compiled by the host compiler into every build, with or without CUDA.
"""

import numpy as np
import pytest

from fastoptim import _core

CHUNK = 4096  # plan::kChunk
BLOCK = 256  # plan::kBlockThreads
BLOCKS_PER_SM = 32  # plan::kBlocksPerSm
GROUP = 576  # plan::kGroupLarge: tensors per launch (kernel parameter space)
ALL_SLOTS = 0b11111


def chunk_starts(sizes, chunk=CHUNK):
    """First chunk of each non-empty tensor, tensor after tensor (Note [chunks per tensor])."""
    per = [-(-s // chunk) for s in sizes if s > 0]
    return np.concatenate([[0], np.cumsum(per, dtype=np.int64)]).astype(np.int64)


def vec_width(itemsize):
    return 16 // itemsize


def walk(sizes, offsets=None, **kw):
    r = _core._plan_coverage(list(sizes), offsets, **kw)
    assert r["out_of_range"] == 0, "a visit left its tensor"
    assert r["misaligned_vectors"] == 0, "a 16-byte access was not 16-byte aligned"
    assert r["wrong_pointers"] == 0, "a visit used another tensor's pointers"
    return r


def assert_covered_once(sizes, offsets=None, **kw):
    r = walk(sizes, offsets, **kw)
    counts = r["counts"]
    assert counts.shape == (sum(sizes),)
    if counts.size:
        bad = np.flatnonzero(counts != 1)
        assert bad.size == 0, (
            f"{bad.size} elements not visited exactly once; first global index {bad[0]} "
            f"visited {counts[bad[0]]} times"
        )
    return r


# ---------------------------------------------------------------------------------------------
# Geometry the launcher uses


@pytest.mark.parametrize("sm_count", [1, 108, 132])
@pytest.mark.parametrize("total", [1, CHUNK - 1, CHUNK, CHUNK + 1, 10**6, 2**28])
def test_launcher_geometry(sm_count, total):
    r = _core._plan_coverage([total], sm_count=sm_count, chunks=[0])
    chunks = -(-total // CHUNK)
    assert (r["chunk"], r["block"], r["num_chunks"]) == (CHUNK, BLOCK, chunks)
    assert r["grid"] == min(chunks, sm_count * BLOCKS_PER_SM)


def test_empty_call_has_no_grid():
    r = walk([0, 0, 0])
    assert r["num_chunks"] == 0 and r["grid"] == 0 and r["counts"].size == 0
    assert r["launches"] == []


# ---------------------------------------------------------------------------------------------
# Launch groups and chunks per tensor


def test_small_tensors_get_a_block_each():
    """The review's case: 5,000 tensors of 17 elements on a 132-SM GPU. One chunk (one block)
    per tensor, 9 launches of at most 576 tensors; each launch's grid covers its chunks in one
    wave of blocks, so no block walks more than one span."""
    sizes = [17] * 5000
    r = assert_covered_once(sizes)
    assert r["num_chunks"] == 5000
    launches = r["launches"]
    assert len(launches) == -(-5000 // GROUP)
    assert [t for l in launches for t in l["tensors"]] == list(range(5000))
    for l in launches:
        assert len(l["tensors"]) <= GROUP
        assert l["num_chunks"] == len(l["tensors"]) == l["grid"]
        assert list(l["chunk_starts"]) == list(range(len(l["tensors"]) + 1))


@pytest.mark.parametrize("group", [1, 2, 3, 7, 0])
def test_groups_leave_out_empty_tensors(group):
    sizes = [0, 5, 0, 0, CHUNK + 1, 3, 0, 2 * CHUNK, 1, 0]
    r = assert_covered_once(sizes, group=group)
    g = group or GROUP
    nonempty = [t for t, s in enumerate(sizes) if s > 0]
    launches = r["launches"]
    assert [t for l in launches for t in l["tensors"]] == nonempty
    assert [len(l["tensors"]) for l in launches] == [
        min(g, len(nonempty) - k) for k in range(0, len(nonempty), g)]
    for l in launches:
        want = chunk_starts([sizes[t] for t in l["tensors"]])
        assert list(l["chunk_starts"]) == list(want)
        assert l["num_chunks"] == want[-1]


@pytest.mark.parametrize("n_tensors", [GROUP - 1, GROUP, GROUP + 1, 2 * GROUP + 5])
def test_group_boundaries(n_tensors):
    sizes = [(t % 7) * 3 + 1 for t in range(n_tensors)]
    r = assert_covered_once(sizes, itemsize=8)
    assert len(r["launches"]) == -(-n_tensors // GROUP)
    assert max(len(l["tensors"]) for l in r["launches"]) <= GROUP


def test_large_tensor_chunks_stay_in_their_tensor():
    """A chunk never spans two tensors: every visit of chunk c is in the tensor that
    chunk_starts names, at local indices (c - start) * chunk ...."""
    sizes = [CHUNK + 5, 3, 2 * CHUNK - 1]
    starts = chunk_starts(sizes)
    for c in range(int(starts[-1])):
        r = walk(sizes, chunks=[c], itemsize=4)
        t = int(np.searchsorted(starts, c, side="right") - 1)
        lo = (c - starts[t]) * CHUNK
        hi = min(lo + CHUNK, sizes[t])
        v = r["visits"]
        assert set(v[:, 0]) == {t}
        idx = np.sort(np.concatenate([np.arange(i, i + w) for _, i, w in v]))
        assert np.array_equal(idx, np.arange(lo, hi))


# ---------------------------------------------------------------------------------------------
# Coverage: exactly once


SIZES = [
    [1], [3], [4], [5], [7], [8], [9], [15], [16], [17],
    [CHUNK - 1], [CHUNK], [CHUNK + 1], [2 * CHUNK + 3], [4099], [2**20 + 3],
    [0], [0, 0, 5, 0], [5, 0, 0, 0], [0, 0, 0, 7],
    [CHUNK - 1, 1, CHUNK, CHUNK + 1, 0, 2],  # tensors ending exactly on chunk boundaries
    [1] * 300,  # many tensors in one chunk
    [3, 2**16 + 1, 7, 0, 4095],
]


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}t-{sum(s)}e")
def test_aligned_tensors(sizes, itemsize):
    assert_covered_once(sizes, itemsize=itemsize)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_same_misalignment_in_every_slot(shift, itemsize):
    """Slices of one buffer at the same odd element offset: a scalar head, then vectors."""
    sizes = [1, 2, 3, 5, 4099, CHUNK + 7]
    offsets = [shift * itemsize % 16] * len(sizes)
    r = assert_covered_once(sizes, offsets, itemsize=itemsize)
    assert r["vector_visits"] > 0


@pytest.mark.parametrize("itemsize", [4, 8])
def test_relative_misalignment_is_scalar(itemsize):
    """Slots misaligned relative to each other cannot share 16-byte accesses: all scalar."""
    offsets = [[0, itemsize, 0, 0, 0]]
    r = assert_covered_once([4099], offsets, itemsize=itemsize)
    assert r["vector_visits"] == 0 and r["scalar_visits"] == 4099


@pytest.mark.parametrize("itemsize", [4, 8])
def test_pointer_not_aligned_to_itemsize_is_scalar(itemsize):
    """A byte offset that is not a multiple of the itemsize (never accepted by the bindings)
    still gets a correct, all-scalar walk."""
    r = assert_covered_once([1000], [[2, 2, 2, 2, 2]], itemsize=itemsize)
    assert r["vector_visits"] == 0


@pytest.mark.parametrize("slot_mask", [0b00011, 0b00111, 0b01111, 0b11111, 0b10101])
def test_only_used_slots_decide_alignment(slot_mask):
    # Unused slots are misaligned; they must not force the scalar path.
    offsets = [[0 if slot_mask >> s & 1 else 4 for s in range(5)]]
    r = assert_covered_once([4096], offsets, slot_mask=slot_mask)
    assert r["vector_visits"] == 1024 and r["scalar_visits"] == 0


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("size", [1, 3, 4, 5, CHUNK - 1, CHUNK + 3, 3 * CHUNK + 2, 100_003])
@pytest.mark.parametrize("shift", [0, 1])
def test_vector_path_used_wherever_possible(size, shift, itemsize):
    """One tensor, all slots at the same offset: per chunk span, a head of at most
    (16 - offset) / itemsize elements, then whole vectors, then a tail shorter than a vector."""
    w = vec_width(itemsize)
    r = assert_covered_once([size], [shift * itemsize], itemsize=itemsize)
    want_vec = want_scalar = 0
    for lo in range(0, size, CHUNK):
        hi = min(lo + CHUNK, size)
        head = min((-(shift + lo)) % w, hi - lo)
        want_vec += (hi - lo - head) // w
        want_scalar += head + (hi - lo - head) % w
    assert (r["vector_visits"], r["scalar_visits"]) == (want_vec, want_scalar)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("n_tensors", [1, 2, 10, 100, 1000, 5000])
def test_many_tensors_odd_sizes_misaligned(n_tensors, itemsize):
    """1..5,000 tensors of odd sizes (some empty), each slot at its own element offset."""
    rng = np.random.default_rng(n_tensors * 10 + itemsize)
    sizes = (rng.integers(0, 2048, size=n_tensors) * 2 + 1).tolist()
    for k in rng.choice(n_tensors, size=n_tensors // 10, replace=False):
        sizes[k] = 0
    w = vec_width(itemsize)
    # Half the tensors: every slot at the same offset (vectorisable after a head); the other
    # half: independent offsets (mostly scalar).
    offsets = []
    for t in range(n_tensors):
        if t % 2:
            offsets.append(int(rng.integers(0, w)) * itemsize)
        else:
            offsets.append([int(x) * itemsize for x in rng.integers(0, w, size=5)])
    assert_covered_once(sizes, offsets, itemsize=itemsize)


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("block", [1, 2, 3, 32])
@pytest.mark.parametrize("grid", [1, 2, 7])
def test_small_geometry_grid_stride(chunk, block, grid):
    """Chunks that are not multiples of the vector width, more chunks than blocks (the
    grid-stride loop), fewer threads than elements of a span."""
    sizes = [5, 0, 1, 17, 3, 0, 64, 9, 2]
    offsets = [4, 0, [0, 4, 0, 0, 0], 8, 12, 0, 0, [4, 4, 4, 4, 4], 0]
    assert_covered_once(sizes, offsets, chunk=chunk, block=block, grid=grid)


@pytest.mark.parametrize("grid", [1, 5, 1000])
def test_grid_larger_or_smaller_than_chunks(grid):
    sizes = [CHUNK * 3 + 1, 77, CHUNK - 5]
    assert_covered_once(sizes, grid=grid)


# ---------------------------------------------------------------------------------------------
# 64-bit indexing (nothing allocated: chunk walks)


def _elements(starts, widths):
    """Global indices start .. start + width - 1 of every visit, concatenated."""
    starts = np.asarray(starts, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    first = np.repeat(np.cumsum(widths) - widths, widths)
    return np.repeat(starts, widths) + (np.arange(int(widths.sum()), dtype=np.int64) - first)


def _assert_visits_cover(r, sizes, chunks):
    """The visits of a sparse walk cover exactly the elements of `chunks`, each once: chunk c
    is the part [(c - starts[t]) * chunk, ...) of the tensor t that holds it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)])
    nonempty = np.flatnonzero(sizes > 0)
    starts = chunk_starts(sizes.tolist(), r["chunk"])
    v = r["visits"]
    covered = np.sort(_elements(off[v[:, 0]] + v[:, 1], v[:, 2]))
    chunks = np.asarray(chunks, dtype=np.int64)
    k = np.searchsorted(starts, chunks, side="right") - 1
    t = nonempty[k]
    lo = (chunks - starts[k]) * r["chunk"]
    hi = np.minimum(lo + r["chunk"], sizes[t])
    want = np.sort(_elements(off[t] + lo, hi - lo))
    assert covered.size == want.size, "some elements of the walked chunks were missed or doubled"
    assert np.array_equal(covered, want)


def _check_chunks(sizes, chunks, itemsize=4, chunk=0, offsets=None):
    r = walk(sizes, offsets, itemsize=itemsize, chunks=chunks, chunk=chunk)
    _assert_visits_cover(r, sizes, chunks)
    return r


BIG = [3, 2**31 - 5, 2**32 + 7, 2**20 + 1]  # 6.4e9 elements; tensor boundaries near 2^31


@pytest.mark.parametrize("itemsize", [4, 8])
def test_index_math_beyond_2_31(itemsize):
    starts = chunk_starts(BIG)
    last = int(starts[-1]) - 1
    near = []
    for t in range(len(BIG)):  # the first and last chunks of each tensor, and their neighbours
        near += [starts[t] - 1, starts[t], starts[t] + 1, starts[t + 1] - 2, starts[t + 1] - 1]
    for local in (2**31, 2**32):  # local element indices past 2^31 and 2^32 in tensor 2
        c = starts[2] + local // CHUNK
        near += [c - 1, c, c + 1]
    chunks = sorted({int(c) for c in near if 0 <= c <= last})
    r = _check_chunks(BIG, chunks, itemsize=itemsize)
    assert r["num_chunks"] == last + 1
    assert r["grid"] == 132 * BLOCKS_PER_SM
    # The last chunk reaches the very end of the last tensor.
    v = r["visits"]
    ends = v[:, 1] + v[:, 2]
    assert ends[v[:, 0] == 3].max() == BIG[3]
    assert ends[v[:, 0] == 2].max() == BIG[2]  # local indices past 2^32 in tensor 2


@pytest.mark.parametrize("itemsize", [4, 8])
def test_blocks_beyond_2_31(itemsize):
    """Whole blocks (the kernel's entry point, grid-stride loop included) of the launcher's
    plan for 6.4e9 elements: block b covers exactly chunks b, b + grid, b + 2 grid, ..."""
    r0 = _core._plan_coverage(BIG, itemsize=itemsize, chunks=[0])
    grid, num_chunks = r0["grid"], r0["num_chunks"]
    for b in (0, (num_chunks - 1) % grid, grid - 1):
        r = walk(BIG, itemsize=itemsize, blocks=[b])
        _assert_visits_cover(r, BIG, np.arange(b, num_chunks, grid))


def test_chunk_indices_beyond_2_31():
    """chunk=1: chunk numbers themselves pass 2^31 and 2^32."""
    chunks = [0, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, sum(BIG) - 1]
    r = _check_chunks(BIG, chunks, chunk=1)
    assert r["num_chunks"] == sum(BIG)
    assert r["visits"][-1].tolist() == [3, BIG[3] - 1, 1]  # the very last element


def test_misaligned_single_buffer_beyond_2_32():
    """One tensor of 2^32 + 5 elements at an odd offset: vectors after the head, up to the end."""
    size = 2**32 + 5
    last = (size - 1) // CHUNK
    chunks = [0, 2**31 // CHUNK, 2**32 // CHUNK - 1, last]
    r = _check_chunks([size], chunks, offsets=[4])
    assert r["vector_visits"] > 0


def test_dense_walk_size_limit():
    with pytest.raises(ValueError, match="2\\^28"):
        _core._plan_coverage([2**28 + 1])


def test_hook_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _core._plan_coverage([4], itemsize=2)
    with pytest.raises(ValueError):
        _core._plan_coverage([4], slot_mask=0b10)
    with pytest.raises(ValueError):
        _core._plan_coverage([4], [0, 0])
    with pytest.raises(ValueError):
        _core._plan_coverage([4], chunks=[1])
    with pytest.raises(ValueError):
        _core._plan_coverage([4], blocks=[1])
    with pytest.raises(ValueError):
        _core._plan_coverage([4], chunks=[0], blocks=[0])
    with pytest.raises(ValueError, match="one launch"):
        _core._plan_coverage([4, 4], chunks=[0], group=1)
    with pytest.raises(ValueError, match="group"):
        _core._plan_coverage([4], group=GROUP + 1)
