// rule_api.h: the vocabulary in which rules.h declares an optimizer, and the ONE place where a
// call's runtime options become a rule instantiation.
//
// A rule is declared once (rules.h) as a struct D with
//   kName                       the functional name without its underscore ("adam")
//   kParams, kGrads             the names of the two first array arguments
//   kStates                     the state array arguments, in slot order (slot 2, 3, ...), each
//                               with the option that needs it ("when amsgrad=True"; "" = always)
//   kStep                       whether the call takes `step` (the 1-based step number)
//   kHyper                      the real-valued hyperparameters, in call order, with their range
//   kFlags                      the bool options, in call order
//   check(v)                    cross-parameter checks: an error text, or nullptr
//   mask(v)                     the compile-time variant of this call (bits of Rule<M>), canonical:
//   reachable(M)                every mask(v) is reachable; unreachable masks are never compiled
//   Rule<M>                     the formula of variant M (kReads, kWrites, Consts<V>, apply)
//   Args, args(v)               the per-call scalars the formula needs, computed on the host
// (rules.h's RuleDefaults gives the usual kParams/kGrads, reachable and check.)
// From it come the CPU kernel table of every ISA (kernels.h), the CUDA launchers (src/cuda/),
// the bindings' entry point with its validation (bindings.cpp), rules() for Python, and the
// CPU emulation of the CUDA kernel; nothing else names a rule.
//
// Note [one flag dispatch]
// dispatch_mask<D>(mask, f) calls f(RuleTag<D::Rule<M>>{}) for the M equal to the runtime mask,
// instantiating only the M with D::reachable(M). The CPU kernels, the CUDA launchers and the
// emulation all go through it, so the variants compiled are the same everywhere and pruned once.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "vec.h"

namespace fastoptim {

enum Slot : int { kParam = 0, kGrad = 1, kState0 = 2, kState1 = 3, kState2 = 4, kMaxSlots = 5 };
constexpr unsigned bit(int slot) { return 1u << slot; }
constexpr int kMaxStates = kMaxSlots - 2;

// Allowed values of a hyperparameter (bindings.cpp checks them before anything runs).
enum class Range : int {
  kNonNegative,  // finite, >= 0
  kUnitOpen,     // [0, 1)
  kUnitClosed,   // [0, 1]
  kFinite,       // any finite number
};
struct HyperSpec {
  const char* name;
  Range range;
};
struct StateSpec {
  const char* name;
  const char* when;  // the option that makes it needed, for error messages; "" = always
  // Never negative (a second moment, a sum of squares, a step size): the quantized formats
  // store it with the unsigned map (quant_api.h, Note [quantized states]).
  bool non_negative = false;
};
enum class StepUse : int { kNone, kOptional, kRequired };

template <class... T> constexpr auto specs(T... xs) {
  return std::array<std::common_type_t<T...>, sizeof...(T)>{{xs...}};
}
template <class T> constexpr std::array<T, 0> no_specs() { return {}; }
template <class... S> constexpr std::array<const char*, sizeof...(S)> names(S... xs) {
  return {{xs...}};
}

// The host-side values of one call, in the declaration's order.
struct CallValues {
  const double* h;  // kHyper values
  const bool* f;    // kFlags values
  int64_t step;     // 0 when absent
};

template <class V> using ScalarOf = typename VecTraits<V>::Scalar;
template <class V, class D> FO_HD FO_INLINE V sp(D x) { return splat<V>(static_cast<ScalarOf<V>>(x)); }

template <class R> struct RuleTag { using type = R; };

template <class D, unsigned M, class F> FO_INLINE void call_if_reachable(F& f) {
  if constexpr (D::reachable(M)) f(RuleTag<typename D::template Rule<M>>{});
}
template <class D, class F, unsigned... Ms>
FO_INLINE void dispatch_mask_impl(unsigned mask, F& f, std::integer_sequence<unsigned, Ms...>) {
  (void)((mask == Ms && (call_if_reachable<D, Ms>(f), true)) || ...);
}
// Note [one flag dispatch].
template <class D, class F> FO_INLINE void dispatch_mask(unsigned mask, F&& f) {
  dispatch_mask_impl<D>(mask, f, std::make_integer_sequence<unsigned, (1u << D::kMaskBits)>{});
}

// Slots read or written by variant `mask` of rule D (0 for an unreachable mask).
template <class D> inline unsigned slots_of(unsigned mask) {
  unsigned used = 0;
  dispatch_mask<D>(mask, [&](auto tag) {
    using R = typename decltype(tag)::type;
    used = R::kReads | R::kWrites;
  });
  return used;
}

}  // namespace fastoptim
