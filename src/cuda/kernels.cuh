// kernels.cuh: the CUDA kernel that runs a rule of rules.h over a multi-tensor call.
//
// One kernel template per (rule instantiation, float type, group capacity). Its body is
// plan::block_body of src/cpp/launch_plan.h (the grid walk the CPU tests execute) with
// RuleVisitor of rule_visitor.h, which loads the rule's slots, calls Rule::apply<T> (T = float
// or double, one lane at a time: the same text as the scalar C++ path), and stores the written
// slots; the tests run that same body on the CPU (_core._emulate_kernel). Per-step scalars
// arrive precomputed in Rule::Consts<T>, built once on the host (Note [bitwise identical paths]
// in vec.h: the CUDA sources are compiled with --fmad=false, so a GPU thread rounds exactly
// like the CPU). The formats with a 16-bit stream have one more kernel per rule instantiation,
// update_kernel_mixed with MixedVisitor (Note [16-bit formats on the device], rule_visitor.h).
//
// Note [metadata in the parameters]
// The kernel reads its tensors' sizes, first chunks and slot pointers (plan::MetaView) from its
// own parameters (__grid_constant__: read in place from the constant bank, never copied to a
// thread's registers or local memory). A call is one launch per group of at most
// plan::kGroupLarge non-empty tensors (Note [launch groups] in launch_plan.h), all on the
// call's stream: no host buffer, no device buffer, no host-to-device copy, and so nothing that
// a CUDA graph capture could record by address. A group of at most plan::kGroupSmall tensors
// uses the instantiation with the small parameter block. (The 16-bit formats: groups of at most
// plan::kGroupMixed, one parameter-block size.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "../cpp/kernel_api.h"
#include "../cpp/launch_plan.h"
#include "rule_visitor.h"

namespace fastoptim {
namespace cuda {

// Kernel parameter space on sm_70+ with CUDA 12.1+ (the CUDA Programming Guide's limit).
constexpr size_t kMaxParamBytes = 32764;

// Throws the std::runtime_error of a failed launch (cuda_backend.cu).
[[noreturn]] void throw_launch_error(cudaError_t e);

template <int64_t Cap> struct GroupMeta {
  int64_t sizes[Cap];
  int64_t chunk_starts[Cap + 1];
  void* ptrs[Cap * kMaxSlots];
};

// A 16-bit format's launch: the two more values per tensor (MetaView's bases and copies).
template <int64_t Cap> struct GroupMetaMixed {
  int64_t sizes[Cap];
  int64_t chunk_starts[Cap + 1];
  void* ptrs[Cap * kMaxSlots];
  int64_t bases[Cap];
  void* copies[Cap];
};

// What the backend hands to a rule's launcher (one per call).
struct LaunchCtx {
  Format format;                // any format but the quantized states'
  MixedIo io;                   // a 16-bit format's stream types and load/store options
  const Batch* batch;           // the call (grad_scale_inv_*, copies: the copies stream or null)
  unsigned mask;                // the rule's variant (rule_api.h)
  const void* args;             // the rule's Args
  cudaStream_t stream;
  int sm_count;
  int64_t n_tensors;            // the call's tensors (Batch)
  const int64_t* offsets;       // [n_tensors + 1]
  void* const* const* slots;    // slots[s][t], slots[s] null for a slot the call has not
};

template <class Rule, class T, int64_t Cap> struct KernelArgs {
  plan::LaunchPlan plan;
  typename Rule::template Consts<T> c;
  T grad_scale_inv;
  GroupMeta<Cap> meta;
  KernelArgs(const typename Rule::template Consts<T>& consts, T inv) : c(consts), grad_scale_inv(inv) {}
};

template <class Rule, class T, int64_t Cap>
__global__ void __launch_bounds__(plan::kBlockThreads)
update_kernel(const __grid_constant__ KernelArgs<Rule, T, Cap> a) {
  const plan::MetaView m{a.meta.sizes, a.meta.chunk_starts, a.meta.ptrs};
  RuleVisitor<Rule, T> v{a.c, a.grad_scale_inv};
  plan::block_body(a.plan, m, blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, v);
}

// Note [16-bit formats on the device] (rule_visitor.h): one kernel per rule variant for every
// format with a 16-bit stream, the stream types in its parameters.
template <class Rule> struct MixedKernelArgs {
  plan::LaunchPlan plan;
  typename Rule::template Consts<float> c;
  MixedIo io;
  GroupMetaMixed<plan::kGroupMixed> meta;
  MixedKernelArgs(const typename Rule::template Consts<float>& consts, const MixedIo& i) : c(consts), io(i) {}
};

template <class Rule>
__global__ void __launch_bounds__(plan::kBlockThreads)
update_kernel_mixed(const __grid_constant__ MixedKernelArgs<Rule> a) {
  const plan::MetaView m{a.meta.sizes, a.meta.chunk_starts, a.meta.ptrs, a.meta.bases, a.meta.copies};
  MixedVisitor<Rule> v{a.c, a.io};
  plan::block_body(a.plan, m, blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, v);
}

template <class Rule> void launch_group_mixed(const LaunchCtx& ctx, const typename Rule::template Consts<float>& c,
                                              const int64_t* tensors, int64_t count) {
  using Params = MixedKernelArgs<Rule>;
  static_assert(sizeof(Params) <= kMaxParamBytes, "kernel parameters exceed 32,764 bytes");
  const auto a = std::make_unique<Params>(c, ctx.io);
  a->plan = plan::fill_group(ctx.offsets, ctx.slots, tensors, count, Rule::kReads | Rule::kWrites,
                             plan::kChunk, ctx.sm_count, a->meta.sizes, a->meta.chunk_starts,
                             a->meta.ptrs, a->meta.bases, a->meta.copies, ctx.batch->copies);
  update_kernel_mixed<Rule><<<a->plan.grid, a->plan.block, 0, ctx.stream>>>(*a);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_launch_error(e);
}

template <class Rule, class Args> void launch_mixed(const LaunchCtx& ctx, const Args& a) {
  const typename Rule::template Consts<float> c(a);  // once per call, on the host
  plan::for_each_group(ctx.offsets, ctx.n_tensors, plan::kGroupMixed,
                       [&](const int64_t* tensors, int64_t count) {
                         launch_group_mixed<Rule>(ctx, c, tensors, count);
                       });
}

// One launch: the group `tensors[0 .. count)` of the call's tensors, count <= Cap.
template <class Rule, class T, int64_t Cap>
void launch_group(const LaunchCtx& ctx, const typename Rule::template Consts<T>& c,
                  const int64_t* tensors, int64_t count) {
  using Params = KernelArgs<Rule, T, Cap>;
  static_assert(sizeof(Params) <= kMaxParamBytes, "kernel parameters exceed 32,764 bytes");
  // up to 32 KB: not on the caller's stack
  const auto a = std::make_unique<Params>(c, grad_scale_inv_of<T>(*ctx.batch));
  a->plan = plan::fill_group(ctx.offsets, ctx.slots, tensors, count, Rule::kReads | Rule::kWrites,
                             plan::kChunk, ctx.sm_count, a->meta.sizes, a->meta.chunk_starts,
                             a->meta.ptrs);
  update_kernel<Rule, T, Cap><<<a->plan.grid, a->plan.block, 0, ctx.stream>>>(*a);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_launch_error(e);
}

template <class Rule, class T, class Args> void launch_typed(const LaunchCtx& ctx, const Args& a) {
  const typename Rule::template Consts<T> c(a);  // once per call, on the host
  plan::for_each_group(ctx.offsets, ctx.n_tensors, plan::kGroupLarge,
                       [&](const int64_t* tensors, int64_t count) {
                         if (count <= plan::kGroupSmall)
                           launch_group<Rule, T, plan::kGroupSmall>(ctx, c, tensors, count);
                         else
                           launch_group<Rule, T, plan::kGroupLarge>(ctx, c, tensors, count);
                       });
}

template <class Rule, class Args> void launch_rule(const LaunchCtx& ctx, const Args& a) {
  if (ctx.format == kF64) launch_typed<Rule, double>(ctx, a);
  else if (ctx.format == kF32) launch_typed<Rule, float>(ctx, a);
  else launch_mixed<Rule>(ctx, a);
}

// Rule D's launcher: the call's variant -> its instantiation (rule_api.h), then its launches.
template <class D> void launch_decl(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const typename D::Args*>(ctx.args);
  dispatch_mask<D>(ctx.mask, [&](auto tag) { launch_rule<typename decltype(tag)::type>(ctx, a); });
}

// The rules are compiled in kShards translation units (rules_shard.cu, compiled once per
// shard by cuda.cmake), shard K holding the rules whose RuleId % kShards == K: nvcc compiles
// them in parallel, and a new rule of FO_RULES lands in one of them without any CUDA edit.
constexpr int kShards = 4;
template <int K> bool launch_shard(RuleId rule, const LaunchCtx& ctx);  // rules_shard.cu
extern template bool launch_shard<0>(RuleId, const LaunchCtx&);
extern template bool launch_shard<1>(RuleId, const LaunchCtx&);
extern template bool launch_shard<2>(RuleId, const LaunchCtx&);
extern template bool launch_shard<3>(RuleId, const LaunchCtx&);
inline bool launch_any_shard(RuleId rule, const LaunchCtx& ctx) {
  return launch_shard<0>(rule, ctx) || launch_shard<1>(rule, ctx) || launch_shard<2>(rule, ctx) ||
         launch_shard<3>(rule, ctx);
}
static_assert(kShards == 4, "launch_any_shard names every shard");

}  // namespace cuda
}  // namespace fastoptim
