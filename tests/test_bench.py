"""bench/bench_cpu.py: its case table is complete and matches bench/README.md, the per-step
scalars are what the README says, and a tiny run goes through (the script checks every
implementation against fastoptim.reference before timing)."""

import functools
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fastoptim import _core

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "bench" / "README.md").read_text()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "bench" / "bench_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve its annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


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


def test_smoke(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "1000,3x100", "--threads", "1", "--reps", "1", "--min-time",
                       "0.001", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert {(r["optimizer"], r["size"]) for r in rows} == {
        (c.key, s) for c in bench.CASES for s in ("1000", "3x100")}
    assert all(r["finite"] for r in rows) and not doc["nonfinite"]
    assert all(np.isfinite(r["median_s"]["fastoptim"]) for r in rows)
