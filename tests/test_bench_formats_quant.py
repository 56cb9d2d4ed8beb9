"""bench/bench_formats.py and bench/bench_quant.py: every row has its own in-place ceiling, the
fastest of its loops: the stream_rmw pattern closest to the row's bytes (ties to the fewest bytes
on arrays the row does not touch) and stream_bytes loops over exactly the row's own traffic,
timed in the same rounds; ratios whose samples spread are flagged; the torch peers are named
and given what the row gets (grad_scale); the JSON keeps every sample, the ceilings and the
load; bitsandbytes is optional and timed in several batches when it is there."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastoptim

pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_formats  # noqa: E402
import bench_quant  # noqa: E402

DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def run_script(script, *args, pythonpath=(), check=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [*map(str, pythonpath), str(Path(fastoptim.__file__).parents[1])]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, check=check, env=env)


def accepted_patterns():
    """Every dtype pattern stream_rmw takes (2 to 5 streams of float32 / bfloat16 / float16)."""
    out = []
    for k in range(2, 6):
        for dts in itertools.product(DTYPES, repeat=k):
            arrays = [np.ones(8, dt) for dt in dts]
            try:
                fastoptim._core.stream_rmw(arrays, k - 1, 0.0)
            except (TypeError, ValueError):  # an unsupported combination of dtypes
                continue
            out.append(dts)
    return out


def slot_bytes(dts):
    return [2 * dt.itemsize for dt in dts[:-1]] + [dts[-1].itemsize]


def least_other_bytes(dts, own):
    """The fewest bytes a stream_rmw of this dtype pattern moves on arrays outside `own`."""
    sizes = slot_bytes(dts)
    choices = [[name for name, a in own.items() if a.dtype == dt] + [None] for dt in dts]
    best = sum(sizes)
    for pick in itertools.product(*choices):
        names = [p for p in pick if p is not None]
        if len(names) == len(set(names)):
            best = min(best, sum(s for s, p in zip(sizes, pick) if p is None))
    return best


@pytest.fixture(scope="module")
def patterns():
    return accepted_patterns()


@pytest.fixture(scope="module", params=["formats", "quant"])
def rows(request):
    module = bench_formats if request.param == "formats" else bench_quant
    return module.build_rows(2**10)


def test_patterns_include_the_mixed_ones(patterns):
    """The probe sees the mixed-dtype patterns the ceilings use (a check of the probe)."""
    f32, bf16, f16 = DTYPES
    assert (f32, f32, bf16, bf16) in patterns and (bf16, bf16, f32, f32, f32) in patterns
    assert (f16, f16, f32, f32, f32) in patterns and (f32, bf16, f32) in patterns


def test_every_ceiling_is_the_closest_pattern(rows, patterns):
    """Each row's ceiling moves the bytes closest to the row's that any stream_rmw pattern can,
    and of those the fewest on arrays the row does not touch; all on arrays of the row's size."""
    for r in rows:
        c = r.ceiling.rmw
        own = {k: a for k, a in r.arrays.items() if a.dtype in DTYPES and a.size == 2**10}
        gap = abs(c.bytes_per_element - r.bytes_per_element)
        best_gap = min(abs(sum(slot_bytes(d)) - r.bytes_per_element) for d in patterns)
        assert gap == pytest.approx(best_gap), (r.name, c.describe(), best_gap)
        other = sum(s for s, name in zip(slot_bytes([a.dtype for a in c.arrays]), c.names)
                    if name not in r.arrays)
        least = min(least_other_bytes(d, own) for d in patterns
                    if abs(sum(slot_bytes(d)) - r.bytes_per_element) == pytest.approx(best_gap))
        assert other == least, (r.name, c.describe(), other, least)
        assert all(a.size == 2**10 for a in c.arrays), r.name
        assert c.key and c.bytes_per_element == sum(slot_bytes([a.dtype for a in c.arrays]))


def test_exact_ceilings_run_on_the_rows_own_arrays():
    """The rows a stream_rmw can mirror byte for byte get that loop on their own arrays."""
    rows = {r.name: r for r in bench_formats.build_rows(2**10)}
    for name in ("fp32", "bf16", "bf16 +kahan", "bf16/f32 states", "f32 master/bf16 grads+copy",
                 "fp16", "f32 master/fp16 grads+copy", "torch fused fp32", "torch fused bf16"):
        r = rows[name]
        assert r.ceiling.rmw.bytes_per_element == r.bytes_per_element, name
        assert set(r.ceiling.rmw.names) <= set(r.arrays), name
    # no float32-with-float16-states pattern: the bf16 arrays of another row stand in, same
    # bytes; that loop is shared (timed once a round), the stream_bytes loops are each row's
    assert rows["fp16/f32 states"].ceiling.rmw is rows["bf16/f32 states"].ceiling.rmw
    assert rows["f32 master/fp16 grads"].ceiling.rmw is rows["f32 master/bf16 grads"].ceiling.rmw
    assert rows["fp16/f32 states"].ceiling is not rows["bf16/f32 states"].ceiling
    assert rows["torch fused fp32 +grad_scale"].ceiling.rmw.bytes_per_element == 32
    quant = {r.name: r for r in bench_quant.build_rows(2**10)}
    for name in ("fastoptim fp32", "fastoptim states bf16", "fastoptim all-bf16"):
        r = quant[name]
        assert r.ceiling.rmw.bytes_per_element == r.bytes_per_element, name
        assert set(r.ceiling.rmw.names) <= set(r.arrays), name
    assert quant["fastoptim int8"].ceiling.rmw.bytes_per_element == 16


# The rows whose traffic no single in-place pass has (torch's step, then a copy that reads the
# param again): a stream_rmw loop only.
NO_EXACT = {"torch fp32 step + bf16 copy", "torch fp32 step + fp16 copy"}


def test_byte_loops_move_exactly_the_rows_traffic(rows):
    """Every other row's ceiling has one stream_bytes loop per shape, on the row's own arrays,
    each array read, written or both as the row does, and exactly the row's bytes (a quantized
    row's absmax, 4 bytes per block, is left out)."""
    for r in rows:
        loops = [x for x in r.ceiling.loops if not x.rmw]
        if r.name in NO_EXACT:
            assert not loops, r.name
            continue
        assert [x.shape for x in loops] == list(bench_formats.BYTE_SHAPES), r.name
        for x in loops:
            assert all(r.arrays[name] is a for name, a in zip(x.names, x.arrays)), r.name
            absmax = sum(a.nbytes * 2 for k, a in r.arrays.items() if k.endswith("absmax"))
            assert x.bytes_per_element == pytest.approx(r.bytes_per_element - absmax / 2**10), r.name
            assert set(x.names) | {k for k in r.arrays if k.endswith("absmax")} == set(r.arrays)
            # what each array does: grads and codes of the row as AdamW moves them
            for name, mode in zip(x.names, x.modes):
                if name in ("Cb", "Ch"):
                    assert mode == "w", (r.name, name)
                elif name in ("G", "G32", "Gb", "Gh", "HG", "G16"):  # Gs: torch unscales it
                    assert mode == "r", (r.name, name)
                else:
                    assert mode == "rw", (r.name, name)


def test_the_ceiling_is_the_fastest_loop():
    """summarize takes the fastest loop's GB/s (B/el x n / median), names it and keeps all."""
    slow = bench_formats.Loop(rmw=[("X", np.zeros(256, np.float32)), ("Y", np.zeros(256, np.float32))])
    fast = bench_formats.Loop(exact=[("X", np.zeros(256, np.float32), "rw")], shape=(0, 8))
    c = bench_formats.Ceiling(rmw_loop=slow)
    c.loops.append(fast)
    row = bench_formats.Row("row", 8, print, c, {"X": slow.arrays[0]})
    bench_formats.number_ceilings([row])
    assert (slow.key, fast.key) == ("c1.0", "c1.1")
    # slow: 12 B/el in 3 s -> 4 B/s x n; fast: 8 B/el in 1 s -> 8 B/s x n
    out = bench_formats.summarize([row], {"row": [2.0] * 3}, {"c1.0": [3.0] * 3, "c1.1": [1.0] * 3},
                                  1e9, 1)[0]
    assert out["ceiling_loop"] == fast.describe() and out["ceiling_gb_s"] == pytest.approx(8.0)
    assert out["pct_ceiling"] == pytest.approx(50.0)
    assert out["ceiling_loops"] == {fast.describe(): pytest.approx(8.0),
                                    slow.describe(): pytest.approx(4.0)}


def test_ceilings_leave_the_arrays_unchanged(rows):
    """stream_rmw with scale 0 rewrites every value as it was, stream_bytes every bit of what
    it reads: the rows' data survive (a write-only stream, a copy the row writes, is zeroed)."""
    for loop in {id(x): x for r in rows for x in r.ceiling.loops}.values():
        before = [a.copy() for a in loop.arrays]
        loop()
        for name, a, b, mode in zip(loop.names, loop.arrays, before, loop.modes):
            if mode == "w":
                assert not a.view(np.uint8).any(), (loop.describe(), name)
            else:
                assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (loop.describe(), name)


def test_peers_are_named_torch_rows():
    rows = {r.name: r for r in bench_formats.build_rows(2**10)}
    for r in rows.values():
        assert (r.peer is None) == r.name.startswith("torch"), r.name
        assert r.peer is None or r.peer in rows, r.name
    assert rows["bf16/f32 states"].peer == "torch fused bf16"
    assert rows["fp32 +grad_scale"].peer == "torch fused fp32 +grad_scale"
    assert rows["f32 master/fp16 grads+copy"].peer == "torch fp32 step + fp16 copy"
    quant = {r.name: r for r in bench_quant.build_rows(2**10)}
    assert quant["fastoptim bf16p-int4"].peer == "torch fused all-bf16"
    assert quant["fastoptim int4"].peer == "torch fused fp32"


def test_torch_grad_scale_peer_unscales():
    """The torch +grad_scale row runs torch's fused step with the scaler's grad_scale: its grads
    are the scaled ones before each batch and unscaled (in place) by a step."""
    row = next(r for r in bench_formats.build_rows(2**10)
               if r.name == "torch fused fp32 +grad_scale")
    row.before()
    g = row.arrays["Gs"]
    scaled = g.copy()
    row.fn()
    np.testing.assert_allclose(g, scaled / bench_formats.GRAD_SCALE, rtol=1e-6)
    row.before()
    np.testing.assert_array_equal(g, scaled)


class FakeCeiling:
    """A ceiling of one loop, itself."""

    def __init__(self, log, cid):
        self.log, self.id, self.key, self.loops = log, cid, cid, [self]

    def __call__(self):
        self.log.append(self.id)


def test_rounds_time_each_ceiling_beside_its_rows():
    """Each round: every row, and each ceiling once, right after the first row using it."""
    log = []
    c1, c2 = FakeCeiling(log, "c1"), FakeCeiling(log, "c2")
    rows = [bench_formats.Row(name, 4, (lambda name=name: log.append(name)), c, {})
            for name, c in (("a", c1), ("b", c2), ("c", c1))]
    row_s, ceil_s = bench_formats.interleaved_rounds(rows, 2)
    calls = bench_formats.CALLS + 1
    assert log == (["a"] * calls + ["c1"] * calls + ["b"] * calls + ["c2"] * calls
                   + ["c"] * calls) * 2
    assert all(len(v) == 2 for v in [*row_s.values(), *ceil_s.values()])


def test_spread_flags_ratios(capsys):
    """A ratio is flagged when the samples of either side spread more than 1.5x, or when a row
    runs more than 15% above its ceiling."""
    log = []
    c = FakeCeiling(log, "c1")
    c.bytes_per_element, c.names, c.rmw = 8, ["X"], True
    c.describe = lambda: "stream_rmw([X f32 | Y f32])"
    rows = [bench_formats.Row("peer", 8, print, c, {}),
            bench_formats.Row("row", 8, print, c, {}, peer="peer")]
    steady, stalled = [1.0, 1.1, 1.0], [1.0, 1.7, 1.0]
    out = bench_formats.summarize(rows, {"peer": stalled, "row": steady}, {"c1": steady}, 1, 1)
    assert out[1]["x_peer_unsteady"] and not out[1]["pct_ceiling_unsteady"]
    assert out[0]["x_peer"] is None and out[0]["samples_s"] == stalled
    out = bench_formats.summarize(rows, {"peer": steady, "row": steady}, {"c1": [1.3] * 3}, 1, 1)
    assert out[1]["pct_ceiling_unsteady"] and not out[1]["x_peer_unsteady"]  # 130% of ceiling
    bench_formats.print_table("t", out, [c], 3)
    text = capsys.readouterr().out
    assert "130%*" in text and "x peer 1.00\n" in text and "(2 flagged)" in text
    assert bench_formats.spread([2.0, 1.0]) == 2.0


def test_busy_note():
    cpus = bench_formats.usable_cpus()
    assert bench_formats.busy_note([cpus - 0.5] * 3, [0.0] * 3) == ""
    assert "BUSY" in bench_formats.busy_note([0.0] * 3, [cpus + 1.0] * 3)


def test_results_path_is_new_each_run():
    path = bench_formats.results_path("formats", 24, [1, 2], None)
    assert os.path.dirname(path) == bench_formats.RESULTS
    assert os.path.basename(path).startswith("formats_2e24_t1-2_") and path.endswith(".json")
    assert bench_formats.results_path("formats", 24, [1], "x.json") == "x.json"
    assert bench_formats.parse_args([]).reps >= 7


def check_doc(doc, threads, rounds, names):
    assert doc["threads"] == threads and len(doc["load_start"]) == 3 and len(doc["load_end"]) == 3
    assert [p["threads"] for p in doc["passes"]] == threads
    for p in doc["passes"]:
        assert len(p["load_start"]) == 3 and isinstance(p["busy"], bool)
        for loops in p["ceilings"].values():
            assert [x["gb_s"] for x in loops] == sorted((x["gb_s"] for x in loops), reverse=True)
            for c in loops:
                assert len(c["samples_s"]) == rounds and c["gb_s"] > 0 and c["bytes_per_element"] > 0
    assert {d["row"] for d in doc["rows"]} == set(names)
    for d in doc["rows"]:
        assert len(d["samples_s"]) == rounds and len(d["ceiling_samples_s"]) == rounds
        assert d["ceiling_gb_s"] > 0 and d["pct_ceiling"] == pytest.approx(
            100 * d["gb_s"] / d["ceiling_gb_s"])
        assert d["ceiling_gb_s"] == max(d["ceiling_loops"].values())
        assert d["ceiling_loops"][d["ceiling_loop"]] == d["ceiling_gb_s"]


def test_bench_formats_runs_and_writes_json(tmp_path):
    out = tmp_path / "formats.json"
    text = run_script("bench_formats.py", "--log2", "10", "--reps", "2", "--threads", "1",
                      "--out", str(out)).stdout
    names = [r.name for r in bench_formats.build_rows(2**10)]
    check_doc(json.loads(out.read_text()), [1], 2, names)
    lines = [line for line in text.splitlines() if line.startswith("threads 1 ")]
    assert len(lines) == len(names), text
    for line in lines:
        assert " B/el " in line and " GB/s | " in line and "%" in line, line
    assert "x torch fused bf16 " in next(x for x in lines if " bf16/f32 states " in x)
    assert "% ceil = the row's GB/s / its ceiling's GB/s" in text
    assert "a ceiling is the fastest of its loops" in text and "      > stream_" in text
    assert f"wrote {out}" in text


def test_bench_quant_writes_json_and_skips_bitsandbytes(tmp_path):
    if bench_quant.import_bitsandbytes() is not None:
        pytest.skip("bitsandbytes is installed")
    out = tmp_path / "quant.json"
    text = run_script("bench_quant.py", "10", "--repeats", "2", "--threads", "1", "--no-memory",
                      "--out", str(out)).stdout
    doc = json.loads(out.read_text())
    check_doc(doc, [1], 2, [r.name for r in bench_quant.build_rows(2**10)])
    assert doc["elements"] == 2**10 and doc["bitsandbytes"] is None
    assert doc["passes"][0]["bitsandbytes"] is None
    assert "threads 1 bitsandbytes: not installed (optional), skipped" in text


def test_bench_quant_times_bitsandbytes_in_batches(tmp_path):
    """With a stand-in bitsandbytes (torch's AdamW behind its name) the optional row runs:
    --bnb-batches batches alternated with fastoptim int8, medians and samples in the JSON."""
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import optim\n__version__ = 'stand-in'\n")
    (fake / "optim.py").write_text(
        "import torch\n\n\ndef AdamW8bit(params, min_8bit_size=0, **kw):\n"
        "    return torch.optim.AdamW(params, **kw)\n")
    out = tmp_path / "quant.json"
    text = run_script("bench_quant.py", "10", "--repeats", "1", "--threads", "1", "--no-memory",
                      "--bnb-batches", "3", "--out", str(out),
                      pythonpath=[tmp_path / "fake"]).stdout
    assert "threads 1 bitsandbytes AdamW8bit:" in text and "medians of 3 alternated" in text, text
    doc = json.loads(out.read_text())
    assert doc["bitsandbytes"] == "stand-in"
    bnb = doc["passes"][0]["bitsandbytes"]
    assert len(bnb["samples_s"]) == 3 and len(bnb["int8_samples_s"]) == 3 and bnb["x_int8"] > 0
