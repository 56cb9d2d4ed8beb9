"""bench/bench_cpu.py: its case table is complete and matches bench/README.md, the per-step
scalars are what the README says, and a tiny run goes through (the script checks every
implementation against fastoptim.reference before timing)."""

import functools
import io
import itertools
import json
import re
import time
import types
from pathlib import Path

import numpy as np
import pytest

from fastoptim import _core

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "bench" / "README.md").read_text()


def test_every_rule_has_a_case(bench):
    """Each update rule of _core (ema is no optimizer) is benchmarked, with a NumPy class."""
    functions = {c.function for c in bench.CASES}
    missing = [r for r in _core.rules if r != "ema" and r + "_" not in functions]
    assert not missing, f"no bench/bench_cpu.py case for {missing} (bench/README.md: add a row)"
    for case in bench.CASES:
        assert case.numpy_class in bench.numpy_impl.__all__, case.key


def test_readme_traffic_table(bench):
    """The README's traffic table has one row per case, with its bytes and ceiling."""
    table = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[3].isdigit():
            ceiling = tuple(int(x) for x in re.match(r"\((\d+), (\d+)\)", cells[4]).groups())
            for key in re.findall(r"`(\w+)`", cells[0]):
                table[key] = (int(cells[3]), ceiling)
    assert table == {c.key: (c.bytes_per_element, c.ceiling_streams) for c in bench.CASES}


def test_readme_optimizers_option(bench):
    row = next(ln for ln in README.splitlines() if ln.startswith("| `--optimizers"))
    listed = re.search(r"a subset: `([^`]*)`", row).group(1).split()
    assert listed == list(bench.CASES_BY_KEY)


def test_asgd_scalars(bench):
    """ASGD: mu stays 1 with torch's t0 (no ax read); with t0 = 0 it is 1 for steps 1 and 2
    (untimed warm-up) and below 1 from step 3 on."""
    default = bench.CASES_BY_KEY["asgd"].per_step(bench.fastoptim)
    assert all(s["mu"] == 1.0 for s in itertools.islice(default, 5000))
    averaging = bench.CASES_BY_KEY["asgd_averaging"].per_step(bench.fastoptim)
    mus = [s["mu"] for s in itertools.islice(averaging, 5)]
    assert mus == [1.0, 1.0, 0.5, 1 / 3, 0.25]


def test_functional_carries_scalars(bench):
    """The benchmark's NAdam calls pass mu_product as a stateful caller does."""
    case = bench.CASES_BY_KEY["nadam"]
    seen = []

    @functools.wraps(bench.fastoptim.nadam_)  # its signature: the defaults per_step completes
    def nadam_(*args, **kwargs):
        seen.append(kwargs)

    module = type("Recorder", (), {"nadam_": staticmethod(nadam_)})
    update = case.functional(module, {"param": 0, "grad": 0, "exp_avg": 0, "exp_avg_sq": 0})
    for _ in range(bench.AHEAD + 2):  # across a chunk boundary
        update()
    product = 1.0
    for step, kw in enumerate(seen, 1):
        product *= bench.fastoptim.functional.nadam_mu(step, 0.9, 4e-3)
        assert (kw["step"], kw["mu_product"], kw["lr"]) == (step, product, bench.LR)


def test_smoke(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--sizes", "1000,3x100", "--threads", "1", "--reps", "1",
                       "--min-time", "0.001", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    rows = doc["results"]
    # Every row is in cache (a few KiB): its % of ceiling is marked, with the footnote; ASGD's
    # ceiling counts its own 20 bytes (a footnote says so).
    assert all(r["in_cache"] for r in rows)
    assert f"{bench.IN_CACHE_MARK} in cache:" in printed
    assert "ASGD 20 B per element" in printed
    assert doc["config"]["in_cache_rule"]["mark"] == bench.IN_CACHE_MARK
    assert doc["remeasured_rows"] == [
        {"optimizer": r["optimizer"], "size": r["size"], "threads": r["threads"],
         "because": r["remeasured_because"]} for r in rows if r["remeasured"]]
    for r in rows:
        case = bench.CASES_BY_KEY[r["optimizer"]]
        assert r["ceiling_bytes_per_element"] == case.ceiling_bytes_per_element
        for impl, gbps in r["gbps"].items():
            want = r["elements"] * bench.column_bytes(case, impl) / r["median_s"][impl] / 1e9
            assert gbps == pytest.approx(want), (r["optimizer"], impl)
    assert {(r["optimizer"], r["size"]) for r in rows} == {
        (c.key, s) for c in bench.CASES for s in ("1000", "3x100")}
    assert all(r["finite"] for r in rows) and not doc["nonfinite"]
    assert all(np.isfinite(r["median_s"]["fastoptim"]) for r in rows)
    # The machine's load at the start, per thread-count pass and at the end.
    assert set(doc["load"]) == {"start", "passes", "end"} and set(doc["load"]["passes"]) == {"1"}
    assert doc["config"]["stall_rule"]["mark"] == bench.STALL_MARK
    assert doc["peak_rss_gib"] > 0 and doc["seconds"] > 0


def test_presets(bench):
    """The default run is the headline (README, bench/README.md); --full is every case at
    every size; --quick every case at in-cache sizes and the list; sizes, optimizers and
    repetitions override a preset's."""
    default = bench.parse_args([])
    assert default.preset == "default"
    assert [c.key for c in default.cases] == ["sgd_momentum", "rmsprop", "adam", "adamw",
                                              "nadam"]
    assert [s.label for s in default.sizes] == ["2^20", "2^24", "256x16384"]
    assert (default.reps, default.min_time) == (7, 0.1)
    assert 1 in default.threads
    full = bench.parse_args(["--full"])
    assert full.cases == bench.CASES and (full.reps, full.min_time) == (11, 0.2)
    assert [s.label for s in full.sizes] == [f"2^{k}" for k in range(16, 27, 2)] + ["2000x4096"]
    quick = bench.parse_args(["--quick"])
    assert quick.cases == bench.CASES and (quick.reps, quick.min_time) == (5, 0.05)
    assert [s.label for s in quick.sizes] == ["2^16", "2^18", "2^20", "256x16384"]
    mixed = bench.parse_args(["--full", "--optimizers", "lion", "--sizes", "2^10", "--reps", "3"])
    assert ([c.key for c in mixed.cases], [s.label for s in mixed.sizes], mixed.reps,
            mixed.min_time) == (["lion"], ["2^10"], 3, 0.2)
    with pytest.raises(SystemExit):
        bench.parse_args(["--full", "--quick"])


def stats(median, fastest=None):
    return {"median_s": median, "min_s": fastest or median, "slow_fraction": 0.0}


def test_stall_reasons(bench):
    """Note [stalled cells]: a median over 2x the fastest call, or at N > 1 threads over 1.5x
    the same implementation's 1-thread median."""
    cell = {"fastoptim": stats(1e-3, 0.9e-3), "torch_fused": stats(8e-3, 0.1e-3),
            "torch_foreach": stats(55e-3, 52e-3), "ceiling": stats(1.4e-3, 1.3e-3)}
    one = {"fastoptim": 1e-3, "torch_fused": 0.4e-3, "torch_foreach": 1e-3, "ceiling": 1e-3}
    assert set(bench.stall_reasons(cell, 2, one)) == {"torch_fused", "torch_foreach"}
    assert bench.stall_reasons(cell, 2, one)["torch_foreach"] == [
        "median 55.0x its 1-thread median"]
    assert set(bench.stall_reasons(cell, 1, {})) == {"torch_fused"}  # no 1-thread comparison
    assert set(bench.stall_reasons(cell, 2, {})) == {"torch_fused"}


def test_no_unmarked_ratio_from_a_stalled_figure(bench):
    """Every figure derived from a stalled implementation carries the mark; the others not."""
    case, size = bench.CASES_BY_KEY["adam"], bench.parse_size("2^20")
    cell = {"fastoptim": stats(1e-3), "numpy": stats(6e-3), "torch_foreach": stats(2e-3),
            "torch_fused": dict(stats(3e-1), stalled=["median 300x its 1-thread median"]),
            "ceiling": stats(1e-3)}
    row = bench.summarize(cell, case, size, 2)
    assert row["stalled"] == ["torch_fused"]
    assert row["stalled_figures"] == ["x_vs_torch_best", "x_vs_torch_fused"]
    line = bench.table_lines([row], 2)[-1]
    cells = line.replace("|", " ").split()
    assert cells[-3:] == ["6.0", "300.0" + bench.STALL_MARK, "2.0" + bench.STALL_MARK]
    assert "300.0" + bench.STALL_MARK in cells and cells.count(bench.STALL_MARK) == 0
    marked = [c for c in cells if c.endswith(bench.STALL_MARK)]
    assert marked == ["300.0" + bench.STALL_MARK] * 2 + ["2.0" + bench.STALL_MARK]
    # fastoptim stalled: every ratio and the % of ceiling are marked.
    cell["fastoptim"]["stalled"] = ["median 2.5x its fastest call"]
    row = bench.summarize(cell, case, size, 2)
    assert row["stalled_figures"] == ["pct_of_ceiling", "x_vs_numpy", "x_vs_torch_best",
                                      "x_vs_torch_fused"]
    cells = bench.table_lines([row], 2)[-1].replace("|", " ").split()
    assert all(c.endswith(bench.STALL_MARK) for c in cells[-4:])


def test_column_bytes(bench):
    """Note [traffic and ceiling]: each column's GB/s counts what that column moves. The
    ceiling loop moves (2 + S) streams read and (1 + S) written; ASGD (default) is the one case
    whose update moves less (ax written, not read): 16 bytes to the ceiling's 20."""
    asgd = bench.CASES_BY_KEY["asgd"]
    assert bench.column_bytes(asgd, "ceiling") == 20
    for impl in ("fastoptim", "numpy", "torch_foreach", "torch_fused"):
        assert bench.column_bytes(asgd, impl) == 16
    differ = set()
    for case in bench.CASES:
        reads, writes = case.ceiling_streams
        assert bench.column_bytes(case, "ceiling") == 4 * (reads + writes), case.key
        assert bench.column_bytes(case, "fastoptim") == case.bytes_per_element, case.key
        if case.ceiling_bytes_per_element != case.bytes_per_element:
            differ.add(case.key)
    assert differ == {"asgd"}


def test_ceiling_gbps_uses_its_own_bytes(bench):
    """ASGD's row: the ceiling's GB/s counts 20 bytes per element, fastoptim's 16, in the JSON
    and in the printed table; % of ceiling stays the ratio of the times."""
    case, size = bench.CASES_BY_KEY["asgd"], bench.parse_size("2^20")
    cell = {"fastoptim": stats(1e-3), "ceiling": stats(1e-3)}
    row = bench.summarize(cell, case, size, 1)
    n = size.total
    assert row["gbps"]["fastoptim"] == pytest.approx(n * 16 / 1e-3 / 1e9)
    assert row["gbps"]["ceiling"] == pytest.approx(n * 20 / 1e-3 / 1e9)
    assert (row["bytes_per_element"], row["ceiling_bytes_per_element"]) == (16, 20)
    assert row["pct_of_ceiling"] == pytest.approx(100)
    cells = bench.table_lines([row], 1)[-1].replace("|", " ").split()
    assert f"{n * 20 / 1e6:.1f}" in cells and f"{n * 16 / 1e6:.1f}" in cells


def test_in_cache_rows_are_marked(bench, monkeypatch):
    """Note [in-cache rows]: working set (param, grad, states) <= L2 per core x threads."""
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    l2 = 2**20
    adam, cent = bench.CASES_BY_KEY["adam"], bench.CASES_BY_KEY["rmsprop_centered_momentum"]
    small, list_, big = (bench.parse_size(t) for t in ("2^16", "4x16384", "2^18"))
    assert bench.working_set_bytes(adam, small) == 4 * 2**16 * 4  # 1 MiB
    assert bench.in_cache(adam, small, 1, l2) and bench.in_cache(adam, list_, 1, l2)
    assert not bench.in_cache(cent, small, 1, l2)  # 1.25 MiB: over one core's L2
    assert bench.in_cache(cent, small, 2, l2)  # two cores' L2
    mid = bench.parse_size("2^17")  # 2.5 MiB: over two cores' L2, under four
    assert not bench.in_cache(cent, mid, 4, l2)  # threads beyond the CPUs add no cache
    assert not bench.in_cache(adam, big, 2, l2)  # 4 MiB
    cell = {"fastoptim": stats(1e-3), "ceiling": stats(0.5e-3)}
    marked = bench.summarize(cell, adam, bench.parse_size("1000"), 1)
    plain = bench.summarize(cell, adam, bench.parse_size("2^24"), 1)
    assert marked["in_cache"] and not plain["in_cache"]
    assert bench.table_lines([marked], 1)[-1].split("|")[-1].split()[0] == \
        "50" + bench.IN_CACHE_MARK
    assert bench.table_lines([plain], 1)[-1].split("|")[-1].split()[0] == "50"
    # stalled and in cache: both marks
    cell["fastoptim"]["stalled"] = ["median 2.5x its fastest call"]
    row = bench.summarize(cell, adam, bench.parse_size("1000"), 1)
    assert bench.table_lines([row], 1)[-1].split("|")[-1].split()[0] == \
        "50" + bench.STALL_MARK + bench.IN_CACHE_MARK


def sleeper(seconds):
    """A callable that sleeps for the next of ``seconds`` at each call (the last one after)."""
    it = iter(seconds)
    last = [0.0]

    def call():
        last[0] = next(it, last[0])
        time.sleep(last[0])
    return call


def logged(log, name, fn):
    def call():
        log.append(name)
        fn()
    return call


def test_measure_cell_remeasures_the_whole_row_once(bench):
    """A row with a stalled implementation is measured again once, ALL its implementations
    interleaved (Note [stalled cells]): a transient stall leaves no mark, a lasting one is
    marked, and the figures kept all come from the second set (the first is returned whole
    for the JSON); calls far over their budget are cut short."""
    args = types.SimpleNamespace(reps=3, min_time=0.003)
    # Calls of 2 ms against a 1-thread median of 5 ms (margins for a loaded machine), stalls
    # of 60 ms: the budget is 3 x max(min_time, reps x 5 ms) = 45 ms.
    one = {"fastoptim": 5e-3, "transient": 5e-3, "lasting": 5e-3}
    log = []
    fns = {"fastoptim": logged(log, "f", sleeper([2e-3])),
           "transient": logged(log, "t", sleeper([60e-3, 2e-3])),
           "lasting": logged(log, "l", sleeper([2e-3, 60e-3]))}
    stats_, first = bench.measure_cell(fns, args, lambda: log.append("R"), {}, 2, one)
    assert set(first) == {"fastoptim", "transient", "lasting"}  # the whole first set
    assert "stalled" not in first["fastoptim"]
    assert first["transient"]["stalled"] and first["lasting"]["stalled"]
    assert first["transient"]["warmup_only"]  # its warm-up call alone was over the budget
    assert list(stats_) == list(fns)
    assert "stalled" not in stats_["fastoptim"] and "stalled" not in stats_["transient"]
    assert stats_["transient"]["calls"] == 3 and stats_["transient"]["median_s"] < 30e-3
    assert stats_["lasting"]["stalled"] and stats_["lasting"]["median_s"] > 50e-3
    # The first timed call is over the budget: the calls stop there.
    assert first["lasting"]["cut_short"] and first["lasting"]["calls"] == 1
    assert stats_["lasting"]["cut_short"] and stats_["lasting"]["calls"] == 1
    # Two measurements (a reset before each and before each repetition), the second one with
    # every implementation, interleaved: its last repetition runs f, t, l in the row's order.
    assert log.count("R") == 2 * (1 + args.reps)
    second = log[[i for i, x in enumerate(log) if x == "R"][1 + args.reps]:]
    assert {"f", "t", "l"} <= set(second)
    last_rep = log[len(log) - log[::-1].index("R"):]
    assert [x for i, x in enumerate(last_rep) if i == 0 or last_rep[i - 1] != x] == ["f", "t"]
    # (l is out of budget by then: cut short in its first repetition)
    assert stats_["fastoptim"] is not first["fastoptim"]


def test_measure_cell_keeps_a_hopeless_figure_marked(bench, monkeypatch):
    """A figure whose calls are over REMEASURE_MAX_CALL_S is not timed again: it keeps its
    first (marked) figure, the rest of the row is re-measured together; a row whose only
    stalled figure is such one is measured once."""
    monkeypatch.setattr(bench, "REMEASURE_MAX_CALL_S", 0.1)  # stalls of 60 ms: not
    args = types.SimpleNamespace(reps=3, min_time=0.003)
    one = {"fastoptim": 5e-3, "slow": 5e-3, "transient": 5e-3}
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.2)

    fns = {"fastoptim": sleeper([2e-3]), "slow": slow, "transient": sleeper([60e-3, 2e-3])}
    stats_, first = bench.measure_cell(fns, args, lambda: None, {}, 2, one)
    assert set(first) == set(fns) and calls["slow"] == 1  # its warm-up call only
    assert stats_["slow"]["stalled"] and stats_["slow"]["kept_from_first_set"]
    assert "stalled" not in stats_["transient"] and stats_["transient"]["calls"] == 3
    row = bench.summarize(dict(stats_, ceiling=stats(2e-3)), bench.CASES_BY_KEY["adam"],
                          bench.parse_size("2^20"), 2)
    assert row["stalled"] == ["slow"]
    # Only the hopeless one stalled: measured once, nothing to re-measure.
    stats_, first = bench.measure_cell({"fastoptim": sleeper([2e-3]), "slow": slow}, args,
                                       lambda: None, {}, 2, one)
    assert first == {} and stats_["slow"]["stalled"] and calls["slow"] == 2


def test_progress_lines_without_a_terminal(bench):
    out = io.StringIO()
    progress = bench.Progress(2, out)
    for what in ("a", "b"):
        progress.begin(what)
        progress.end(f"{what} done")
    progress.close()
    lines = out.getvalue().splitlines()
    assert [ln.split("]")[0] for ln in lines] == ["[  1/2", "[  2/2"]
    assert "\r" not in out.getvalue()


def test_load_meter(bench):
    meter = bench.LoadMeter()
    sample = meter.sample("now")
    assert sample["when"] == "now" and "loadavg" in sample
    if Path("/proc/stat").exists():
        assert sample["other_cpus"] >= 0 and sample["cpus"] >= 1
