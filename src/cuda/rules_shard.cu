// rules_shard.cu: the CUDA instantiations of the rules of one shard (kernels.cuh), compiled
// once per shard by cuda.cmake with -DFO_SHARD=K. Nothing here names a rule: FO_RULES
// (rules.h) is the list, launch_decl (kernels.cuh) the launcher.
#include "kernels.cuh"

#ifndef FO_SHARD
#error "compile with -DFO_SHARD=<0..kShards-1> (src/cuda/cuda.cmake)"
#endif

namespace fastoptim {
namespace cuda {
namespace {
template <int K, class D> bool try_launch(RuleId rule, const LaunchCtx& ctx) {
  if constexpr (RuleIdOf<D>::value % kShards == K) {
    if (rule == RuleIdOf<D>::value) {
      launch_decl<D>(ctx);
      return true;
    }
  }
  return false;
}
}  // namespace

template <int K> bool launch_shard(RuleId rule, const LaunchCtx& ctx) {
#define FO_TRY(D) try_launch<K, D>(rule, ctx) ||
  return FO_RULES(FO_TRY) false;
#undef FO_TRY
}
template bool launch_shard<FO_SHARD>(RuleId rule, const LaunchCtx& ctx);

}  // namespace cuda
}  // namespace fastoptim
