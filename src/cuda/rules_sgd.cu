// CUDA instantiations of SgdRule (rules.h), float and double: the flag dispatch of
// rule_visitor.h, then one kernel launch (kernels.cuh).
#include "kernels.cuh"

namespace fastoptim {
namespace cuda {

void launch_sgd(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const SgdArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

}  // namespace cuda
}  // namespace fastoptim
