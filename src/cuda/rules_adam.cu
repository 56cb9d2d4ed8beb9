// CUDA instantiations of AdamRule (Adam and AdamW) (rules.h), float and double: the flag dispatch of
// rule_visitor.h, then one kernel launch (kernels.cuh).
#include "kernels.cuh"

namespace fastoptim {
namespace cuda {

void launch_adam(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const AdamArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

}  // namespace cuda
}  // namespace fastoptim
