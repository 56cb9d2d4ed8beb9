// dispatch.h: ISA choice (once, from CPUID) and the parallel split of a batch.
#pragma once

#include <string>
#include <vector>

#include "kernel_api.h"
#include "parallel.h"  // kMaxThreads; last_threads_used() (a test hook of the bindings)

namespace fastoptim {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumIsas = 4;

const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);
bool isa_cpu_has(Isa isa);
bool isa_tested(Isa isa);  // default-eligible paths (Note [untested ISA paths])
Isa current_isa();
// Throws std::invalid_argument (unknown name, or a path this build or CPU lacks).
void set_isa(const std::string& name);
// Picks the default path, then applies FASTOPTIM_ISA if set (same errors as set_isa).
void init_dispatch();

// Note [software prefetch] (kernels.h): the prefetch distance execute() puts in every batch.
// By default (setting kAutoPrefetch) it depends on the width of the call's params:
// default_prefetch_ahead (dispatch.cpp). A setting >= 0 (the tuning hook
// _core._set_prefetch_ahead) is that many elements for every format, 0 none.
// set_prefetch_ahead returns the previous setting.
constexpr int64_t kAutoPrefetch = -1;
constexpr int64_t kMaxPrefetchAhead = 1 << 16;
int64_t prefetch_ahead_setting();
int64_t set_prefetch_ahead(int64_t elements);  // kAutoPrefetch or 0..kMaxPrefetchAhead

int num_threads();
void set_num_threads(int n);  // 1..kMaxThreads (parallel.h), checked by the caller; clamped
int threads_for(int64_t total_elements);

// Runs variant `mask` of kernel `rule` in `format` over the whole batch on the current ISA, handing chunks of
// the global element range to the caller-runs pool when it is large enough (parallel.h).
void execute(RuleId rule, unsigned mask, Format format, const Batch& batch, const void* args);

// The benchmarks' byte ceiling over `elements` elements (kernel_api.h, Note [byte ceiling]; a
// multiple of kByteBlock), split between threads as execute() splits a batch.
void stream_bytes(const ByteStreams& streams, int64_t elements);

// The sum of squares of every element of slot 0 of a batch, the same whatever the thread
// count or ISA (kernels.h, Note [deterministic norm]).
double sum_of_squares(GradType type, const Batch& batch);
// Multiplies every element of slot 0 in place by `scale` (in fp32; fp64 for float64); returns
// whether any element was inf or NaN before (torch.amp's unscale, fused).
bool unscale(GradType type, const Batch& batch, double scale);

// Test hook (_core._convert, _core._widen): converts n elements fp32 -> fmt (widen = false) or
// fmt -> fp32 (widen = true) with the named ISA's vstore_to / vload_from, on this thread.
// Throws std::invalid_argument as set_isa does.
void run_convert(const std::string& isa, Storage fmt, bool widen, const void* src, void* dst,
                 int64_t n);
// Test hook (_core._convert with sr_key): fp32 -> bfloat16 with stochastic rounding, element i
// with element index index0 + i.
void run_convert_sr(const std::string& isa, const float* src, void* dst, int64_t n, uint32_t key,
                    uint64_t index0);

}  // namespace fastoptim
