"""The outside runner (src/cpp/runner.h, Note [outside runner]).

Where fastoptim.torch loads the torch extension and that extension was built with torch's
OpenMP runtime, updates run on torch's intra-op threads instead of fastoptim's pool. Each
check here compares every element of every state with the 1-thread update and with the pool,
and asks `_core._last_run_outside()` which of the two ran it. On a shared 2-core machine a
thread may wake too late to run a chunk, so a check that needs two threads to take part
repeats the update until they did, and skips with a reason if they never did.
"""
import ctypes
import os
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as ft  # noqa: E402
from fastoptim import _core  # noqa: E402
from fastoptim.quant import QuantizedState  # noqa: E402

RUNNER = getattr(ft._X, "runner", None)
needs_runner = pytest.mark.skipif(
    RUNNER is None, reason="no OpenMP runner: the torch extension is not built for this torch, "
    "or this torch ships no libgomp beside its libraries (src/torch/torch.cmake)")

N = 1 << 20  # 32 chunks of 2^15
WAIT_S = 10.0


@pytest.fixture
def counts():
    """Restores fastoptim's and torch's thread counts, the runner and the denormal mode."""
    saved = (fastoptim.get_num_threads(), torch.get_num_threads(), _core._has_runner())
    yield
    fastoptim.set_num_threads(saved[0])
    torch.set_num_threads(saved[1])
    _core._set_runner(RUNNER if saved[2] else None)
    torch.set_flush_denormal(False)


def problem(kind, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    if kind == "adam":
        return p, g, np.zeros(N, np.float32), np.zeros(N, np.float32)
    if kind == "sgd":
        return p, g, rng.standard_normal(N).astype(np.float32)
    if kind == "adamw bf16":
        import ml_dtypes
        bf = ml_dtypes.bfloat16
        return (p.astype(bf), g.astype(bf), np.zeros(N, bf), np.zeros(N, bf))
    if kind == "adam int8":
        return (p, g, QuantizedState.zeros((N,), 8),
                QuantizedState.zeros((N,), 8, non_negative=True))
    raise AssertionError(kind)


def step(kind, arrays):
    """Two steps in place on copies of `arrays`; returns every array after them."""
    out = [a.copy() for a in arrays]
    for k in (1, 2):
        if kind == "sgd":
            fastoptim.sgd_(out[0], out[1], out[2], step=k, lr=0.1, momentum=0.9, nesterov=True)
        elif kind == "adamw bf16":
            fastoptim.adamw_(*out, step=k, lr=1e-2, weight_decay=0.1)
        else:
            fastoptim.adam_(*out, step=k, lr=1e-2, weight_decay=0.01)
    return out


def as_arrays(out):
    return [x for a in out for x in ((a.codes, a.absmax) if isinstance(a, QuantizedState)
                                     else (a,))]


def run_until(kind, arrays, outside, threads):
    """`step` until its last call ran on the runner (outside) or the pool with `threads`
    threads taking part; None if that did not happen within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        out = step(kind, arrays)
        if _core._last_run_outside() == outside and _core._last_threads_used() == threads:
            return out
        if time.monotonic() > deadline:
            return None


@needs_runner
def test_fastoptim_torch_installs_the_runner():
    if os.environ.get("FASTOPTIM_TORCH_OPENMP") == "0":
        pytest.skip("FASTOPTIM_TORCH_OPENMP=0 in this environment")
    assert _core._has_runner()


@needs_runner
@pytest.mark.parametrize("setting, installed", [("0", False), ("1", True), (None, True)])
def test_fastoptim_torch_openmp_turns_the_runner_off(setting, installed):
    env = {k: v for k, v in os.environ.items() if k != "FASTOPTIM_TORCH_OPENMP"}
    if setting is not None:
        env["FASTOPTIM_TORCH_OPENMP"] = setting
    code = ("import fastoptim.torch\nfrom fastoptim import _core\n"
            "print(_core._has_runner())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(installed)


@needs_runner
@pytest.mark.parametrize("kind", ["adam", "sgd", "adamw bf16", "adam int8"])
def test_the_runner_gives_the_bits_of_one_thread_and_of_the_pool(counts, kind):
    arrays = problem(kind)
    fastoptim.set_num_threads(1)
    one = as_arrays(step(kind, arrays))
    assert not _core._last_run_outside()
    fastoptim.set_num_threads(2)
    torch.set_num_threads(2)
    _core._set_runner(RUNNER)
    outside = run_until(kind, arrays, True, 2)
    _core._set_runner(None)
    pool = run_until(kind, arrays, False, 2)
    if outside is None or pool is None:
        pytest.skip("two threads never both ran a chunk within the time limit (busy machine)")
    for name, got in (("runner", as_arrays(outside)), ("pool", as_arrays(pool))):
        for a, b in zip(got, one):
            assert a.tobytes() == b.tobytes(), name


@needs_runner
def test_the_runner_declines_what_it_cannot_serve(counts):
    arrays = problem("adam")
    _core._set_runner(RUNNER)
    for torch_threads, fo_threads in ((1, 2), (2, 3), (2, 1)):
        torch.set_num_threads(torch_threads)
        fastoptim.set_num_threads(fo_threads)
        for _ in range(3):
            step("adam", arrays)
            assert not _core._last_run_outside(), (torch_threads, fo_threads)
    torch.set_num_threads(2)
    fastoptim.set_num_threads(2)
    small = [a[:1024].copy() for a in arrays]  # one chunk: no second thread at all
    step("adam", small)
    assert not _core._last_run_outside() and _core._last_threads_used() == 1
    step("adam", arrays)
    assert _core._last_run_outside()
    _core._set_runner(None)
    step("adam", arrays)
    assert not _core._last_run_outside()


@needs_runner
def test_the_runners_threads_follow_the_callers_denormal_mode(counts):
    """Every result of this update is denormal, so flush-to-zero changes every element; the
    OpenMP threads must run their chunks in the caller's mode (Note [floating-point mode])."""
    rng = np.random.default_rng(1)
    p = (rng.standard_normal(N) * 1e-39).astype(np.float32)
    g = (rng.standard_normal(N) * 1e-39).astype(np.float32)
    arrays = (p, g, np.zeros(N, np.float32))
    for flush in (True, False):
        torch.set_flush_denormal(flush)
        fastoptim.set_num_threads(1)
        one = step("sgd", arrays)
        fastoptim.set_num_threads(2)
        torch.set_num_threads(2)
        _core._set_runner(RUNNER)
        outside = run_until("sgd", arrays, True, 2)
        if outside is None:
            pytest.skip("two threads never both ran a chunk within the time limit")
        for a, b in zip(outside, one):
            assert a.tobytes() == b.tobytes(), flush
        assert (np.count_nonzero(one[0]) == 0) == flush  # the mode did matter


@needs_runner
def test_a_forked_child_forgets_the_runner_and_uses_the_pool(counts):
    arrays = problem("adam")
    fastoptim.set_num_threads(1)
    one = step("adam", arrays)
    fastoptim.set_num_threads(2)
    torch.set_num_threads(2)
    _core._set_runner(RUNNER)
    step("adam", arrays)  # (the OpenMP threads exist in the parent)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 if it kept no runner and updates right
        code = 3
        try:
            out = step("adam", arrays)
            same = all(a.tobytes() == b.tobytes() for a, b in zip(out, one))
            code = 0 if not _core._has_runner() and same and not _core._last_run_outside() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert _core._has_runner()  # the parent keeps its runner


@needs_runner
def test_a_drop_in_step_is_the_same_with_and_without_the_runner(counts):
    torch.manual_seed(0)
    a = [torch.randn(1 << 16, requires_grad=True) for _ in range(20)]
    b = [t.detach().clone().requires_grad_() for t in a]
    opt_a, opt_b = ft.AdamW(a, lr=1e-2), ft.AdamW(b, lr=1e-2)
    fastoptim.set_num_threads(2)
    torch.set_num_threads(2)
    ran_outside = False
    for _ in range(3):
        for ta, tb in zip(a, b):
            ta.grad = torch.randn_like(ta)
            tb.grad = ta.grad.clone()
        _core._set_runner(RUNNER)
        opt_a.step()
        ran_outside = ran_outside or _core._last_run_outside()
        _core._set_runner(None)
        opt_b.step()
        assert not _core._last_run_outside()
    assert ran_outside
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[ta][k], opt_b.state[tb][k])


@needs_runner
def test_backend_info_says_which_threads_run_updates(counts):
    _core._set_runner(RUNNER)
    assert fastoptim.backend_info()["threading"].startswith("torch's OpenMP threads")
    _core._set_runner(None)
    assert fastoptim.backend_info()["threading"] == "caller-runs pool"


def test_set_runner_takes_only_its_capsule_or_none(counts):
    with pytest.raises(TypeError, match="runner must be a fastoptim._runner capsule or None, "
                                        "got int"):
        _core._set_runner(3)
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    other = new_capsule(ctypes.cast(ctypes.pythonapi.Py_IncRef, ctypes.c_void_p), b"other", None)
    with pytest.raises(TypeError, match="got PyCapsule"):
        _core._set_runner(other)
    had = _core._has_runner()
    assert _core._set_runner(None) is had
    assert not _core._has_runner()
