// rules.h: every update rule of fastoptim, written ONCE.
//
// Each rule is a struct templated on its formula variants (compile-time flags, never
// per-element branches) with
//   kReads / kWrites  bit masks over the stream slots it loads and stores,
//   Consts<V>         the per-step scalars, computed on the host and splat once per call,
//   apply(x, c)       the update of one lane group, x[slot] holding the loaded values.
// The same text is instantiated for scalar C++, AVX2, AVX-512 (kernels.h) and CUDA
// (src/cuda/), so the math cannot drift between targets.
//
// Stream slots: 0 = param, 1 = grad (read only), 2.. = optimizer states in the order of the
// functional API's arguments. Algorithms and order of operations follow torch.optim 2.13's
// `_single_tensor_<name>` functions; where torch computes `x + alpha*y` we write
// vfma(alpha, y, x) (one rounding instead of two; see Note [bitwise identical paths]).
//
// Note [fewer long-latency ops]
// Division and square root are the only slow instructions in these rules (on the AVX2
// machines at hand a 256-bit vdivps/vsqrtps issues every ~5 cycles, against memory that
// streams 8 floats of 7 arrays in about as long), so a 1-thread update of in-cache or even
// DRAM-sized arrays can be bound by them. Where an algebraically equal form needs fewer of
// them it is used: a host-side reciprocal instead of a per-element division by a per-step
// scalar (Adam), one square root of a quotient instead of a quotient of square roots
// (Adadelta). Each differs from torch's rounding by at most a couple of ulps (the tests'
// fp32 tolerance is 1e-6 relative, fp64 1e-12), and scalar, AVX2 and AVX-512 still agree
// bitwise with each other.
//
// Invariants: a rule reads each slot at most once and writes each written slot once, so one
// pass over memory is the whole update (Adam fp32: 16 B read + 12 B written per element).
// Per-step scalars such as bias corrections are NEVER recomputed per element.
#pragma once

#include "vec.h"

namespace fastoptim {

enum Slot : int { kParam = 0, kGrad = 1, kState0 = 2, kState1 = 3, kState2 = 4, kMaxSlots = 5 };
constexpr unsigned bit(int slot) { return 1u << slot; }

// ---------------------------------------------------------------------------------------
// Host-side arguments, one struct per rule (doubles; cast to the array dtype once per call).
struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool has_momentum, nesterov, first_step, maximize;
};
struct RmspropArgs {
  double lr, alpha, eps, weight_decay, momentum;
  bool centered, has_momentum, maximize;
};
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool amsgrad, decoupled, maximize;
};
struct AdagradArgs {
  double clr, eps, weight_decay;  // clr = lr / (1 + (step - 1) * lr_decay)
  bool maximize;
};
struct AdadeltaArgs {
  double lr, rho, eps, weight_decay;
  bool maximize;
};
struct EmaArgs {
  double beta;
};
struct StreamArgs {  // the bandwidth ceiling: reads `reads` slots, writes the first `writes`
  int reads, writes;
  double scale;
};

template <class V> using ScalarOf = typename VecTraits<V>::Scalar;
template <class V, class D> FO_HD FO_INLINE V sp(D x) { return splat<V>(static_cast<ScalarOf<V>>(x)); }

// Shared first lines of every rule: g = -grad if maximize; g += weight_decay * p (L2).
template <bool kMaximize, bool kL2, class V>
FO_HD FO_INLINE V decayed_grad(const V* x, V weight_decay) {
  V g = x[kGrad];
  if constexpr (kMaximize) g = -g;
  if constexpr (kL2) g = vfma(weight_decay, x[kParam], g);
  return g;
}

// ---------------------------------------------------------------------------------------
// SGD (torch.optim.SGD). Slots: 2 = momentum_buffer.
//   g = -grad if maximize;  g += wd * p
//   buf = g                                   (first step: torch's "buffer is None")
//   buf = momentum * buf + (1 - dampening) * g (later steps)
//   g = g + momentum * buf  (nesterov)  or  g = buf
//   p = p - lr * g
template <bool kMaximize, bool kWeightDecay, bool kMomentum, bool kNesterov, bool kFirstStep>
struct SgdRule {
  using Args = SgdArgs;
  static constexpr unsigned kReads =
      bit(kParam) | bit(kGrad) | ((kMomentum && !kFirstStep) ? bit(kState0) : 0u);
  static constexpr unsigned kWrites = bit(kParam) | (kMomentum ? bit(kState0) : 0u);
  template <class V> struct Consts {
    V neg_lr, momentum, one_minus_dampening, weight_decay;
    FO_HD explicit Consts(const Args& a)
        : neg_lr(sp<V>(-a.lr)), momentum(sp<V>(a.momentum)),
          one_minus_dampening(sp<V>(1.0 - a.dampening)), weight_decay(sp<V>(a.weight_decay)) {}
  };
  template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
    V g = decayed_grad<kMaximize, kWeightDecay>(x, c.weight_decay);
    if constexpr (kMomentum) {
      if constexpr (kFirstStep) {
        x[kState0] = g;
      } else {
        x[kState0] = vfma(c.one_minus_dampening, g, x[kState0] * c.momentum);
      }
      if constexpr (kNesterov) {
        g = vfma(c.momentum, x[kState0], g);
      } else {
        g = x[kState0];
      }
    }
    x[kParam] = vfma(c.neg_lr, g, x[kParam]);
  }
};

// ---------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop). Slots: 2 = square_avg, 3 = grad_avg, 4 = momentum_buffer.
//   square_avg = alpha * square_avg + (1 - alpha) * g^2
//   centered:  grad_avg = lerp(grad_avg, g, 1 - alpha); avg = sqrt(square_avg - grad_avg^2)
//   else:      avg = sqrt(square_avg)
//   avg = avg + eps
//   momentum:  buf = momentum * buf + g / avg;  p = p - lr * buf
//   else:      p = p - lr * g / avg
template <bool kMaximize, bool kWeightDecay, bool kCentered, bool kMomentum>
struct RmspropRule {
  using Args = RmspropArgs;
  static constexpr unsigned kUsed = bit(kParam) | bit(kGrad) | bit(kState0) |
                                    (kCentered ? bit(kState1) : 0u) | (kMomentum ? bit(kState2) : 0u);
  static constexpr unsigned kReads = kUsed;
  static constexpr unsigned kWrites = kUsed & ~bit(kGrad);
  template <class V> struct Consts {
    V neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
    FO_HD explicit Consts(const Args& a)
        : neg_lr(sp<V>(-a.lr)), alpha(sp<V>(a.alpha)), one_minus_alpha(sp<V>(1.0 - a.alpha)),
          eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)), momentum(sp<V>(a.momentum)) {}
  };
  template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
    const V g = decayed_grad<kMaximize, kWeightDecay>(x, c.weight_decay);
    x[kState0] = vfma(c.one_minus_alpha, g * g, x[kState0] * c.alpha);
    V avg;
    if constexpr (kCentered) {
      x[kState1] = vfma(c.one_minus_alpha, g - x[kState1], x[kState1]);
      avg = vsqrt(x[kState0] - x[kState1] * x[kState1]);
    } else {
      avg = vsqrt(x[kState0]);
    }
    avg = avg + c.eps;
    if constexpr (kMomentum) {
      x[kState2] = x[kState2] * c.momentum + g / avg;
      x[kParam] = vfma(c.neg_lr, x[kState2], x[kParam]);
    } else {
      x[kParam] = vfma(c.neg_lr, g / avg, x[kParam]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam, decoupled_weight_decay for AdamW).
// Slots: 2 = exp_avg, 3 = exp_avg_sq, 4 = max_exp_avg_sq.
//   AdamW: p = p * (1 - lr * wd)      Adam: g = g + wd * p
//   exp_avg    = lerp(exp_avg, g, 1 - beta1)
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   amsgrad:   max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq), used below instead
//   denom = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
//   p = p - (lr / (1 - beta1^step)) * exp_avg / denom
// The division by sqrt(1 - beta2^step) is a multiplication by its reciprocal, computed once
// on the host (Note [fewer long-latency ops]).
template <bool kMaximize, bool kWeightDecay, bool kDecoupled, bool kAmsgrad>
struct AdamRule {
  using Args = AdamArgs;
  static constexpr unsigned kUsed =
      bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1) | (kAmsgrad ? bit(kState2) : 0u);
  static constexpr unsigned kReads = kUsed;
  static constexpr unsigned kWrites = kUsed & ~bit(kGrad);
  template <class V> struct Consts {
    V one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, neg_step_size, inv_bc2_sqrt;
    FO_HD explicit Consts(const Args& a)
        : one_minus_beta1(sp<V>(1.0 - a.beta1)), beta2(sp<V>(a.beta2)),
          one_minus_beta2(sp<V>(1.0 - a.beta2)), eps(sp<V>(a.eps)),
          weight_decay(sp<V>(a.weight_decay)), decay(sp<V>(1.0 - a.lr * a.weight_decay)),
          neg_step_size(sp<V>(-a.step_size)), inv_bc2_sqrt(sp<V>(1.0 / a.bias_correction2_sqrt)) {}
  };
  template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
    if constexpr (kWeightDecay && kDecoupled) x[kParam] = x[kParam] * c.decay;
    const V g = decayed_grad<kMaximize, kWeightDecay && !kDecoupled>(x, c.weight_decay);
    x[kState0] = vfma(c.one_minus_beta1, g - x[kState0], x[kState0]);
    x[kState1] = vfma(c.one_minus_beta2, g * g, x[kState1] * c.beta2);
    V second = x[kState1];
    if constexpr (kAmsgrad) {
      x[kState2] = vmax(x[kState2], x[kState1]);
      second = x[kState2];
    }
    const V denom = vsqrt(second) * c.inv_bc2_sqrt + c.eps;
    x[kParam] = vfma(c.neg_step_size, x[kState0] / denom, x[kParam]);
  }
};

// ---------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad). Slots: 2 = sum.
//   sum = sum + g^2;  p = p - clr * g / (sqrt(sum) + eps)
template <bool kMaximize, bool kWeightDecay>
struct AdagradRule {
  using Args = AdagradArgs;
  static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0);
  static constexpr unsigned kWrites = bit(kParam) | bit(kState0);
  template <class V> struct Consts {
    V neg_clr, eps, weight_decay;
    FO_HD explicit Consts(const Args& a)
        : neg_clr(sp<V>(-a.clr)), eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)) {}
  };
  template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
    const V g = decayed_grad<kMaximize, kWeightDecay>(x, c.weight_decay);
    x[kState0] = x[kState0] + g * g;
    const V std_ = vsqrt(x[kState0]) + c.eps;
    x[kParam] = vfma(c.neg_clr, g / std_, x[kParam]);
  }
};

// ---------------------------------------------------------------------------------------
// Adadelta (torch.optim.Adadelta). Slots: 2 = square_avg, 3 = acc_delta.
//   square_avg = rho * square_avg + (1 - rho) * g^2
//   delta      = sqrt((acc_delta + eps) / (square_avg + eps)) * g
//                (torch: sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g; one square root
//                 fewer, Note [fewer long-latency ops])
//   acc_delta  = rho * acc_delta + (1 - rho) * delta^2
//   p = p - lr * delta
template <bool kMaximize, bool kWeightDecay>
struct AdadeltaRule {
  using Args = AdadeltaArgs;
  static constexpr unsigned kReads = bit(kParam) | bit(kGrad) | bit(kState0) | bit(kState1);
  static constexpr unsigned kWrites = bit(kParam) | bit(kState0) | bit(kState1);
  template <class V> struct Consts {
    V neg_lr, rho, one_minus_rho, eps, weight_decay;
    FO_HD explicit Consts(const Args& a)
        : neg_lr(sp<V>(-a.lr)), rho(sp<V>(a.rho)), one_minus_rho(sp<V>(1.0 - a.rho)),
          eps(sp<V>(a.eps)), weight_decay(sp<V>(a.weight_decay)) {}
  };
  template <class V> static FO_HD FO_INLINE void apply(V* x, const Consts<V>& c) {
    const V g = decayed_grad<kMaximize, kWeightDecay>(x, c.weight_decay);
    x[kState0] = vfma(c.one_minus_rho, g * g, x[kState0] * c.rho);
    const V delta = vsqrt((x[kState1] + c.eps) / (x[kState0] + c.eps)) * g;
    x[kState1] = vfma(c.one_minus_rho, delta * delta, x[kState1] * c.rho);
    x[kParam] = vfma(c.neg_lr, delta, x[kParam]);
  }
};

// ---------------------------------------------------------------------------------------
// Exponentially weighted average. Slots: 0 = average (written), 1 = value (read only).
//   avg = lerp(avg, value, 1 - beta) = beta * avg + (1 - beta) * value
struct EmaRule {
  using Args = EmaArgs;
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

// ---------------------------------------------------------------------------------------
// The in-place ceiling: the same streams as an optimizer and trivial arithmetic, so it runs
// at what the memory system allows for that traffic. x[k] = x[k] + scale * x[R-1] for k < W.
template <int R, int W>
struct StreamRule {
  using Args = StreamArgs;
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

}  // namespace fastoptim
