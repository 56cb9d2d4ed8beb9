// cuda_api.h: what the bindings call to run an update on CUDA device arrays.
//
// Plain C++ (no CUDA, no pybind11 headers), so bindings.cpp includes it whether or not the
// CUDA backend is built: cuda_backend.cu defines these functions where nvcc was found
// (FASTOPTIM_HAVE_CUDA), cuda_stub.cpp everywhere else (built() == false; the bindings then
// reject device arrays with "fastoptim was built without CUDA" before calling anything else).
// Errors of the CUDA runtime are thrown as std::runtime_error (Python RuntimeError).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../cpp/kernel_api.h"

namespace fastoptim {
namespace cuda {

// Whether this build contains the CUDA kernels.
bool built();

// What info() reports: never throws. device_count is 0 (and `error` says why) when there is
// no driver or no device.
struct RuntimeInfo {
  bool built = false;
  int device_count = 0;
  int runtime_version = 0;   // e.g. 13000
  int driver_version = 0;    // 0 without a driver
  std::string error;         // why device_count is 0, if the runtime said
  std::vector<std::string> device_names;
  std::vector<int> compute_capabilities;  // major * 10 + minor
  std::string architectures;  // CMAKE_CUDA_ARCHITECTURES of the build
};
RuntimeInfo runtime_info();

// Throws std::runtime_error unless the CUDA runtime reports at least one device.
void require_device();

// Where a pointer lives, and the CUDA allocation holding it ([p, p + 1) where the driver gives
// no range), from the driver's cuPointerGetAttributes (no context needed, none created).
struct PointerInfo {
  bool device_memory = false;  // device or managed memory
  int device = -1;
  uintptr_t base = 0, end = 0;
};
PointerInfo pointer_info(const void* p);

// CUDA Array Interface v3 stream values, as the launcher takes them.
constexpr uintptr_t kStreamDefault = 0;    // "stream" absent or None: the default stream
constexpr uintptr_t kStreamLegacy = 1;     // cudaStreamLegacy
constexpr uintptr_t kStreamPerThread = 2;  // cudaStreamPerThread

// The element types of a call's streams, for the formats with a 16-bit stream (Note [16-bit
// formats on the device], rule_visitor.h): 0 float32, 1 bfloat16, 2 float16 (StreamCode);
// copy 255: the format writes no copy of the params. Filled from the bindings' format table.
struct StreamTypes {
  uint8_t param = 0, grad = 0, state = 0, copy = 255;
  bool kahan = false;  // the copies stream is the params' compensation
};

struct Launch {
  RuleId rule;
  unsigned mask;              // the rule's variant (rule_api.h)
  Format format;              // any but the quantized states' (the bindings refuse those)
  StreamTypes types;          // format's stream types
  const Batch* batch;         // host copies of offsets and slot pointer tables (device addresses)
  const void* args;           // the rule's Args (rules.h)
  int device;                 // every array's device (checked by the caller)
  uintptr_t stream;           // params[0]'s stream: the launch stream
  std::vector<uintptr_t> wait_streams;   // other arrays' streams (Note [stream joins])
  std::vector<std::string> wait_names;   // the first array reporting each, for messages
};

// Enqueues the update on `stream` (asynchronous, like any CUDA op): one launch per group of
// tensors (Note [launch groups] in launch_plan.h), ordered with wait_streams both ways, also
// inside a CUDA graph capture (Note [graph capture] in host_logic.h). Thread-safe.
void launch(const Launch& l);

// Test hook (emulate.cpp, CUDA builds only): the kernel body of `launch`, run on the CPU over
// host arrays, group after group, block after block and thread after thread; chunk/block/grid
// 0 = the launcher's, group 0 = the launcher's group size (plan::kGroupLarge; plan::kGroupMixed for a 16-bit
// format, larger values capped to it).
void emulate(RuleId rule, unsigned mask, Format format, const StreamTypes& types, const Batch& b,
             const void* args,
             int sm_count, int64_t chunk, int64_t block, int64_t grid, int64_t group);

}  // namespace cuda
}  // namespace fastoptim
