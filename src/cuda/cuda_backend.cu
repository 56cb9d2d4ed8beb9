// cuda_backend.cu: the host side of the CUDA backend (cuda_api.h): device queries, the
// current device, streams, and the launches of a call.
//
// Note [static runtime]
// The module links the CUDA runtime statically (cuda.cmake), so it imports on a machine
// without a GPU driver; the first runtime call there fails and is reported (info(), or a
// RuntimeError when device arrays are passed). This runtime is not the one CuPy or torch
// load, but all of them use the driver's primary context of each device, so memory and
// streams are shared. The current context is per thread and also shared: launch() switches
// to the arrays' device and restores the thread's previous context (Note [current device] in
// host_logic.h).
//
// Note [stream joins]
// The launch stream is params[0]'s. Every other stream an array reports (CUDA Array Interface
// v3) is joined both ways: the launch stream waits for it before the first kernel (its
// producer's work on the array is done), and it waits for the launch stream after the last
// kernel (work that the user queues there next, such as zeroing or freeing the gradients,
// cannot overtake the update). Each join is an event record + cudaStreamWaitEvent, which a
// graph capture records as an edge (Note [graph capture] in host_logic.h). Nothing here
// allocates, copies or synchronizes: a call only enqueues.
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_api.h"
#include "host_logic.h"
#include "kernels.cuh"

#ifndef FASTOPTIM_CUDA_ARCHS
#define FASTOPTIM_CUDA_ARCHS ""
#endif

namespace fastoptim {
namespace cuda {
namespace {

[[noreturn]] void fail(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error so it is not reported again by a later call
  throw std::runtime_error(std::string("fastoptim CUDA: ") + what + " failed: " +
                           cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(what, e);
}

struct DeviceState {
  bool ready = false;
  int sm_count = 0;
  cudaEvent_t join = nullptr;           // Note [stream joins], outside a capture
  cudaEvent_t join_captured = nullptr;  // ... inside one (never mixed with uncaptured use)
};

// Process lifetime: never freed (a static destructor may run after the runtime has gone).
std::mutex g_mutex;
std::vector<DeviceState>* g_devices = nullptr;

DeviceState& device_state(int device) {
  if (!g_devices) {
    int n = 0;
    check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    g_devices = new std::vector<DeviceState>(static_cast<size_t>(n));
  }
  if (device < 0 || device >= static_cast<int>(g_devices->size()))
    throw std::runtime_error("fastoptim CUDA: no device " + std::to_string(device));
  DeviceState& d = (*g_devices)[device];
  if (!d.ready) {  // the caller made `device` current
    check(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute(MultiProcessorCount)");
    check(cudaEventCreateWithFlags(&d.join, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&d.join_captured, cudaEventDisableTiming), "cudaEventCreate");
    d.ready = true;
  }
  return d;
}

// The driver functions the runtime does not wrap, through the runtime (no link to libcuda,
// which the static runtime loads itself): Note [current device] in host_logic.h, and the
// allocation ranges of pointer_info.
struct Driver {
  CUresult(CUDAAPI* ctx_get)(CUcontext*) = nullptr;
  CUresult(CUDAAPI* ctx_set)(CUcontext) = nullptr;
  CUresult(CUDAAPI* ctx_device)(CUdevice*) = nullptr;
  CUresult(CUDAAPI* pointer_attributes)(unsigned, CUpointer_attribute*, void**, CUdeviceptr) = nullptr;
};
Driver load_driver() {
  Driver r;
  const auto load = [](const char* name, void** fn) {
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    check(cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion");
    if (q != cudaDriverEntryPointSuccess || !*fn)
      throw std::runtime_error(std::string("fastoptim CUDA: the driver has no ") + name);
  };
  load("cuCtxGetCurrent", reinterpret_cast<void**>(&r.ctx_get));
  load("cuCtxSetCurrent", reinterpret_cast<void**>(&r.ctx_set));
  load("cuCtxGetDevice", reinterpret_cast<void**>(&r.ctx_device));
  load("cuPointerGetAttributes", reinterpret_cast<void**>(&r.pointer_attributes));
  return r;
}
const Driver& driver() {
  static const Driver d = load_driver();  // thread-safe; retried if it threw
  return d;
}

void check_driver(CUresult e, const char* what) {
  if (e != CUDA_SUCCESS)
    throw std::runtime_error(std::string("fastoptim CUDA: ") + what + " failed: CUresult " +
                             std::to_string(static_cast<int>(e)));
}

// Makes `device` current for the scope of a launch, then restores the thread's previous
// driver context, none included (Note [current device] in host_logic.h).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    const Driver& d = driver();
    check_driver(d.ctx_get(&saved_), "cuCtxGetCurrent");
    CUdevice current = -1;
    if (saved_) check_driver(d.ctx_device(&current), "cuCtxGetDevice");
    const DeviceSwitch sw = device_switch(saved_ != nullptr, static_cast<int>(current), device);
    if (sw.set_device) check(cudaSetDevice(device), "cudaSetDevice");
    restore_ = sw.restore_context;
  }
  ~DeviceGuard() {
    if (restore_) driver().ctx_set(saved_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  CUcontext saved_ = nullptr;
  bool restore_ = false;
};

cudaStream_t to_stream(uintptr_t s) {
  switch (s) {
    case kStreamDefault: return nullptr;
    case kStreamLegacy: return cudaStreamLegacy;
    case kStreamPerThread: return cudaStreamPerThread;
    default: return reinterpret_cast<cudaStream_t>(s);
  }
}

StreamCapture capture_of(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  check(cudaStreamGetCaptureInfo(s, &status, &id), "cudaStreamGetCaptureInfo");
  StreamCapture c;
  c.status = status == cudaStreamCaptureStatusActive       ? Capture::kActive
             : status == cudaStreamCaptureStatusInvalidated ? Capture::kInvalidated
                                                            : Capture::kNone;
  c.id = id;
  return c;
}

}  // namespace

bool built() { return true; }

RuntimeInfo runtime_info() {
  RuntimeInfo r;
  r.built = true;
  r.architectures = FASTOPTIM_CUDA_ARCHS;
  cudaRuntimeGetVersion(&r.runtime_version);
  if (cudaDriverGetVersion(&r.driver_version) != cudaSuccess) r.driver_version = 0;
  const cudaError_t e = cudaGetDeviceCount(&r.device_count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    r.device_count = 0;
    r.error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    return r;
  }
  for (int d = 0; d < r.device_count; ++d) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, d) != cudaSuccess) {
      cudaGetLastError();
      r.device_names.emplace_back("?");
      r.compute_capabilities.push_back(0);
      continue;
    }
    r.device_names.emplace_back(p.name);
    r.compute_capabilities.push_back(p.major * 10 + p.minor);
  }
  return r;
}

void require_device() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastoptim CUDA: CUDA arrays were passed but no CUDA "
                                         "device can be used: ") +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
  if (n == 0)
    throw std::runtime_error("fastoptim CUDA: CUDA arrays were passed but no CUDA device was found");
}

// The driver's cuPointerGetAttributes, not cudaPointerGetAttributes: a runtime call may make
// the current device's primary context current in a thread that has none (creating it on
// device 0), which is what Note [current device] avoids; the driver query needs no context.
// A pointer that CUDA does not know gets the attributes' null values (not device memory).
PointerInfo pointer_info(const void* p) {
  CUpointer_attribute attrs[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED,
                                 CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                 CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                 CU_POINTER_ATTRIBUTE_RANGE_SIZE};
  constexpr unsigned kN = sizeof(attrs) / sizeof(attrs[0]);
  // Zeroed 8-byte slots: each attribute writes 1 (bool), 4 (enum, int) or 8 bytes, and the
  // low bytes are read back (little-endian x86-64 / aarch64).
  uint64_t v[kN] = {};
  void* data[kN];
  for (unsigned k = 0; k < kN; ++k) data[k] = &v[k];
  const auto ptr = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(p));
  check_driver(driver().pointer_attributes(kN, attrs, data, ptr), "cuPointerGetAttributes");
  PointerInfo r;
  const auto memory_type = static_cast<uint32_t>(v[0]);
  const bool managed = static_cast<uint8_t>(v[1]) != 0;
  r.device_memory = memory_type == CU_MEMORYTYPE_DEVICE || managed;
  r.device = static_cast<int32_t>(static_cast<uint32_t>(v[2]));
  r.base = reinterpret_cast<uintptr_t>(p);
  r.end = r.base + 1;
  const uintptr_t base = static_cast<uintptr_t>(v[3]), size = static_cast<uintptr_t>(v[4]);
  if (r.device_memory && size > 0 && base <= r.base && r.base < base + size) {
    r.base = base;
    r.end = base + size;
  }
  return r;
}

[[noreturn]] void throw_launch_error(cudaError_t e) { fail("kernel launch", e); }

void launch(const Launch& l) {
  const Batch& b = *l.batch;
  if (b.offsets[b.n_tensors] == 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard(l.device);
  DeviceState& ds = device_state(l.device);
  const cudaStream_t stream = to_stream(l.stream);
  const size_t n_waits = l.wait_streams.size();

  // Note [graph capture]: refuse, before enqueuing anything, joins that CUDA would reject.
  const StreamCapture own = capture_of(stream);
  std::vector<StreamCapture> waits(n_waits);
  for (size_t k = 0; k < n_waits; ++k) waits[k] = capture_of(to_stream(l.wait_streams[k]));
  const std::string problem = capture_problem(own, waits.data(), l.wait_names.data(), n_waits);
  if (!problem.empty()) throw std::runtime_error("fastoptim CUDA: " + problem);
  const cudaEvent_t join = own.status == Capture::kActive ? ds.join_captured : ds.join;

  // Note [stream joins]: before ...
  for (uintptr_t w : l.wait_streams) {
    check(cudaEventRecord(join, to_stream(w)), "cudaEventRecord");
    check(cudaStreamWaitEvent(stream, join, 0), "cudaStreamWaitEvent");
  }
  const auto join_back = [&] {
    if (n_waits == 0) return cudaSuccess;
    cudaError_t e = cudaEventRecord(join, stream);
    for (size_t k = 0; k < n_waits && e == cudaSuccess; ++k)
      e = cudaStreamWaitEvent(to_stream(l.wait_streams[k]), join, 0);
    return e;
  };
  LaunchCtx ctx;
  ctx.format = l.format;
  ctx.io = mixed_io(l.types, b);
  ctx.batch = &b;
  ctx.mask = l.mask;
  ctx.args = l.args;
  ctx.stream = stream;
  ctx.sm_count = ds.sm_count;
  ctx.n_tensors = b.n_tensors;
  ctx.offsets = b.offsets;
  ctx.slots = b.slots;
  try {
    if (!launch_any_shard(l.rule, ctx)) throw std::logic_error("fastoptim CUDA: no launcher for rule");
  } catch (...) {
    join_back();  // the groups already enqueued stay ordered with the other streams
    throw;
  }
  // ... and after.
  check(join_back(), "joining the arrays' streams after the update");
}

}  // namespace cuda
}  // namespace fastoptim
