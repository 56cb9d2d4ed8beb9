"""The CUDA launcher's host-side decisions (src/cuda/host_logic.h), on the CPU.

The launcher feeds these functions the CUDA runtime's answers; here every combination is fed
directly, GPU or not (the hooks are compiled into every build):

* Note [graph capture]: which capture states of the launch stream and of the other arrays'
  streams allow the call (its stream joins become graph edges) and which must be refused
  before anything is enqueued, with the stream named;
* Note [current device]: the launch switches device only when the thread has no context or
  one of another device, and then restores the saved context, never by cudaSetDevice(previous)
  (which would create device 0's context in a thread that had none).

The real runtime paths (cudaStreamGetCaptureInfo, cuCtxGetCurrent/SetCurrent) run only on a
GPU: tests/test_cuda.py's GPU tests.
"""

import pytest

from fastoptim import _core

NONE, ACTIVE, INVALID = ("none", 0), ("active", 7), ("invalidated", 7)


def problem(launch, *waits):
    return _core._cuda_capture_problem(launch, list(waits), [f"grads[{k}]" for k in range(len(waits))])


def test_no_capture_anywhere_is_fine():
    assert problem(NONE) == ""
    assert problem(NONE, NONE, NONE) == ""


def test_capture_of_the_launch_stream_alone_is_fine():
    """The metadata travels in the kernel parameters, so capturing the launch is safe."""
    assert problem(ACTIVE) == ""
    assert problem(ACTIVE, ("active", 7), ("active", 7)) == ""


def test_launch_captured_other_stream_not():
    msg = problem(ACTIVE, ("active", 7), NONE)
    assert "grads[1]" in msg and "not being captured" in msg and "params[0]" in msg


def test_other_stream_captured_launch_not():
    msg = problem(NONE, ("active", 3))
    assert "grads[0]" in msg and "is being captured" in msg


def test_two_different_captures():
    msg = problem(ACTIVE, ("active", 8))
    assert "grads[0]" in msg and "another CUDA graph capture" in msg


def test_invalidated_captures():
    assert "invalidated" in problem(INVALID)
    assert "invalidated" in problem(INVALID, NONE)
    msg = problem(ACTIVE, ("invalidated", 7))
    assert "grads[0]" in msg and "invalidated" in msg


def test_bad_hook_arguments():
    with pytest.raises(ValueError):
        _core._cuda_capture_problem(("capturing", 1), [], [])
    with pytest.raises(ValueError):
        _core._cuda_capture_problem(NONE, [NONE], [])


@pytest.mark.parametrize("target", [0, 1, 3])
def test_thread_without_context_switches_and_restores_none(target):
    """No current context (a fresh thread): cudaGetDevice would say 0 there. The launch sets
    the target device and afterwards restores 'no context', for target 0 as well."""
    assert _core._cuda_device_switch(False, 0, target) == (True, True)
    assert _core._cuda_device_switch(False, -1, target) == (True, True)


def test_context_of_the_target_device_is_left_alone():
    assert _core._cuda_device_switch(True, 2, 2) == (False, False)


def test_context_of_another_device_is_restored():
    assert _core._cuda_device_switch(True, 0, 1) == (True, True)
    assert _core._cuda_device_switch(True, 1, 0) == (True, True)
