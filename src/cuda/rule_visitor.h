// rule_visitor.h: what one CUDA thread does with the elements the launch plan gives it,
// written once for the GPU and for its emulation on the CPU.
//
// plan::span_body (src/cpp/launch_plan.h) hands a visitor single elements (scalar) and groups
// of 16 bytes (vector: 4 floats or 2 doubles, every slot 16-byte aligned). RuleVisitor loads
// the rule's slots, runs Rule::apply<T> (T = float or double) lane by lane, and stores the
// written slots. Compiled by nvcc for the device (kernels.cuh), the loads and stores are
// 16-byte global accesses with cache hints; compiled for the host (plan_hooks.cpp,
// emulate.cpp, _core._emulate_kernel), they are plain element accesses, and the same kernel
// body runs on NumPy arrays so that the tests compare it bit for bit with the CPU kernels.
//
// Also here: dispatch_rule, the runtime flags -> rule instantiation of a call, shared by the
// CUDA launchers and the emulation.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../cpp/kernel_api.h"
#include "../cpp/launch_plan.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace fastoptim {
namespace cuda {

#if defined(__CUDA_ARCH__)
#define FO_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define FO_UNROLL  // nvcc's host pass: the visitor runs on the device only
#else
#define FO_UNROLL _Pragma("GCC unroll 8")
#endif

template <class T> struct VecWidth {
  static constexpr int value = static_cast<int>(plan::kVecBytes / sizeof(T));
};

#if defined(__CUDA_ARCH__)
template <class T> struct Vec16;
template <> struct Vec16<float> { using type = float4; };
template <> struct Vec16<double> { using type = double2; };
__device__ FO_INLINE void to_lanes(float4 v, float* x) {
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
__device__ FO_INLINE void to_lanes(double2 v, double* x) { x[0] = v.x; x[1] = v.y; }
__device__ FO_INLINE float4 from_lanes(const float* x) { return make_float4(x[0], x[1], x[2], x[3]); }
__device__ FO_INLINE double2 from_lanes(const double* x) { return make_double2(x[0], x[1]); }
#endif

// Loads and stores name the global space on the device (the pointers come from metadata, so
// the compiler would otherwise emit generic accesses): read-only slots (grads) go through the
// read-only path (ld.global.nc), read-write slots are cached in L2 only (ld/st.global.cg):
// each element of an update is touched exactly once.
template <bool kReadOnly, class T> FO_HD FO_INLINE T load1(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (kReadOnly) return __ldg(p); else return __ldcg(p);
#else
  return *p;
#endif
}
template <class T> FO_HD FO_INLINE void store1(T* p, T v) {
#if defined(__CUDA_ARCH__)
  __stcg(p, v);
#else
  *p = v;
#endif
}
template <bool kReadOnly, class T> FO_HD FO_INLINE void load16(const T* p, T* lanes) {
#if defined(__CUDA_ARCH__)
  using L = typename Vec16<T>::type;
  const L* q = reinterpret_cast<const L*>(p);
  if constexpr (kReadOnly) to_lanes(__ldg(q), lanes); else to_lanes(__ldcg(q), lanes);
#else
  for (int l = 0; l < VecWidth<T>::value; ++l) lanes[l] = p[l];
#endif
}
template <class T> FO_HD FO_INLINE void store16(T* p, const T* lanes) {
#if defined(__CUDA_ARCH__)
  using L = typename Vec16<T>::type;
  __stcg(reinterpret_cast<L*>(p), from_lanes(lanes));
#else
  for (int l = 0; l < VecWidth<T>::value; ++l) p[l] = lanes[l];
#endif
}

// The visitor of plan::span_body: load, Rule::apply, store.
template <class Rule, class T> struct RuleVisitor {
  static constexpr unsigned kReadOnly = Rule::kReads & ~Rule::kWrites;  // grads
  using Consts = typename Rule::template Consts<T>;
  const Consts& c;

  FO_HD FO_INLINE void scalar(const plan::SpanPtrs<T>& sp, int64_t, int64_t i) const {
    T x[kMaxSlots];
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s) {
      if (kReadOnly & (1u << s)) x[s] = load1<true>(sp.p[s] + i);
      else if (Rule::kReads & (1u << s)) x[s] = load1<false>(sp.p[s] + i);
    }
    Rule::template apply<T>(x, c);
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s)
      if (Rule::kWrites & (1u << s)) store1(sp.p[s] + i, x[s]);
  }

  FO_HD FO_INLINE void vector(const plan::SpanPtrs<T>& sp, int64_t, int64_t i) const {
    constexpr int kW = VecWidth<T>::value;
    T lanes[kMaxSlots][kW];
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s) {
      if (kReadOnly & (1u << s)) load16<true>(sp.p[s] + i, lanes[s]);
      else if (Rule::kReads & (1u << s)) load16<false>(sp.p[s] + i, lanes[s]);
    }
FO_UNROLL
    for (int l = 0; l < kW; ++l) {
      T x[kMaxSlots];
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kReads & (1u << s)) x[s] = lanes[s][l];
      Rule::template apply<T>(x, c);
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kWrites & (1u << s)) lanes[s][l] = x[s];
    }
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s)
      if (Rule::kWrites & (1u << s)) store16(sp.p[s] + i, lanes[s]);
  }
};

// ---- runtime flags -> rule instantiation -------------------------------------------------
// Once per call, never per element (kernels.h's with_flags). dispatch_rule(args, f) calls
// f(RuleTag<Rule>{}) with the instantiation for the call's flags; the CUDA launchers
// (rules_*.cu) and the CPU emulation (emulate.cpp) share it. Flags that cannot change the
// result are not instantiated twice (SGD's nesterov and first step without momentum, Adam's
// decoupled without weight decay): the same update, fewer kernels to compile.
template <class R> struct RuleTag { using type = R; };

template <class F> void with_flags(F&& f) { f(); }
template <class F, class... Rest> void with_flags(F&& f, bool b, Rest... rest) {
  if (b) {
    with_flags([&](auto... xs) { f(std::true_type{}, xs...); }, rest...);
  } else {
    with_flags([&](auto... xs) { f(std::false_type{}, xs...); }, rest...);
  }
}
#define FO_V(flag) decltype(flag)::value

template <class F> void dispatch_rule(const SgdArgs& a, F&& f) {
  with_flags([&](auto mx, auto wd, auto mom) {
    if constexpr (FO_V(mom)) {
      with_flags([&](auto nes, auto first) {
        f(RuleTag<SgdRule<FO_V(mx), FO_V(wd), true, FO_V(nes), FO_V(first)>>{});
      }, a.nesterov, a.first_step);
    } else {
      f(RuleTag<SgdRule<FO_V(mx), FO_V(wd), false, false, false>>{});
    }
  }, a.maximize, a.weight_decay != 0.0, a.has_momentum);
}

template <class F> void dispatch_rule(const RmspropArgs& a, F&& f) {
  with_flags([&](auto mx, auto wd, auto cen, auto mom) {
    f(RuleTag<RmspropRule<FO_V(mx), FO_V(wd), FO_V(cen), FO_V(mom)>>{});
  }, a.maximize, a.weight_decay != 0.0, a.centered, a.has_momentum);
}

template <class F> void dispatch_rule(const AdamArgs& a, F&& f) {
  with_flags([&](auto mx, auto wd, auto ams) {
    if constexpr (FO_V(wd)) {
      with_flags([&](auto dec) {
        f(RuleTag<AdamRule<FO_V(mx), true, FO_V(dec), FO_V(ams)>>{});
      }, a.decoupled);
    } else {
      f(RuleTag<AdamRule<FO_V(mx), false, false, FO_V(ams)>>{});
    }
  }, a.maximize, a.weight_decay != 0.0, a.amsgrad);
}

template <class F> void dispatch_rule(const AdagradArgs& a, F&& f) {
  with_flags([&](auto mx, auto wd) {
    f(RuleTag<AdagradRule<FO_V(mx), FO_V(wd)>>{});
  }, a.maximize, a.weight_decay != 0.0);
}

template <class F> void dispatch_rule(const AdadeltaArgs& a, F&& f) {
  with_flags([&](auto mx, auto wd) {
    f(RuleTag<AdadeltaRule<FO_V(mx), FO_V(wd)>>{});
  }, a.maximize, a.weight_decay != 0.0);
}

template <class F> void dispatch_rule(const EmaArgs&, F&& f) { f(RuleTag<EmaRule>{}); }

// The in-place bandwidth ceiling (bindings.cpp accepts only these (reads, writes) pairs).
template <class F> void dispatch_rule(const StreamArgs& a, F&& f) {
  switch (a.reads * 10 + a.writes) {
    case 21: f(RuleTag<StreamRule<2, 1>>{}); break;
    case 32: f(RuleTag<StreamRule<3, 2>>{}); break;
    case 43: f(RuleTag<StreamRule<4, 3>>{}); break;
    case 54: f(RuleTag<StreamRule<5, 4>>{}); break;
    default: break;
  }
}
#undef FO_V

}  // namespace cuda
}  // namespace fastoptim
