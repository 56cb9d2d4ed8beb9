"""Fixtures shared by several test files."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's intra-op threads spin on tiny tensors and a shared machine (1 ms per sqrt): a
    module that uses this runs torch on one thread (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``) and restores the count after."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    """bench/bench_cpu.py as a module (test_bench.py, and its CASES line in bench/README.md,
    test_docs_examples.py)."""
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "bench" / "bench_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve its annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
