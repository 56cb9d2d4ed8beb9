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
// The runtime options -> rule instantiation of a call is rule_api.h's dispatch_mask, the one
// the CPU kernels use too.
#pragma once

#include <cstdint>

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

}  // namespace cuda
}  // namespace fastoptim
