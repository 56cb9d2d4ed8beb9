// emulate.cpp: cuda::emulate (cuda_api.h), the CUDA kernel body run on the CPU over host arrays.
//
// The launch plan (src/cpp/launch_plan.h), RuleVisitor (rule_visitor.h) and the variant
// dispatch (rule_api.h's dispatch_mask) are the code the CUDA kernel is made of; here they run
// with host loads and stores, thread after thread. That equals the parallel kernel because
// every element belongs to exactly one thread (tests/test_launch_plan.py proves it), so the
// tests can compare the result bit for bit with the CPU kernels. The bindings validate the call
// exactly as for a real update (_core._emulate_kernel). Built only with the CUDA backend (there
// is nothing to emulate otherwise), and at -O0 (cuda.cmake): a test hook, compiled for every rule.
#include <cstdint>
#include <vector>

#include "cuda_api.h"
#include "plan_hooks.h"
#include "rule_visitor.h"

namespace fastoptim {
namespace cuda {
namespace {

template <class Rule, class T, class Args>
void emulate_typed(plan::LaunchPlan p, const plan::MetaView& m, const Args& a) {
  p.slot_mask = Rule::kReads | Rule::kWrites;
  const typename Rule::template Consts<T> c(a);  // built on the host, as the launcher does
  RuleVisitor<Rule, T> v{c};
  for (uint32_t b = 0; b < p.grid; ++b)
    for (uint32_t tid = 0; tid < p.block; ++tid) plan::block_body<T>(p, m, b, tid, p.block, p.grid, v);
}

template <class D>
void emulate_rule(unsigned mask, Format format, const plan::LaunchPlan& p, const plan::MetaView& m,
                  const void* args) {
  const auto& a = *static_cast<const typename D::Args*>(args);
  dispatch_mask<D>(mask, [&](auto tag) {
    using Rule = typename decltype(tag)::type;
    if (format == kF64) emulate_typed<Rule, double>(p, m, a);
    else emulate_typed<Rule, float>(p, m, a);
  });
}

using EmulateFn = void (*)(unsigned, Format, const plan::LaunchPlan&, const plan::MetaView&, const void*);
#define FO_EMULATE_ENTRY(D) &emulate_rule<D>,
constexpr EmulateFn kEmulate[kNumRules] = {FO_RULES(FO_EMULATE_ENTRY)};
#undef FO_EMULATE_ENTRY

}  // namespace

void emulate(RuleId rule, unsigned mask, Format format, const Batch& b, const void* args,
             int sm_count, int64_t chunk, int64_t block, int64_t grid) {
  const int64_t n = b.n_tensors;
  std::vector<void*> ptrs(static_cast<size_t>(n) * kMaxSlots, nullptr);
  for (int64_t t = 0; t < n; ++t)
    for (int s = 0; s < kMaxSlots; ++s) ptrs[t * kMaxSlots + s] = b.slots[s] ? b.slots[s][t] : nullptr;
  const plan::LaunchPlan p = geometry(b.offsets[n], n, 0, sm_count, chunk, block, grid);
  const plan::MetaView m{b.offsets, ptrs.data()};
  kEmulate[rule](mask, format, p, m, args);
}

}  // namespace cuda
}  // namespace fastoptim
