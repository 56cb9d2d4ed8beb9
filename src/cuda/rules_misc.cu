// CUDA instantiations of AdagradRule, AdadeltaRule, EmaRule and StreamRule (rules.h), float
// and double: the flag dispatch of rule_visitor.h, then one kernel launch (kernels.cuh).
#include "kernels.cuh"

namespace fastoptim {
namespace cuda {

void launch_adagrad(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const AdagradArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

void launch_adadelta(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const AdadeltaArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

void launch_ema(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const EmaArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

void launch_stream(const LaunchCtx& ctx) {
  const auto& a = *static_cast<const StreamArgs*>(ctx.args);
  dispatch_rule(a, [&](auto rule) { launch_rule<typename decltype(rule)::type>(ctx, a); });
}

}  // namespace cuda
}  // namespace fastoptim
