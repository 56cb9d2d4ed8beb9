// cuda_backend.cu: the host side of the CUDA backend (cuda_api.h): device queries, the
// metadata buffers, streams, and ONE kernel launch per call.
//
// Note [static runtime]
// The module links the CUDA runtime statically (cuda.cmake), so it imports on a machine
// without a GPU driver; the first runtime call there fails and is reported (info(), or a
// RuntimeError when device arrays are passed). This runtime is not the one CuPy or torch
// load, but all of them use the driver's primary context of each device, so memory and
// streams are shared. The current device is per thread and also shared: launch() switches
// to the arrays' device and switches back.
//
// Note [metadata ring]
// Calls with more than kInlineTensors tensors copy their metadata (offsets and pointers,
// 48 bytes per tensor) from pinned host memory to device memory with cudaMemcpyAsync on the
// launch stream, right before the launch. Each device has kRing such buffer pairs, used in
// turn; an event recorded after the launch marks when a pair may be reused, so the host
// never overwrites a buffer that a copy or kernel still reads, whatever stream the next call
// uses. The host waits only when it is kRing calls ahead of the device.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_api.h"
#include "kernels.cuh"

#ifndef FASTOPTIM_CUDA_ARCHS
#define FASTOPTIM_CUDA_ARCHS ""
#endif

namespace fastoptim {
namespace cuda {
namespace {

constexpr int kRing = 16;

[[noreturn]] void fail(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error so it is not reported again by a later call
  throw std::runtime_error(std::string("fastoptim CUDA: ") + what + " failed: " +
                           cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(what, e);
}

struct MetaBuffers {
  char* host = nullptr;  // pinned
  char* dev = nullptr;
  size_t cap = 0;
  cudaEvent_t done = nullptr;
  bool pending = false;  // `done` was recorded after the last use
};

struct DeviceState {
  bool ready = false;
  int sm_count = 0;
  cudaEvent_t wait_event = nullptr;  // for cross-stream waits
  MetaBuffers ring[kRing];
  int next = 0;
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
    check(cudaEventCreateWithFlags(&d.wait_event, cudaEventDisableTiming), "cudaEventCreate");
    for (MetaBuffers& b : d.ring)
      check(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreate");
    d.ready = true;
  }
  return d;
}

// Makes `device` current for the scope of a launch, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ == device) {
      prev_ = -1;
    } else {
      check(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

cudaStream_t to_stream(uintptr_t s) {
  switch (s) {
    case kStreamDefault: return nullptr;
    case kStreamLegacy: return cudaStreamLegacy;
    case kStreamPerThread: return cudaStreamPerThread;
    default: return reinterpret_cast<cudaStream_t>(s);
  }
}

// Host layout of the metadata: offsets[n + 1], then ptrs[n * kMaxSlots].
void fill_meta(const Batch& b, int64_t* offsets, void** ptrs) {
  const int64_t n = b.n_tensors;
  std::memcpy(offsets, b.offsets, static_cast<size_t>(n + 1) * sizeof(int64_t));
  for (int64_t t = 0; t < n; ++t)
    for (int s = 0; s < kMaxSlots; ++s) ptrs[t * kMaxSlots + s] = b.slots[s] ? b.slots[s][t] : nullptr;
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

PointerInfo pointer_info(const void* p) {
  cudaPointerAttributes a;
  check(cudaPointerGetAttributes(&a, p), "cudaPointerGetAttributes");
  PointerInfo r;
  r.device_memory = a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
  r.device = a.device;
  return r;
}

void launch(const Launch& l) {
  const Batch& b = *l.batch;
  const int64_t n = b.n_tensors;
  const int64_t total = b.offsets[n];
  if (total == 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard(l.device);
  DeviceState& ds = device_state(l.device);
  const cudaStream_t stream = to_stream(l.stream);
  // CUDA Array Interface v3: work on an array must be ordered after its producer's stream.
  for (uintptr_t w : l.wait_streams) {
    check(cudaEventRecord(ds.wait_event, to_stream(w)), "cudaEventRecord");
    check(cudaStreamWaitEvent(stream, ds.wait_event, 0), "cudaStreamWaitEvent");
  }

  LaunchCtx ctx;
  ctx.plan = plan::make_plan(total, n, 0, ds.sm_count);
  ctx.format = l.format;
  ctx.mask = l.mask;
  ctx.args = l.args;
  ctx.stream = stream;
  InlineMeta inl{};
  MetaBuffers* mb = nullptr;
  if (n <= kInlineTensors) {
    fill_meta(b, inl.offsets, inl.ptrs);
    ctx.inl = &inl;
  } else {  // Note [metadata ring]
    mb = &ds.ring[ds.next];
    ds.next = (ds.next + 1) % kRing;
    if (mb->pending) {
      check(cudaEventSynchronize(mb->done), "cudaEventSynchronize");
      mb->pending = false;
    }
    const size_t bytes = static_cast<size_t>(n + 1) * sizeof(int64_t) +
                         static_cast<size_t>(n) * kMaxSlots * sizeof(void*);
    if (bytes > mb->cap) {
      size_t cap = mb->cap ? mb->cap : 64 * 1024;
      while (cap < bytes) cap *= 2;
      if (mb->host) check(cudaFreeHost(mb->host), "cudaFreeHost");
      if (mb->dev) check(cudaFree(mb->dev), "cudaFree");
      mb->host = nullptr;
      mb->dev = nullptr;
      mb->cap = 0;
      check(cudaMallocHost(reinterpret_cast<void**>(&mb->host), cap), "cudaMallocHost");
      check(cudaMalloc(reinterpret_cast<void**>(&mb->dev), cap), "cudaMalloc");
      mb->cap = cap;
    }
    auto* h_off = reinterpret_cast<int64_t*>(mb->host);
    auto* h_ptr = reinterpret_cast<void**>(h_off + n + 1);
    fill_meta(b, h_off, h_ptr);
    check(cudaMemcpyAsync(mb->dev, mb->host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    ctx.dev_offsets = reinterpret_cast<const int64_t*>(mb->dev);
    ctx.dev_ptrs = reinterpret_cast<void* const*>(ctx.dev_offsets + n + 1);
  }
  if (!launch_any_shard(l.rule, ctx)) throw std::logic_error("fastoptim CUDA: no launcher for rule");
  const cudaError_t launched = cudaGetLastError();
  if (mb) {  // after the copy (and the kernel, if it was launched): the buffers' release point
    check(cudaEventRecord(mb->done, stream), "cudaEventRecord");
    mb->pending = true;
  }
  check(launched, "kernel launch");
}

}  // namespace cuda
}  // namespace fastoptim
