// rules.h: every update rule of fastoptim, written ONCE, each with its ONE declaration.
//
// An optimizer is one struct here (the vocabulary is rule_api.h): its arguments and their
// ranges, the per-call scalars computed on the host, and its formula `Rule<M>`, templated on a
// bit mask M of formula variants (maximize, weight decay, amsgrad, ...: compile-time flags,
// never per-element branches). A Rule<M> has
//   kReads / kWrites  bit masks over the stream slots it loads and stores,
//   Consts<V>         the per-call scalars, splat once per call,
//   apply(x, c)       the update of one lane group, x[slot] holding the loaded values.
// The same text is instantiated for scalar C++, AVX2, AVX-512 (kernels.h) and CUDA
// (src/cuda/), so the math cannot drift between targets. Element type and storage format are
// the vector layer's business (vec.h's vload/vstore), never a rule's. FO_RULES at the end
// lists the rules; adding an optimizer is its struct plus one line there.
//
// Stream slots: 0 = param, 1 = grad (read only), 2.. = optimizer states in the order of the
// functional API's arguments. Algorithms and order of operations follow torch.optim 2.13's
// `_single_tensor_<name>` functions; where torch computes `x + alpha*y` we write
// vfma(alpha, y, x) (one rounding instead of two; see Note [bitwise identical paths]).
//
// Note [squares as torch computes them]
// torch accumulates a square with addcmul_(g, g, value=c), which evaluates (c*g)*g. Writing
// c*(g*g) instead overflows g*g for |g| > ~1.8e19 (fp32) where torch stays finite (c < 1), and
// gives 0*inf = NaN for c = 0. Every rule squares as (c*g)*g: vfma(c*g, g, ...).
//
// Note [fewer long-latency ops]
// Division and square root are the only slow instructions in these rules, so a 1-thread update
// of in-cache or even DRAM-sized arrays can be bound by them. Where an algebraically equal form
// needs fewer of them it is used: a host-side reciprocal instead of a per-element division by a
// per-step scalar (Adam, NAdam, RAdam). (Adadelta's quotient of square roots could be one square
// root of a quotient, but that quotient underflows for huge gradients: it stays torch's.) Each
// differs from torch's rounding by at most a couple of ulps (the
// tests' fp32 tolerance is 1e-6 relative, fp64 1e-12), and scalar, AVX2 and AVX-512 still
// agree bitwise with each other.
//
// Invariants: a rule reads each slot at most once and writes each written slot once, so one
// pass over memory is the whole update (Adam fp32: 16 B read + 12 B written per element).
// Per-step scalars such as bias corrections are NEVER recomputed per element.
//
// A rule that needs a per-tensor reduction first (LAMB's trust ratio, Adafactor's row and
// column means) would add a `Reduce` pass to its declaration, run by the same kernel table
// before `apply`; none of the rules here needs one.
#pragma once

#include <cmath>

#include "rule_api.h"

namespace fastoptim {

// Shared first lines of most rules: g = -grad if maximize; g += weight_decay * p (L2).
template <bool kMaximize, bool kL2, class V>
FO_HD FO_INLINE V decayed_grad(const V* x, V weight_decay) {
  V g = x[kGrad];
  if constexpr (kMaximize) g = -g;
  if constexpr (kL2) g = vfma(weight_decay, x[kParam], g);
  return g;
}

// c*g*g + y, as torch's addcmul_ rounds it (Note [squares as torch computes them]).
template <class V> FO_HD FO_INLINE V add_square(V c, V g, V y) { return vfma(c * g, g, y); }

// torch.sign on the CPU: +1, -1, and 0 for +-0 AND for NaN ((0 < x) - (x < 0)).
template <class V> FO_HD FO_INLINE V vsign(V x) {
  const V zero = sp<V>(0.0);
  return vselect(vgt(x, zero), sp<V>(1.0), vselect(vlt(x, zero), sp<V>(-1.0), zero));
}

// What most declarations share; a declaration says otherwise by declaring the member itself.
struct RuleDefaults {
  static constexpr const char* kParams = "params";
  static constexpr const char* kGrads = "grads";
  static constexpr bool reachable(unsigned) { return true; }  // every variant can occur
  static const char* check(const CallValues&) { return nullptr; }  // no cross-argument rule
};

// The options shared by most rules: the lowest two bits of every optimizer's mask.
enum : unsigned { kMaximize = 1u, kWeightDecay = 2u };
constexpr unsigned bits_if(bool b, unsigned m) { return b ? m : 0u; }

// ---------------------------------------------------------------------------------------
// SGD (torch.optim.SGD). Slots: 2 = momentum_buffer.
//   g = -grad if maximize;  g += wd * p
//   buf = g                                   (first step: torch's "buffer is None")
//   buf = momentum * buf + (1 - dampening) * g (later steps)
//   g = g + momentum * buf  (nesterov)  or  g = buf
//   p = p - lr * g
struct Sgd : RuleDefaults {
  static constexpr const char* kName = "sgd";
  static constexpr auto kStates = specs(StateSpec{"momentum_buffers", "when momentum != 0"});
  static constexpr StepUse kStep = StepUse::kOptional;
  enum : int { lr, momentum, dampening, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"momentum", Range::kUnitClosed},
                                       HyperSpec{"dampening", Range::kUnitClosed},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { nesterov, maximize };
  static constexpr auto kFlags = names("nesterov", "maximize");

  enum : unsigned { kMomentum = 4u, kNesterov = 8u, kFirstStep = 16u };
  static constexpr int kMaskBits = 5;
  static constexpr bool reachable(unsigned m) {
    return (m & kMomentum) || !(m & (kNesterov | kFirstStep));
  }
  static const char* check(const CallValues& v) {
    if (v.f[nesterov] && (v.h[momentum] == 0.0 || v.h[dampening] != 0.0))
      return "nesterov=True requires momentum > 0 and dampening == 0";
    if (v.h[momentum] != 0.0 && v.step == 0)
      return "step is required when momentum != 0 (step == 1 initialises the momentum buffers)";
    return nullptr;
  }
  static unsigned mask(const CallValues& v) {
    const bool mom = v.h[momentum] != 0.0;
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay) |
           bits_if(mom, kMomentum) | bits_if(mom && v.f[nesterov], kNesterov) |
           bits_if(mom && v.step == 1, kFirstStep);
  }
  struct Args {
    double lr, momentum, dampening, weight_decay;
  };
  static Args args(const CallValues& v) {
    return {v.h[lr], v.h[momentum], v.h[dampening], v.h[weight_decay]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads =
        bit(kParam) | bit(kGrad) | ((M & kMomentum) && !(M & kFirstStep) ? bit(kState0) : 0u);
    static constexpr unsigned kWrites = bit(kParam) | ((M & kMomentum) ? bit(kState0) : 0u);
    template <class V> struct Consts {
      V neg_lr, momentum, one_minus_dampening, weight_decay;
      FO_HD explicit Consts(const Args& a)
          : neg_lr(sp<V>(-a.lr)), momentum(sp<V>(a.momentum)),
            one_minus_dampening(sp<V>(1.0 - a.dampening)), weight_decay(sp<V>(a.weight_decay)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      if constexpr ((M & kMomentum) != 0) {
        if constexpr ((M & kFirstStep) != 0) {
          x[kState0] = g;
        } else {
          x[kState0] = vfma(c.one_minus_dampening, g, x[kState0] * c.momentum);
        }
        if constexpr ((M & kNesterov) != 0) {
          g = vfma(c.momentum, x[kState0], g);
        } else {
          g = x[kState0];
        }
      }
      x[kParam] = vfma(c.neg_lr, g, x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop). Slots: 2 = square_avg, 3 = grad_avg, 4 = momentum_buffer.
//   square_avg = alpha * square_avg + (1 - alpha) * g^2
//   centered:  grad_avg = lerp(grad_avg, g, 1 - alpha); avg = sqrt(square_avg - grad_avg^2)
//   else:      avg = sqrt(square_avg)
//   avg = avg + eps
//   momentum:  buf = momentum * buf + g / avg;  p = p - lr * buf
//   else:      p = p - lr * g / avg
struct Rmsprop : RuleDefaults {
  static constexpr const char* kName = "rmsprop";
  static constexpr auto kStates = specs(StateSpec{"square_avgs", "", true},
                                        StateSpec{"grad_avgs", "when centered=True"},
                                        StateSpec{"momentum_buffers", "when momentum > 0"});
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { lr, alpha, eps, weight_decay, momentum };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"alpha", Range::kUnitClosed},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative},
                                       HyperSpec{"momentum", Range::kUnitClosed});
  enum : int { centered, maximize };
  static constexpr auto kFlags = names("centered", "maximize");

  enum : unsigned { kCentered = 4u, kMomentum = 8u };
  static constexpr int kMaskBits = 4;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay) |
           bits_if(v.f[centered], kCentered) | bits_if(v.h[momentum] > 0.0, kMomentum);
  }
  struct Args {
    double lr, alpha, eps, weight_decay, momentum;
  };
  static Args args(const CallValues& v) {
    return {v.h[lr], v.h[alpha], v.h[eps], v.h[weight_decay], v.h[momentum]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kUsed = bit(kParam) | bit(kGrad) | bit(kState0) |
                                      ((M & kCentered) ? bit(kState1) : 0u) |
                                      ((M & kMomentum) ? bit(kState2) : 0u);
    static constexpr unsigned kReads = kUsed;
    static constexpr unsigned kWrites = kUsed & ~bit(kGrad);
    template <class V> struct Consts {
      V neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
      FO_HD explicit Consts(const Args& a)
          : neg_lr(sp<V>(-a.lr)), alpha(sp<V>(a.alpha)), one_minus_alpha(sp<V>(1.0 - a.alpha)),
            eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)), momentum(sp<V>(a.momentum)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      x[kState0] = add_square(c.one_minus_alpha, g, x[kState0] * c.alpha);
      V avg;
      if constexpr ((M & kCentered) != 0) {
        x[kState1] = vfma(c.one_minus_alpha, g - x[kState1], x[kState1]);
        avg = vsqrt(x[kState0] - x[kState1] * x[kState1]);
      } else {
        avg = vsqrt(x[kState0]);
      }
      avg = avg + c.eps;
      if constexpr ((M & kMomentum) != 0) {
        x[kState2] = x[kState2] * c.momentum + g / avg;
        x[kParam] = vfma(c.neg_lr, x[kState2], x[kParam]);
      } else {
        x[kParam] = vfma(c.neg_lr, g / avg, x[kParam]);
      }
    }
  };
};

// ---------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam; decoupled_weight_decay=True is AdamW).
// Slots: 2 = exp_avg, 3 = exp_avg_sq, 4 = max_exp_avg_sq.
//   decoupled: p = p * (1 - lr * wd)      else: g = g + wd * p
//   exp_avg    = lerp(exp_avg, g, 1 - beta1)
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   amsgrad:   max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq), used below instead
//   denom = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
//   p = p - (lr / (1 - beta1^step)) * exp_avg / denom
// The division by sqrt(1 - beta2^step) is a multiplication by its reciprocal, computed once
// on the host (Note [fewer long-latency ops]).
struct Adam : RuleDefaults {
  static constexpr const char* kName = "adam";
  static constexpr auto kStates = specs(StateSpec{"exp_avgs", ""}, StateSpec{"exp_avg_sqs", "", true},
                                        StateSpec{"max_exp_avg_sqs", "when amsgrad=True", true});
  static constexpr StepUse kStep = StepUse::kRequired;
  enum : int { lr, beta1, beta2, eps, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"beta1", Range::kUnitOpen},
                                       HyperSpec{"beta2", Range::kUnitOpen},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { amsgrad, maximize, decoupled_weight_decay };
  static constexpr auto kFlags = names("amsgrad", "maximize", "decoupled_weight_decay");

  enum : unsigned { kDecoupled = 4u, kAmsgrad = 8u };
  static constexpr int kMaskBits = 4;
  static constexpr bool reachable(unsigned m) { return !(m & kDecoupled) || (m & kWeightDecay); }
  static unsigned mask(const CallValues& v) {
    const bool wd = v.h[weight_decay] != 0.0;
    return bits_if(v.f[maximize], kMaximize) | bits_if(wd, kWeightDecay) |
           bits_if(wd && v.f[decoupled_weight_decay], kDecoupled) | bits_if(v.f[amsgrad], kAmsgrad);
  }
  struct Args {
    double beta1, beta2, eps, weight_decay, decay, step_size, inv_bc2_sqrt;
  };
  // Per-step scalars, once on the host, as torch computes them (Python floats).
  static Args args(const CallValues& v) {
    const double s = static_cast<double>(v.step);
    const double bias_correction1 = 1.0 - std::pow(v.h[beta1], s);
    const double bias_correction2 = 1.0 - std::pow(v.h[beta2], s);
    return {v.h[beta1],
            v.h[beta2],
            v.h[eps],
            v.h[weight_decay],
            1.0 - v.h[lr] * v.h[weight_decay],
            v.h[lr] / bias_correction1,
            1.0 / std::sqrt(bias_correction2)};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kUsed =
        bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1) | ((M & kAmsgrad) ? bit(kState2) : 0u);
    static constexpr unsigned kReads = kUsed;
    static constexpr unsigned kWrites = kUsed & ~bit(kGrad);
    template <class V> struct Consts {
      V one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, neg_step_size, inv_bc2_sqrt;
      FO_HD explicit Consts(const Args& a)
          : one_minus_beta1(sp<V>(1.0 - a.beta1)), beta2(sp<V>(a.beta2)),
            one_minus_beta2(sp<V>(1.0 - a.beta2)), eps(sp<V>(a.eps)),
            weight_decay(sp<V>(a.weight_decay)), decay(sp<V>(a.decay)),
            neg_step_size(sp<V>(-a.step_size)), inv_bc2_sqrt(sp<V>(a.inv_bc2_sqrt)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      if constexpr ((M & kDecoupled) != 0) x[kParam] = x[kParam] * c.decay;
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) && !(M & kDecoupled)>(
          x, c.weight_decay);
      x[kState0] = vfma(c.one_minus_beta1, g - x[kState0], x[kState0]);
      x[kState1] = add_square(c.one_minus_beta2, g, x[kState1] * c.beta2);
      V second = x[kState1];
      if constexpr ((M & kAmsgrad) != 0) {
        x[kState2] = vmax(x[kState2], x[kState1]);
        second = x[kState2];
      }
      const V denom = vsqrt(second) * c.inv_bc2_sqrt + c.eps;
      x[kParam] = vfma(c.neg_step_size, x[kState0] / denom, x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad). Slots: 2 = sum.
//   sum = sum + g^2;  p = p - clr * g / (sqrt(sum) + eps),  clr = lr / (1 + (step - 1) * lr_decay)
struct Adagrad : RuleDefaults {
  static constexpr const char* kName = "adagrad";
  static constexpr auto kStates = specs(StateSpec{"state_sums", "", true});
  static constexpr StepUse kStep = StepUse::kRequired;
  enum : int { lr, lr_decay, weight_decay, eps };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"lr_decay", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative},
                                       HyperSpec{"eps", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  static constexpr int kMaskBits = 2;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay);
  }
  struct Args {
    double clr, eps, weight_decay;
  };
  static Args args(const CallValues& v) {
    return {v.h[lr] / (1.0 + static_cast<double>(v.step - 1) * v.h[lr_decay]), v.h[eps],
            v.h[weight_decay]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0);
    template <class V> struct Consts {
      V neg_clr, eps, weight_decay;
      FO_HD explicit Consts(const Args& a)
          : neg_clr(sp<V>(-a.clr)), eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      x[kState0] = x[kState0] + g * g;  // torch: addcmul_(g, g, value=1), the same rounding
      const V std_ = vsqrt(x[kState0]) + c.eps;
      x[kParam] = vfma(c.neg_clr, g / std_, x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// Adadelta (torch.optim.Adadelta). Slots: 2 = square_avg, 3 = acc_delta.
//   square_avg = rho * square_avg + (1 - rho) * g^2
//   delta      = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
//                (as torch: the one square root of the quotient that would save a sqrt
//                 underflows to a subnormal for |g| near the overflow bound, 10% off)
//   acc_delta  = rho * acc_delta + (1 - rho) * delta^2
//   p = p - lr * delta
struct Adadelta : RuleDefaults {
  static constexpr const char* kName = "adadelta";
  static constexpr auto kStates = specs(StateSpec{"square_avgs", "", true}, StateSpec{"acc_deltas", "", true});
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { lr, rho, eps, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"rho", Range::kUnitClosed},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  static constexpr int kMaskBits = 2;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay);
  }
  struct Args {
    double lr, rho, eps, weight_decay;
  };
  static Args args(const CallValues& v) { return {v.h[lr], v.h[rho], v.h[eps], v.h[weight_decay]}; }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
    template <class V> struct Consts {
      V neg_lr, rho, one_minus_rho, eps, weight_decay;
      FO_HD explicit Consts(const Args& a)
          : neg_lr(sp<V>(-a.lr)), rho(sp<V>(a.rho)), one_minus_rho(sp<V>(1.0 - a.rho)),
            eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      x[kState0] = add_square(c.one_minus_rho, g, x[kState0] * c.rho);
      const V delta = vsqrt(x[kState1] + c.eps) / vsqrt(x[kState0] + c.eps) * g;
      x[kState1] = add_square(c.one_minus_rho, delta, x[kState1] * c.rho);
      x[kParam] = vfma(c.neg_lr, delta, x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// NAdam (torch.optim.NAdam). Slots: 2 = exp_avg, 3 = exp_avg_sq.
//   decoupled: p = p * (1 - lr * wd)      else: g = g + wd * p
//   mu = beta1 * (1 - 0.5 * 0.96^(step * momentum_decay)), mu_next the same at step + 1
//   mu_product: mu_1 * ... * mu_step (the caller's running product, this step included)
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   denom = sqrt(exp_avg_sq / (1 - beta2^step)) + eps
//   p = p - lr * (1 - mu) / (1 - mu_product) * g / denom
//   p = p - lr * mu_next / (1 - mu_product * mu_next) * exp_avg / denom
struct Nadam : RuleDefaults {
  static constexpr const char* kName = "nadam";
  static constexpr auto kStates = specs(StateSpec{"exp_avgs", ""}, StateSpec{"exp_avg_sqs", "", true});
  static constexpr StepUse kStep = StepUse::kRequired;
  enum : int { mu_product, lr, beta1, beta2, eps, weight_decay, momentum_decay };
  static constexpr auto kHyper = specs(HyperSpec{"mu_product", Range::kUnitOpen},
                                       HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"beta1", Range::kUnitOpen},
                                       HyperSpec{"beta2", Range::kUnitOpen},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative},
                                       HyperSpec{"momentum_decay", Range::kNonNegative});
  enum : int { decoupled_weight_decay, maximize };
  static constexpr auto kFlags = names("decoupled_weight_decay", "maximize");

  enum : unsigned { kDecoupled = 4u };
  static constexpr int kMaskBits = 3;
  static constexpr bool reachable(unsigned m) { return !(m & kDecoupled) || (m & kWeightDecay); }
  static unsigned mask(const CallValues& v) {
    const bool wd = v.h[weight_decay] != 0.0;
    return bits_if(v.f[maximize], kMaximize) | bits_if(wd, kWeightDecay) |
           bits_if(wd && v.f[decoupled_weight_decay], kDecoupled);
  }
  struct Args {
    double beta1, beta2, eps, weight_decay, decay, inv_bc2, grad_coef, avg_coef;
  };
  static Args args(const CallValues& v) {
    const double s = static_cast<double>(v.step);
    const double mu = v.h[beta1] * (1.0 - 0.5 * std::pow(0.96, s * v.h[momentum_decay]));
    const double mu_next = v.h[beta1] * (1.0 - 0.5 * std::pow(0.96, (s + 1.0) * v.h[momentum_decay]));
    const double bias_correction2 = 1.0 - std::pow(v.h[beta2], s);
    return {v.h[beta1],
            v.h[beta2],
            v.h[eps],
            v.h[weight_decay],
            1.0 - v.h[lr] * v.h[weight_decay],
            1.0 / bias_correction2,
            -v.h[lr] * (1.0 - mu) / (1.0 - v.h[mu_product]),
            (-v.h[lr] * mu_next) / (1.0 - v.h[mu_product] * mu_next)};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
    template <class V> struct Consts {
      V one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, inv_bc2, grad_coef, avg_coef;
      FO_HD explicit Consts(const Args& a)
          : one_minus_beta1(sp<V>(1.0 - a.beta1)), beta2(sp<V>(a.beta2)),
            one_minus_beta2(sp<V>(1.0 - a.beta2)), eps(sp<V>(a.eps)),
            weight_decay(sp<V>(a.weight_decay)), decay(sp<V>(a.decay)), inv_bc2(sp<V>(a.inv_bc2)),
            grad_coef(sp<V>(a.grad_coef)), avg_coef(sp<V>(a.avg_coef)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      if constexpr ((M & kDecoupled) != 0) x[kParam] = x[kParam] * c.decay;
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) && !(M & kDecoupled)>(
          x, c.weight_decay);
      x[kState0] = vfma(c.one_minus_beta1, g - x[kState0], x[kState0]);
      x[kState1] = add_square(c.one_minus_beta2, g, x[kState1] * c.beta2);
      const V denom = vsqrt(x[kState1] * c.inv_bc2) + c.eps;
      x[kParam] = vfma(c.grad_coef, g / denom, x[kParam]);
      x[kParam] = vfma(c.avg_coef, x[kState0] / denom, x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// RAdam (torch.optim.RAdam). Slots: 2 = exp_avg, 3 = exp_avg_sq.
//   decoupled: p = p * (1 - lr * wd)      else: g = g + wd * p
//   exp_avg = lerp(exp_avg, g, 1 - beta1);  exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   rho_inf = 2 / (1 - beta2) - 1;  rho_t = rho_inf - 2 step beta2^step / (1 - beta2^step)
//   rho_t > 5 (rectified, a per-step choice made on the host):
//     p = p - exp_avg / (1 - beta1^step) * lr * sqrt(1 - beta2^step) / (sqrt(exp_avg_sq) + eps) * rect
//     rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//   else: p = p - exp_avg / (1 - beta1^step) * lr
struct Radam : RuleDefaults {
  static constexpr const char* kName = "radam";
  static constexpr auto kStates = specs(StateSpec{"exp_avgs", ""}, StateSpec{"exp_avg_sqs", "", true});
  static constexpr StepUse kStep = StepUse::kRequired;
  enum : int { lr, beta1, beta2, eps, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"beta1", Range::kUnitOpen},
                                       HyperSpec{"beta2", Range::kUnitOpen},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { decoupled_weight_decay, maximize };
  static constexpr auto kFlags = names("decoupled_weight_decay", "maximize");

  enum : unsigned { kDecoupled = 4u, kRectified = 8u };
  static constexpr int kMaskBits = 4;
  static constexpr bool reachable(unsigned m) { return !(m & kDecoupled) || (m & kWeightDecay); }
  static double rho_t(const CallValues& v, double* rho_inf) {
    const double s = static_cast<double>(v.step);
    *rho_inf = 2.0 / (1.0 - v.h[beta2]) - 1.0;
    return *rho_inf - 2.0 * s * std::pow(v.h[beta2], s) / (1.0 - std::pow(v.h[beta2], s));
  }
  static unsigned mask(const CallValues& v) {
    const bool wd = v.h[weight_decay] != 0.0;
    double rho_inf;
    return bits_if(v.f[maximize], kMaximize) | bits_if(wd, kWeightDecay) |
           bits_if(wd && v.f[decoupled_weight_decay], kDecoupled) |
           bits_if(rho_t(v, &rho_inf) > 5.0, kRectified);
  }
  struct Args {
    double beta1, beta2, eps, weight_decay, decay, lr_over_bc1, adaptive_scale;
  };
  static Args args(const CallValues& v) {
    const double s = static_cast<double>(v.step);
    const double bias_correction1 = 1.0 - std::pow(v.h[beta1], s);
    const double bias_correction2 = 1.0 - std::pow(v.h[beta2], s);
    double rho_inf;
    const double rt = rho_t(v, &rho_inf);
    const double rect = rt > 5.0 ? std::sqrt((rt - 4.0) * (rt - 2.0) * rho_inf /
                                             ((rho_inf - 4.0) * (rho_inf - 2.0) * rt))
                                 : 0.0;
    return {v.h[beta1], v.h[beta2], v.h[eps], v.h[weight_decay], 1.0 - v.h[lr] * v.h[weight_decay],
            v.h[lr] / bias_correction1, std::sqrt(bias_correction2) * rect};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
    template <class V> struct Consts {
      V one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, lr_over_bc1, adaptive_scale;
      FO_HD explicit Consts(const Args& a)
          : one_minus_beta1(sp<V>(1.0 - a.beta1)), beta2(sp<V>(a.beta2)),
            one_minus_beta2(sp<V>(1.0 - a.beta2)), eps(sp<V>(a.eps)),
            weight_decay(sp<V>(a.weight_decay)), decay(sp<V>(a.decay)),
            lr_over_bc1(sp<V>(a.lr_over_bc1)), adaptive_scale(sp<V>(a.adaptive_scale)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      if constexpr ((M & kDecoupled) != 0) x[kParam] = x[kParam] * c.decay;
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) && !(M & kDecoupled)>(
          x, c.weight_decay);
      x[kState0] = vfma(c.one_minus_beta1, g - x[kState0], x[kState0]);
      x[kState1] = add_square(c.one_minus_beta2, g, x[kState1] * c.beta2);
      const V step = x[kState0] * c.lr_over_bc1;
      if constexpr ((M & kRectified) != 0) {
        x[kParam] = x[kParam] - step * (c.adaptive_scale / (vsqrt(x[kState1]) + c.eps));
      } else {
        x[kParam] = x[kParam] - step;
      }
    }
  };
};

// ---------------------------------------------------------------------------------------
// Adamax (torch.optim.Adamax). Slots: 2 = exp_avg, 3 = exp_inf.
//   g = g + wd * p
//   exp_avg = lerp(exp_avg, g, 1 - beta1)
//   exp_inf = maximum(beta2 * exp_inf, |g| + eps)       (NaN-propagating, as torch.maximum)
//   p = p - lr / (1 - beta1^step) * exp_avg / exp_inf
struct Adamax : RuleDefaults {
  static constexpr const char* kName = "adamax";
  static constexpr auto kStates = specs(StateSpec{"exp_avgs", ""}, StateSpec{"exp_infs", "", true});
  static constexpr StepUse kStep = StepUse::kRequired;
  enum : int { lr, beta1, beta2, eps, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"beta1", Range::kUnitOpen},
                                       HyperSpec{"beta2", Range::kUnitOpen},
                                       HyperSpec{"eps", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  static constexpr int kMaskBits = 2;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay);
  }
  struct Args {
    double beta1, beta2, eps, weight_decay, clr;
  };
  static Args args(const CallValues& v) {
    const double bias_correction = 1.0 - std::pow(v.h[beta1], static_cast<double>(v.step));
    return {v.h[beta1], v.h[beta2], v.h[eps], v.h[weight_decay], v.h[lr] / bias_correction};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
    template <class V> struct Consts {
      V one_minus_beta1, beta2, eps, weight_decay, neg_clr;
      FO_HD explicit Consts(const Args& a)
          : one_minus_beta1(sp<V>(1.0 - a.beta1)), beta2(sp<V>(a.beta2)), eps(sp<V>(a.eps)),
            weight_decay(sp<V>(a.weight_decay)), neg_clr(sp<V>(-a.clr)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      x[kState0] = vfma(c.one_minus_beta1, g - x[kState0], x[kState0]);
      x[kState1] = vmax(x[kState1] * c.beta2, vabs(g) + c.eps);
      x[kParam] = vfma(c.neg_clr, x[kState0] / x[kState1], x[kParam]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// ASGD (torch.optim.ASGD). Slots: 2 = ax.
//   g = g + wd * p
//   p = p * (1 - lambd * eta);  p = p - eta * g
//   ax = ax + (p - ax) * mu   (mu != 1)      ax = p   (mu == 1: ax is not read)
// eta and mu are torch's per-parameter scalar states: the caller passes their current values
// and advances them after the step (fastoptim.functional.asgd_next).
struct Asgd : RuleDefaults {
  static constexpr const char* kName = "asgd";
  static constexpr auto kStates = specs(StateSpec{"axs", ""});
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { eta, mu, lambd, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"eta", Range::kNonNegative},
                                       HyperSpec{"mu", Range::kUnitClosed},
                                       HyperSpec{"lambd", Range::kNonNegative},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  enum : unsigned { kAverage = 4u };
  static constexpr int kMaskBits = 3;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay) |
           bits_if(v.h[mu] != 1.0, kAverage);
  }
  struct Args {
    double decay, eta, mu, weight_decay;
  };
  static Args args(const CallValues& v) {
    return {1.0 - v.h[lambd] * v.h[eta], v.h[eta], v.h[mu], v.h[weight_decay]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | ((M & kAverage) ? bit(kState0) : 0u);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0);
    template <class V> struct Consts {
      V decay, neg_eta, mu, weight_decay;
      FO_HD explicit Consts(const Args& a)
          : decay(sp<V>(a.decay)), neg_eta(sp<V>(-a.eta)), mu(sp<V>(a.mu)),
            weight_decay(sp<V>(a.weight_decay)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      const V g = decayed_grad<(M & kMaximize) != 0, (M & kWeightDecay) != 0>(x, c.weight_decay);
      x[kParam] = x[kParam] * c.decay;
      x[kParam] = vfma(c.neg_eta, g, x[kParam]);
      if constexpr ((M & kAverage) != 0) {
        x[kState0] = x[kState0] + (x[kParam] - x[kState0]) * c.mu;
      } else {
        x[kState0] = x[kParam];
      }
    }
  };
};

// ---------------------------------------------------------------------------------------
// Rprop (torch.optim.Rprop). Slots: 2 = prev, 3 = step_size.
//   s = g * prev;  f = etaplus (s > 0), etaminus (s < 0), 1 otherwise (s == 0, or NaN:
//                  torch takes sign(s), which is 0 for NaN)
//   step_size = clamp(step_size * f, step_size_min, step_size_max)
//   g = 0 where f == etaminus
//   p = p - sign(g) * step_size;  prev = g
// torch has no weight decay for Rprop; the learning rate only initialises step_size.
struct Rprop : RuleDefaults {
  static constexpr const char* kName = "rprop";
  static constexpr auto kStates = specs(StateSpec{"prevs", ""}, StateSpec{"step_sizes", "", true});
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { etaminus, etaplus, step_size_min, step_size_max };
  static constexpr auto kHyper = specs(HyperSpec{"etaminus", Range::kNonNegative},
                                       HyperSpec{"etaplus", Range::kNonNegative},
                                       HyperSpec{"step_size_min", Range::kNonNegative},
                                       HyperSpec{"step_size_max", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  static constexpr int kMaskBits = 1;
  static const char* check(const CallValues& v) {
    if (!(v.h[etaminus] > 0.0 && v.h[etaminus] < 1.0 && v.h[etaplus] > 1.0))
      return "etas must satisfy 0 < etaminus < 1 < etaplus";
    return nullptr;
  }
  static unsigned mask(const CallValues& v) { return bits_if(v.f[maximize], kMaximize); }
  struct Args {
    double etaminus, etaplus, step_size_min, step_size_max;
  };
  static Args args(const CallValues& v) {
    return {v.h[etaminus], v.h[etaplus], v.h[step_size_min], v.h[step_size_max]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
    template <class V> struct Consts {
      V etaminus, etaplus, lo, hi;
      FO_HD explicit Consts(const Args& a)
          : etaminus(sp<V>(a.etaminus)), etaplus(sp<V>(a.etaplus)), lo(sp<V>(a.step_size_min)),
            hi(sp<V>(a.step_size_max)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      V g = x[kGrad];
      if constexpr ((M & kMaximize) != 0) g = -g;
      const V s = g * x[kState0];
      const V zero = sp<V>(0.0);
      const V f = vselect(vgt(s, zero), c.etaplus, vselect(vlt(s, zero), c.etaminus, sp<V>(1.0)));
      x[kState1] = vmin(vmax(x[kState1] * f, c.lo), c.hi);
      g = vselect(veq(f, c.etaminus), zero, g);
      x[kParam] = vfma(-vsign(g), x[kState1], x[kParam]);
      x[kState0] = g;
    }
  };
};

// ---------------------------------------------------------------------------------------
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).
// Slots: 2 = exp_avg (the paper's m).
//   g = -grad if maximize
//   c = beta1 * m + (1 - beta1) * g
//   p = p * (1 - lr * wd) - lr * sign(c)      sign as torch.sign: sign(0) = 0 (and NaN -> 0)
//   m = beta2 * m + (1 - beta2) * g
// sign(0) = 0: an element whose interpolation is exactly 0 only decays; the paper leaves it
// open, and torch.sign (lion-pytorch, bitsandbytes' CUDA kernel) gives 0 as well.
struct Lion : RuleDefaults {
  static constexpr const char* kName = "lion";
  static constexpr auto kStates = specs(StateSpec{"exp_avgs", ""});
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { lr, beta1, beta2, weight_decay };
  static constexpr auto kHyper = specs(HyperSpec{"lr", Range::kNonNegative},
                                       HyperSpec{"beta1", Range::kUnitClosed},
                                       HyperSpec{"beta2", Range::kUnitClosed},
                                       HyperSpec{"weight_decay", Range::kNonNegative});
  enum : int { maximize };
  static constexpr auto kFlags = names("maximize");

  static constexpr int kMaskBits = 2;
  static unsigned mask(const CallValues& v) {
    return bits_if(v.f[maximize], kMaximize) | bits_if(v.h[weight_decay] != 0.0, kWeightDecay);
  }
  struct Args {
    double lr, beta1, beta2, decay;
  };
  static Args args(const CallValues& v) {
    return {v.h[lr], v.h[beta1], v.h[beta2], 1.0 - v.h[lr] * v.h[weight_decay]};
  }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0);
    static constexpr unsigned kWrites = bit(kParam) | bit(kState0);
    template <class V> struct Consts {
      V neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
      FO_HD explicit Consts(const Args& a)
          : neg_lr(sp<V>(-a.lr)), beta1(sp<V>(a.beta1)), one_minus_beta1(sp<V>(1.0 - a.beta1)),
            beta2(sp<V>(a.beta2)), one_minus_beta2(sp<V>(1.0 - a.beta2)), decay(sp<V>(a.decay)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      V g = x[kGrad];
      if constexpr ((M & kMaximize) != 0) g = -g;
      // Not fused: the sign of c decides a step of lr, so c is rounded exactly as the paper's
      // expression (and the reference) rounds it, product by product.
      const V update = c.beta1 * x[kState0] + c.one_minus_beta1 * g;
      if constexpr ((M & kWeightDecay) != 0) x[kParam] = x[kParam] * c.decay;
      x[kParam] = vfma(c.neg_lr, vsign(update), x[kParam]);
      x[kState0] = vfma(c.one_minus_beta2, g, c.beta2 * x[kState0]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// Exponentially weighted average. Slots: 0 = average (written), 1 = value (read only).
//   avg = lerp(avg, value, 1 - beta) = beta * avg + (1 - beta) * value
struct Ema : RuleDefaults {
  static constexpr const char* kName = "ema";
  static constexpr const char* kParams = "averages";
  static constexpr const char* kGrads = "values";
  static constexpr auto kStates = no_specs<StateSpec>();
  static constexpr StepUse kStep = StepUse::kNone;
  enum : int { beta };
  static constexpr auto kHyper = specs(HyperSpec{"beta", Range::kUnitClosed});
  static constexpr auto kFlags = names();

  static constexpr int kMaskBits = 0;
  static unsigned mask(const CallValues&) { return 0; }
  struct Args {
    double beta;
  };
  static Args args(const CallValues& v) { return {v.h[beta]}; }

  template <unsigned M> struct Rule {
    static constexpr unsigned kReads = bit(0) | bit(1);
    static constexpr unsigned kWrites = bit(0);
    template <class V> struct Consts {
      V one_minus_beta;
      FO_HD explicit Consts(const Args& a) : one_minus_beta(sp<V>(1.0 - a.beta)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      x[0] = vfma(c.one_minus_beta, x[1] - x[0], x[0]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// The in-place ceiling of the benchmarks (_core.stream_rmw): the streams of an optimizer and
// trivial arithmetic, so it runs at what the memory system allows for that traffic. Variant M
// reads R = M + 2 streams and writes the first W = M + 1: x[k] = x[k] + scale * x[R-1], k < W.
// Not an optimizer: bindings.cpp gives it its own entry point (a list of streams).
struct Stream : RuleDefaults {
  static constexpr const char* kName = "stream";
  static constexpr int kMaskBits = 2;
  struct Args {
    double scale;
  };
  template <unsigned M> struct Rule {
    static constexpr int R = static_cast<int>(M) + 2, W = static_cast<int>(M) + 1;
    static constexpr unsigned kReads = (1u << R) - 1u;
    static constexpr unsigned kWrites = (1u << W) - 1u;
    template <class V> struct Consts {
      V scale;
      FO_HD explicit Consts(const Args& a) : scale(sp<V>(a.scale)) {}
    };
    template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
      for (int k = 0; k < W; ++k) x[k] = vfma(c.scale, x[R - 1], x[k]);
    }
  };
};

// ---------------------------------------------------------------------------------------
// Every rule, once. The order is the RuleId order (kernel_api.h). FO_UPDATE_RULES are the
// functional updates, each with an entry point _core.<kName>; FO_RULES adds the benchmark's
// ceiling loop.
#define FO_UPDATE_RULES(X) \
  X(Sgd)                   \
  X(Rmsprop)               \
  X(Adam)                  \
  X(Adagrad)               \
  X(Adadelta)              \
  X(Nadam)                 \
  X(Radam)                 \
  X(Adamax)                \
  X(Asgd)                  \
  X(Rprop)                 \
  X(Lion)                  \
  X(Ema)
#define FO_RULES(X) FO_UPDATE_RULES(X) X(Stream)

}  // namespace fastoptim
