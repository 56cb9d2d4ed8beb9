"""The caller-runs pool (src/cpp/parallel.cpp): floating-point mode and fork safety.

A 2-thread update must equal the 1-thread update bitwise, whatever the caller's MXCSR
(flush-to-zero / denormals-are-zero) and whatever happened before (a fork). On a shared
2-core machine a pool worker may wake too late to run any chunk (parallel.h, Note [caller
runs]), so each check repeats an update until `_core._last_threads_used()` says a worker
took part, and skips with a reason if none did within the time limit.
"""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastoptim
from fastoptim import _core

N = 1 << 20  # 32 chunks of 2^15: large enough that a woken worker finds work left
WORKER_WAIT_S = 10.0


@pytest.fixture(autouse=True, scope="module")
def the_pool():
    """These tests are of fastoptim's own pool: where fastoptim.torch has installed its
    outside runner (Note [outside runner]; tests/test_runner.py tests that), take it out for
    the module and put it back after."""
    runner = getattr(sys.modules.get("fastoptim.torch"), "_X", None)
    had = _core._set_runner(None)
    yield
    if had:
        _core._set_runner(runner.runner)


def run_python(code, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=timeout)


def denormal_problem(seed=0):
    """float32 params and grads around 1e-39 (below the smallest normal, 1.18e-38): every
    result of an update is denormal, so FTZ/DAZ change every element."""
    rng = np.random.default_rng(seed)
    params = (rng.standard_normal(N) * 1e-39).astype(np.float32)
    grads = (rng.standard_normal(N) * 1e-39).astype(np.float32)
    assert np.count_nonzero(params) > N // 2
    return params, grads


def sgd_step(params, grads):
    p, buf = params.copy(), np.zeros_like(params)
    fastoptim.sgd_([p], [grads], [buf], step=1, lr=0.5, momentum=0.9)
    return p, buf


def adam_step(params, grads):
    p, m, v = params.copy(), np.zeros_like(params), np.zeros_like(params)
    fastoptim.adam_([p], [grads], [m], [v], step=1, lr=1e-3)
    return p, m, v


def results_at_threads(step, threads, params, grads):
    """`step` at `threads` threads, repeated until a pool worker ran a chunk (every repeat is
    checked by the caller); None if no worker took part within WORKER_WAIT_S."""
    saved = fastoptim.get_num_threads()
    fastoptim.set_num_threads(threads)
    try:
        runs = []
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            runs.append(step(params, grads))
            if threads == 1 or _core._last_threads_used() == threads:
                return runs
            if time.monotonic() > deadline:
                return None
    finally:
        fastoptim.set_num_threads(saved)


@pytest.mark.parametrize("step", [sgd_step, adam_step], ids=["sgd", "adam"])
@pytest.mark.parametrize("flush_denormal", [True, False], ids=["ftz_on", "ftz_off"])
def test_two_threads_follow_callers_denormal_mode(step, flush_denormal):
    # Bug A: workers kept the MXCSR they were created with. The pool already exists here
    # (created with the process's default mode unless an earlier test changed it); turning
    # FTZ/DAZ on afterwards made worker chunks differ from caller chunks.
    torch = pytest.importorskip("torch")
    params, grads = denormal_problem()
    results_at_threads(step, 2, params, grads)  # make sure the pool and its workers exist
    assert torch.set_flush_denormal(flush_denormal)
    try:
        (expected,) = results_at_threads(step, 1, params, grads)
        runs = results_at_threads(step, 2, params, grads)
    finally:
        torch.set_flush_denormal(False)
    if runs is None:
        pytest.skip(f"no pool worker ran a chunk within {WORKER_WAIT_S} s (machine busy)")
    if flush_denormal:  # the mode really changes the result (the test is not vacuous)
        assert not np.array_equal(expected[0], step(params, grads)[0])
    for got in runs:
        for e, g in zip(expected, got):
            assert np.array_equal(e.view(np.uint32), g.view(np.uint32))


def test_workers_started_under_ftz_follow_a_caller_without_it():
    # Bug A, other direction, in a fresh process: the workers are created while FTZ/DAZ is on
    # (a new thread inherits its creator's MXCSR), then the caller turns it off.
    pytest.importorskip("torch")
    code = f"""
    import sys, time, numpy as np, torch, fastoptim
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    from test_threads import denormal_problem, results_at_threads, sgd_step
    params, grads = denormal_problem(1)
    torch.set_flush_denormal(True)
    if results_at_threads(sgd_step, 2, params, grads) is None:
        print("skip"); sys.exit(0)
    torch.set_flush_denormal(False)
    (expected,) = results_at_threads(sgd_step, 1, params, grads)
    runs = results_at_threads(sgd_step, 2, params, grads)
    if runs is None:
        print("skip"); sys.exit(0)
    ok = all(np.array_equal(e.view(np.uint32), g.view(np.uint32))
             for got in runs for e, g in zip(expected, got))
    print("ok" if ok else "differ")
    """
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip(f"no pool worker ran a chunk within {WORKER_WAIT_S} s (machine busy)")
    assert out.stdout.strip() == "ok"


def test_fork_during_an_update_leaves_a_working_pool_in_the_child():
    # Bug C: a fork() while another thread was inside a multi-threaded update copied the
    # pool's held lock into the child, whose updates then all ran on one thread. A Python
    # thread runs large updates back to back (the GIL is released inside, so it is almost
    # always inside one when the main thread forks). The parent stops that thread right after
    # each fork, so the child has both cores while it checks that a worker takes part.
    code = f"""
    import os, threading, time, numpy as np, fastoptim
    from fastoptim import _core
    fastoptim.set_num_threads(2)
    p = np.zeros(1 << 23, np.float32); g = np.ones_like(p)

    def background(stop, started):
        while not stop.is_set():
            fastoptim.sgd_([p], [g], lr=1e-3)
            started.set()

    codes = []
    for trial in range(3):
        stop, started = threading.Event(), threading.Event()
        t = threading.Thread(target=background, args=(stop, started))
        t.start()
        started.wait()
        time.sleep(0.01)
        pid = os.fork()
        if pid == 0:
            x = np.zeros(1 << 21, np.float32); ones = np.ones_like(x)
            deadline = time.monotonic() + {WORKER_WAIT_S}
            used, k = 1, 0
            while used < 2 and time.monotonic() < deadline:
                _core.stream_rmw([x, ones], 1, 1.0); k += 1
                used = _core._last_threads_used()
            os._exit(0 if used == 2 and np.array_equal(x, np.full_like(x, k)) else 3)
        stop.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    print(codes)
    """
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 0, 0]"


def test_settings_change_while_updates_run():
    # Bug B: set_isa / set_num_threads wrote plain globals that updates running without the
    # GIL read at the same time (a data race: ThreadSanitizer reported both on the old code;
    # a plain run cannot see it). Updates must stay correct while another thread flips them.
    import threading
    saved_isa, saved_threads = fastoptim.backend_info()["isa"], fastoptim.get_num_threads()
    isas = fastoptim.backend_info()["isas_supported"]
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            fastoptim.set_isa(isas[i % len(isas)])
            fastoptim.set_num_threads(1 + i % 2)
            i += 1

    p = np.zeros(1 << 18, np.float32)
    g = np.ones_like(p)
    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(100):
            fastoptim.sgd_([p], [g], lr=1.0)
    finally:
        stop.set()
        t.join()
        fastoptim.set_isa(saved_isa)
        fastoptim.set_num_threads(saved_threads)
    assert np.array_equal(p, np.full_like(p, -100.0))
