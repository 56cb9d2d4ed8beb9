// emulate.cpp: cuda::emulate (cuda_api.h), the CUDA kernels of a call run on the CPU over
// host arrays.
//
// The launch groups and plan (src/cpp/launch_plan.h: for_each_group, fill_group,
// block_body), RuleVisitor or MixedVisitor (rule_visitor.h) and the variant dispatch (rule_api.h's
// dispatch_mask) are the code the CUDA launcher and kernel are made of; here they run with host
// loads and stores, launch after launch and thread after thread. That equals the parallel
// kernels because every element belongs to exactly one thread of one launch
// (tests/test_launch_plan.py proves it), so the tests can compare the result bit for bit with
// the CPU kernels. The bindings validate the call exactly as for a real update
// (_core._emulate_kernel). Built only with the CUDA backend (there is nothing to emulate
// otherwise), and at -O0 (cuda.cmake): a test hook, compiled for every rule.
#include <cstdint>
#include <vector>

#include "cuda_api.h"
#include "plan_hooks.h"
#include "rule_visitor.h"

namespace fastoptim {
namespace cuda {
namespace {

struct Geometry {
  int sm_count;
  int64_t chunk, block, grid, group;
};

// The launches of a call, group after group, block after block, thread after thread, with
// visitor v (a RuleVisitor or a MixedVisitor); `mixed`: a 16-bit format's launches.
template <class Visitor>
void emulate_launches(const Batch& b, const Geometry& g, unsigned slot_mask, bool mixed, Visitor& v) {
  std::vector<int64_t> sizes, starts, bases;
  std::vector<void*> ptrs, copies;
  plan::for_each_group(b.offsets, b.n_tensors, g.group, [&](const int64_t* tensors, int64_t count) {
    sizes.resize(count);
    starts.resize(count + 1);
    ptrs.resize(count * kMaxSlots);
    bases.resize(count);
    copies.resize(count);
    const plan::LaunchPlan p = override_geometry(
        plan::fill_group(b.offsets, b.slots, tensors, count, slot_mask, g.chunk, g.sm_count,
                         sizes.data(), starts.data(), ptrs.data(), mixed ? bases.data() : nullptr,
                         copies.data(), b.copies),
        g.block, g.grid);
    plan::MetaView m{sizes.data(), starts.data(), ptrs.data()};
    if (mixed) {
      m.bases = bases.data();
      m.copies = copies.data();
    }
    for (uint32_t blk = 0; blk < p.grid; ++blk)
      for (uint32_t tid = 0; tid < p.block; ++tid) plan::block_body(p, m, blk, tid, p.block, p.grid, v);
  });
}

template <class Rule, class T, class Args>
void emulate_typed(const Batch& b, const Geometry& g, const Args& a) {
  const typename Rule::template Consts<T> c(a);  // built on the host, as the launcher does
  RuleVisitor<Rule, T> v{c, grad_scale_inv_of<T>(b)};
  emulate_launches(b, g, Rule::kReads | Rule::kWrites, false, v);
}

template <class Rule, class Args>
void emulate_mixed(const Batch& b, const StreamTypes& types, const Geometry& g, const Args& a) {
  const typename Rule::template Consts<float> c(a);
  const MixedIo io = mixed_io(types, b);
  MixedVisitor<Rule> v{c, io};
  Geometry gm = g;
  if (gm.group > plan::kGroupMixed) gm.group = plan::kGroupMixed;  // the launcher's cap
  emulate_launches(b, gm, Rule::kReads | Rule::kWrites, true, v);
}

template <class D>
void emulate_rule(unsigned mask, Format format, const StreamTypes& types, const Batch& b,
                  const Geometry& g, const void* args) {
  const auto& a = *static_cast<const typename D::Args*>(args);
  dispatch_mask<D>(mask, [&](auto tag) {
    using Rule = typename decltype(tag)::type;
    if (format == kF64) emulate_typed<Rule, double>(b, g, a);
    else if (format == kF32) emulate_typed<Rule, float>(b, g, a);
    else emulate_mixed<Rule>(b, types, g, a);
  });
}

using EmulateFn = void (*)(unsigned, Format, const StreamTypes&, const Batch&, const Geometry&, const void*);
#define FO_EMULATE_ENTRY(D) &emulate_rule<D>,
constexpr EmulateFn kEmulate[kNumRules] = {FO_RULES(FO_EMULATE_ENTRY)};
#undef FO_EMULATE_ENTRY

}  // namespace

void emulate(RuleId rule, unsigned mask, Format format, const StreamTypes& types, const Batch& b,
             const void* args, int sm_count, int64_t chunk, int64_t block, int64_t grid, int64_t group) {
  check_geometry(chunk, block, grid, group);
  const Geometry g{sm_count, chunk > 0 ? chunk : plan::kChunk, block, grid,
                   group > 0 ? group : plan::kGroupLarge};
  kEmulate[rule](mask, format, types, b, g, args);
}

}  // namespace cuda
}  // namespace fastoptim
