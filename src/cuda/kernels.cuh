// kernels.cuh: the CUDA kernel that runs a rule of rules.h over a multi-tensor call.
//
// One kernel template per (rule instantiation, float type). Its body is plan::block_body of
// src/cpp/launch_plan.h (the grid walk the CPU tests execute) with RuleVisitor of
// rule_visitor.h, which loads the rule's slots, calls Rule::apply<T> (T = float or double, one
// lane at a time: the same text as the scalar C++ path), and stores the written slots; the
// tests run that same body on the CPU (_core._emulate_kernel). Per-step scalars arrive
// precomputed in Rule::Consts<T>, built once on the host (Note [bitwise identical paths] in
// vec.h: the CUDA sources are compiled with --fmad=false, so a GPU thread rounds exactly like
// the CPU).
//
// Note [metadata]
// The kernel reads offsets[n + 1] and ptrs[n * kMaxSlots] (plan::MetaView). For at most
// kInlineTensors tensors they travel inside the kernel's parameters (__grid_constant__, no
// copy); above that the backend copies them into a persistent device buffer with
// cudaMemcpyAsync on the launch stream just before the launch (cuda_backend.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../cpp/kernel_api.h"
#include "../cpp/launch_plan.h"
#include "rule_visitor.h"

namespace fastoptim {
namespace cuda {

constexpr int64_t kInlineTensors = 8;

struct InlineMeta {
  int64_t offsets[kInlineTensors + 1];
  void* ptrs[kInlineTensors * kMaxSlots];
};

// What the backend hands to a rule's launcher (one per call).
struct LaunchCtx {
  plan::LaunchPlan plan;                  // slot_mask is set by launch_typed
  Format format;                          // kF32 or kF64 (the formats CUDA runs)
  unsigned mask;                          // the rule's variant (rule_api.h)
  const void* args;                       // the rule's Args
  cudaStream_t stream;
  const int64_t* dev_offsets = nullptr;   // device metadata, or null when `inl` is used
  void* const* dev_ptrs = nullptr;
  const InlineMeta* inl = nullptr;        // host copy, passed by value in the parameters
};

template <class Rule, class T> struct KernelArgs {
  plan::LaunchPlan plan;
  typename Rule::template Consts<T> c;
  const int64_t* offsets;  // null: the metadata is `inl`
  void* const* ptrs;
  InlineMeta inl;

  template <class Args>
  KernelArgs(const LaunchCtx& ctx, const Args& a)
      : plan(ctx.plan), c(a), offsets(ctx.dev_offsets), ptrs(ctx.dev_ptrs), inl() {
    if (ctx.inl) inl = *ctx.inl;
    plan.slot_mask = Rule::kReads | Rule::kWrites;
  }
};

template <class Rule, class T>
__global__ void __launch_bounds__(plan::kBlockThreads)
update_kernel(const __grid_constant__ KernelArgs<Rule, T> a) {
  const plan::MetaView m = a.offsets ? plan::MetaView{a.offsets, a.ptrs}
                                     : plan::MetaView{a.inl.offsets, a.inl.ptrs};
  RuleVisitor<Rule, T> v{a.c};
  plan::block_body<T>(a.plan, m, blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, v);
}

template <class Rule, class T, class Args>
void launch_typed(const LaunchCtx& ctx, const Args& a) {
  const KernelArgs<Rule, T> ka(ctx, a);
  update_kernel<Rule, T><<<ctx.plan.grid, ctx.plan.block, 0, ctx.stream>>>(ka);
}

template <class Rule, class Args> void launch_rule(const LaunchCtx& ctx, const Args& a) {
  if (ctx.format == kF64) launch_typed<Rule, double>(ctx, a);
  else launch_typed<Rule, float>(ctx, a);
}

// Rule D's launcher: the call's variant -> its instantiation (rule_api.h), then one launch.
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
