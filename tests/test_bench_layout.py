"""bench/bench_layout.py: the arrays sit where it says, torch's step runs on that memory, the
implementations are timed interleaved with widely spread ratios marked, and a tiny run prints
one row per format, thread count and gap."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_layout.py"


@pytest.fixture(scope="module")
def layout():
    spec = importlib.util.spec_from_file_location("bench_layout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("itemsize,gap", [(2, 4096), (2, 65536), (4, 0), (4, 4160)])
def test_slices_are_placed_as_asked(layout, itemsize, gap):
    n = 1000
    buf = np.zeros(4 * (n * itemsize + gap) + 4096 + layout.HEADER, np.uint8)
    slices = layout.placed(buf, n, itemsize, gap)
    starts = [s.ctypes.data for s in slices]
    assert [s.nbytes for s in slices] == [n * itemsize] * 4
    assert starts[0] % 4096 == layout.HEADER
    assert np.diff(starts).tolist() == [n * itemsize + gap] * 3


def test_torch_step_updates_the_placed_memory(layout):
    pytest.importorskip("torch")
    n = 64
    buf = np.zeros(4 * (n * 2 + 4096) + 4096 + layout.HEADER, np.uint8)
    slices = layout.placed(buf, n, 2, 4096)
    p = slices[0].view(np.float16)
    for s, c in zip(slices, (1.0, 0.5, 0.0, 0.01)):
        s.view(np.float16)[...] = c
    step, check = layout.torch_step(slices, "fp16")
    step()
    check()
    # exp_avg = lerp(0, 0.5, 0.1), exp_avg_sq = 0.999 * 0.01 + 0.001 * 0.25, in the placed slices
    np.testing.assert_allclose(slices[2].view(np.float16), 0.05, rtol=1e-3)
    np.testing.assert_allclose(slices[3].view(np.float16), 0.01024, rtol=1e-3)
    assert p.ctypes.data == slices[0].ctypes.data


def test_timing_is_interleaved(layout):
    """One warm-up call each, then rounds of one batch of each in turn: a, b, a, b, ..."""
    log = []
    times = layout.interleaved_ms({"a": lambda: log.append("a"), "b": lambda: log.append("b")},
                                  3)
    k = layout.BATCH
    assert log == ["a", "b"] + (["a"] * k + ["b"] * k) * 3
    assert [len(v) for v in times.values()] == [3, 3]
    assert all(x >= 0 for v in times.values() for x in v)


def test_spread_marks_the_ratio(layout):
    """A ratio whose either side's batches spread over SPREAD_LIMIT carries SPREAD_MARK (the
    reviewer saw "x torch 164.72" unmarked: torch's batches had stalled under load)."""
    steady_fo, steady_t = [1.0, 1.1, 1.05], [2.0, 2.1, 2.2]
    text, marked = layout.ratio_cell(steady_t, steady_fo)
    assert not marked and text == f"{2.1 / 1.05:8.2f} "
    stalled_t = [2.0, 164.0, 170.0]
    text, marked = layout.ratio_cell(stalled_t, steady_fo)
    assert marked and text.endswith(layout.SPREAD_MARK)
    assert float(text.rstrip(layout.SPREAD_MARK)) == pytest.approx(164 / 1.05, abs=0.01)
    assert layout.ratio_cell(steady_t, [1.0, 1.6, 1.2])[1]  # fastoptim's side spread
    assert not layout.ratio_cell(steady_t, [1.0, 1.5])[1]  # at the limit: not marked


def number(cell, layout):
    return float(cell.rstrip(layout.SPREAD_MARK))


def run(*args):
    # the environment as it is: fastoptim imports in the child as it does here (a dev build on
    # PYTHONPATH, or the installed package in CI)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def test_tiny_run_prints_every_row(layout):
    out = run("--log2", "10", "--reps", "1", "--threads", "1", "2", "--gaps", "0", "4096")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in ("bf16", "fp16", "fp32")]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f, t, g) for f in ("bf16", "fp16", "fp32") for t in ("1", "2") for g in ("0", "4096")]
    torch_here = importlib.util.find_spec("torch") is not None
    for r in rows:
        assert len(r) == (6 if torch_here else 4), r
        assert all(number(x, layout) >= 0 for x in r[3:]), r
        assert all(not x.endswith(layout.SPREAD_MARK) for x in r[3:5]), r  # ms: unmarked
    if any(r[-1].endswith(layout.SPREAD_MARK) for r in rows):
        assert out.stdout.splitlines()[-1].startswith(layout.SPREAD_MARK + " after a ratio")


def test_bad_gap_is_refused():
    out = run("--log2", "10", "--gaps", "4098")
    assert out.returncode == 2
    assert "--gaps must be multiples of 4" in out.stderr


def test_dropin_run_prints_every_row_and_the_placement(layout):
    pytest.importorskip("torch")
    # 2^19 bf16 elements: 1 MiB arrays, so fastoptim.torch places its states (Note [state
    # placement]): 1024 and 2048 bytes past the param modulo a page
    out = run("--dropin", "--log2", "19", "--reps", "1", "--threads", "1", "2")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in ("bf16", "fp16", "fp32")]
    assert [(r[0], r[1]) for r in rows] == [(f, t) for f in ("bf16", "fp16", "fp32")
                                            for t in ("1", "2")]
    for r in rows:
        assert all(number(x, layout) >= 0 for x in r[2:6]), r
        assert " ".join(r).endswith("| 1024, 2048"), r
