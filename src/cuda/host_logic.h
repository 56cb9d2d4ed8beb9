// host_logic.h: the decisions the CUDA launcher takes on the host, as plain functions of
// plain values, so the tests exercise them on the CPU (_core._cuda_host_logic, plan_hooks.cpp)
// with every combination a GPU would rarely show. cuda_backend.cu feeds them the runtime's
// answers; nothing here calls CUDA.
#pragma once

#include <cstddef>
#include <string>

namespace fastoptim {
namespace cuda {

// Note [graph capture]
// A call may be enqueued while its stream is being captured into a CUDA graph
// (cudaStreamBeginCapture, torch.cuda.graph). Everything a launch needs travels in its
// parameters (Note [metadata in the parameters], kernels.cuh), which the graph stores by value,
// so a replay after any number of other calls reads the pointers of the captured call. What
// the launcher must still check is the cross-stream ordering: the launch stream waits for the
// other arrays' streams before the kernel and they wait for it afterwards (Note [stream
// joins], cuda_backend.cu), and CUDA allows such an edge only between streams of the SAME
// capture, or between two streams that are not capturing. capture_problem says why a call
// cannot be ordered, before anything is enqueued; the launcher then raises it.
enum class Capture { kNone = 0, kActive = 1, kInvalidated = 2 };
struct StreamCapture {
  Capture status = Capture::kNone;
  unsigned long long id = 0;  // the capture sequence, when kActive
};

// `launch`: the capture state of the launch stream (params[0]'s); waits[k], that of the k-th
// other stream, named wait_names[k] in the message. Empty when the call can be enqueued.
inline std::string capture_problem(const StreamCapture& launch, const StreamCapture* waits,
                                   const std::string* wait_names, size_t n_waits) {
  if (launch.status == Capture::kInvalidated)
    return "the stream of params[0] is in a CUDA graph capture that an earlier operation "
           "invalidated; end the capture (cudaStreamEndCapture) and capture again";
  for (size_t k = 0; k < n_waits; ++k) {
    const StreamCapture& w = waits[k];
    const std::string who = "the stream of " + wait_names[k];
    if (w.status == Capture::kInvalidated)
      return who + " is in a CUDA graph capture that an earlier operation invalidated";
    if (launch.status == Capture::kActive && w.status == Capture::kNone)
      return who + " is not being captured but the stream of params[0] is: a captured graph "
             "cannot be ordered with work outside it (use the capturing stream for every array, "
             "or make " + who + " join the capture first)";
    if (launch.status == Capture::kNone && w.status == Capture::kActive)
      return who + " is being captured but the stream of params[0] is not: an uncaptured "
             "launch cannot wait for captured work";
    if (launch.status == Capture::kActive && w.status == Capture::kActive && w.id != launch.id)
      return who + " belongs to another CUDA graph capture than the stream of params[0]";
  }
  return std::string();
}

// Note [current device]
// The launch makes the arrays' device current and then restores the thread's previous state.
// The previous state is the DRIVER's current context, which may be none: a thread that never
// used CUDA. cudaGetDevice reports device 0 there, and restoring with cudaSetDevice(0) would
// create device 0's primary context (hundreds of MB on every rank of a multi-GPU job), so the
// launcher saves and restores the context itself (cuCtxGetCurrent / cuCtxSetCurrent), and
// switches only when the thread has no context or one of another device.
struct DeviceSwitch {
  bool set_device;       // cudaSetDevice(target) before the launch
  bool restore_context;  // cuCtxSetCurrent(saved context, possibly none) after it
};
inline DeviceSwitch device_switch(bool has_context, int context_device, int target) {
  if (has_context && context_device == target) return {false, false};
  return {true, true};
}

}  // namespace cuda
}  // namespace fastoptim
