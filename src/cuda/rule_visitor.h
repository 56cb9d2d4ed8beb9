// rule_visitor.h: what one CUDA thread does with the elements the launch plan gives it,
// written once for the GPU and for its emulation on the CPU.
//
// plan::span_body (src/cpp/launch_plan.h) hands a visitor single elements (scalar) and groups
// of Visitor::kVec elements (vector: 4 floats or 2 doubles, read as one 16-byte piece per slot;
// MixedVisitor: 8 elements, a 16-bit stream one 16-byte piece, a float32 one two; every stream
// 16-byte aligned). RuleVisitor loads
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
#include <type_traits>

#include "../cpp/kernel_api.h"
#include "../cpp/launch_plan.h"
#include "cuda_api.h"

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

// The visitor of plan::span_body for float32 and float64 throughout: load, Rule::apply,
// store. Grads are multiplied by grad_scale_inv as they are loaded, as on the CPU (kernels.h,
// load_groups_at), but only when it is not 1 (a branch uniform over the launch): on the CPU
// x * 1 keeps a NaN's bits, where a GPU's arithmetic returns its one canonical NaN, so the
// multiplication by 1 would change a NaN grad that a rule copies into a state (SGD's first
// momentum buffer, Rprop's prev). A NaN that the arithmetic itself produces has the GPU's
// canonical bits (0x7FFFFFFF) where x86 gives 0xFFC00000: results are bitwise the CPU's for
// finite values, and NaN for NaN.
template <class Rule, class T> struct RuleVisitor {
  static constexpr unsigned kReadOnly = Rule::kReads & ~Rule::kWrites;  // grads
  static constexpr int64_t kVec = VecWidth<T>::value;
  using Consts = typename Rule::template Consts<T>;
  const Consts& c;
  T grad_scale_inv;

  FO_HD FO_INLINE int64_t slot_bytes(int) const { return static_cast<int64_t>(sizeof(T)); }
  FO_HD FO_INLINE int64_t copy_bytes() const { return 0; }

  FO_HD FO_INLINE void scalar(const plan::SpanPtrs& sp, int64_t, int64_t i) const {
    T x[kMaxSlots];
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s) {
      const T* p = static_cast<const T*>(sp.p[s]);
      if (kReadOnly & (1u << s)) x[s] = load1<true>(p + i);
      else if (Rule::kReads & (1u << s)) x[s] = load1<false>(p + i);
    }
    if ((Rule::kReads & (1u << kGrad)) && grad_scale_inv != T(1)) x[kGrad] = x[kGrad] * grad_scale_inv;
    Rule::template apply<T>(x, c);
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s)
      if (Rule::kWrites & (1u << s)) store1(static_cast<T*>(sp.p[s]) + i, x[s]);
  }

  FO_HD FO_INLINE void vector(const plan::SpanPtrs& sp, int64_t, int64_t i) const {
    constexpr int kW = VecWidth<T>::value;
    T lanes[kMaxSlots][kW];
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s) {
      const T* p = static_cast<const T*>(sp.p[s]);
      if (kReadOnly & (1u << s)) load16<true>(p + i, lanes[s]);
      else if (Rule::kReads & (1u << s)) load16<false>(p + i, lanes[s]);
    }
FO_UNROLL
    for (int l = 0; l < kW; ++l) {
      T x[kMaxSlots];
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kReads & (1u << s)) x[s] = lanes[s][l];
      if ((Rule::kReads & (1u << kGrad)) && grad_scale_inv != T(1)) x[kGrad] = x[kGrad] * grad_scale_inv;
      Rule::template apply<T>(x, c);
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kWrites & (1u << s)) lanes[s][l] = x[s];
    }
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s)
      if (Rule::kWrites & (1u << s)) store16(static_cast<T*>(sp.p[s]) + i, lanes[s]);
  }
};

// Note [16-bit formats on the device]
// The formats with a bfloat16 or float16 stream (kernel_api.h, Note [storage formats]: every
// format but float32, float64 and the quantized states) run in ONE kernel per rule variant,
// MixedVisitor, whose streams' element types are values of the launch (StreamTypes), not
// template parameters: each format a template of its own would multiply the CUDA
// instantiations (and nvcc's time) by ten, and a branch on a launch constant is uniform
// across a warp and costs a few instructions beside a memory-bound update. The arithmetic is
// the CPU's, so the bits are the same for every non-NaN value (the tests compare every element
// with the CPU kernels; NaN bits: RuleVisitor's note): loads widen (bf16: bits << 16; f16:
// vec.h's emulation of vcvtph2ps), grads are multiplied by grad_scale_inv (when not 1), a
// Kahan param is p + compensation; the rule runs in fp32; stores round to nearest even
// (vec.h's integer code), bfloat16 params stochastically
// where the call asks (sr_hash of the element's index in the call: sr_index0 + the tensor's
// offset, MetaView's bases, + i), the Kahan compensation is bf16(x - bf16(x)), and a copy
// format writes bf16/f16(x) of the new param to the copies stream. A vector visit is 8
// elements: one 16-byte access of a 16-bit stream, two of a float32 one.
enum StreamCode : uint8_t { kCodeF32 = 0, kCodeBF16 = 1, kCodeF16 = 2, kCodeNone = 255 };

// What a 16-bit format's launch needs besides its rule's constants.
struct MixedIo {
  uint8_t code[kMaxSlots];  // element type of each slot (the states share one)
  uint8_t copy;             // the copies stream's type, kCodeNone without one
  bool kahan;               // the copies stream is the params' compensation (read and written)
  bool sr;                  // bfloat16 params rounded stochastically
  uint32_t sr_key;
  uint64_t sr_index0;
  float grad_scale_inv;
};

// A call's grad unscaling factor in compute type T, as the CPU's run_range takes it (host).
template <class T> inline T grad_scale_inv_of(const Batch& b) {
  if constexpr (std::is_same_v<T, double>) return b.grad_scale_inv_d;
  else return b.grad_scale_inv_f;
}

// The MixedIo of a call (host).
inline MixedIo mixed_io(const StreamTypes& t, const Batch& b) {
  MixedIo io;
  io.code[kParam] = t.param;
  io.code[kGrad] = t.grad;
  for (int s = kState0; s < kMaxSlots; ++s) io.code[s] = t.state;
  io.copy = t.copy;
  io.kahan = t.kahan;
  io.sr = b.sr;
  io.sr_key = b.sr_key;
  io.sr_index0 = b.sr_index0;
  io.grad_scale_inv = grad_scale_inv_of<float>(b);
  return io;
}

FO_HD FO_INLINE float widen16(uint16_t h, uint8_t code) {
  return code == kCodeBF16 ? f32_from_bits(static_cast<uint32_t>(h) << 16) : f32_from_bits(f32_bits_from_f16(h));
}
FO_HD FO_INLINE uint16_t narrow16(float x, uint8_t code) {
  const uint32_t u = f32_to_bits(x);
  return code == kCodeBF16 ? bf16_bits_from_f32(u) : f16_bits_from_f32(u);
}

// n (1 or MixedVisitor::kVec) elements of a stream of type `code` from p + i into x.
template <bool kReadOnly, int kN>
FO_HD FO_INLINE void load_mixed(const void* p, uint8_t code, int64_t i, float* x) {
  if (code == kCodeF32) {
    const float* q = static_cast<const float*>(p) + i;
    if constexpr (kN == 1) {
      x[0] = load1<kReadOnly>(q);
    } else {
FO_UNROLL
      for (int k = 0; k < kN; k += 4) load16<kReadOnly>(q + k, x + k);
    }
    return;
  }
  const uint16_t* q = static_cast<const uint16_t*>(p) + i;
  uint16_t h[kN];
  if constexpr (kN == 1) {
    h[0] = load1<kReadOnly>(q);
  } else {
    static_assert(kN == 8, "a 16-bit stream's vector visit is one 16-byte access");
#if defined(__CUDA_ARCH__)
    const uint4* w = reinterpret_cast<const uint4*>(q);
    const uint4 v = kReadOnly ? __ldg(w) : __ldcg(w);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
FO_UNROLL
    for (int k = 0; k < 4; ++k) {
      h[2 * k] = static_cast<uint16_t>(words[k] & 0xFFFFu);
      h[2 * k + 1] = static_cast<uint16_t>(words[k] >> 16);
    }
#else
    for (int k = 0; k < kN; ++k) h[k] = q[k];
#endif
  }
FO_UNROLL
  for (int k = 0; k < kN; ++k) x[k] = widen16(h[k], code);
}

// n 16-bit values h to p + i (a stream of 16-bit elements).
template <int kN> FO_HD FO_INLINE void store_bits(void* p, int64_t i, const uint16_t* h) {
  uint16_t* q = static_cast<uint16_t*>(p) + i;
  if constexpr (kN == 1) {
    store1(q, h[0]);
  } else {
#if defined(__CUDA_ARCH__)
    const uint4 v = make_uint4(h[0] | (static_cast<uint32_t>(h[1]) << 16), h[2] | (static_cast<uint32_t>(h[3]) << 16),
                               h[4] | (static_cast<uint32_t>(h[5]) << 16), h[6] | (static_cast<uint32_t>(h[7]) << 16));
    __stcg(reinterpret_cast<uint4*>(q), v);
#else
    for (int k = 0; k < kN; ++k) q[k] = h[k];
#endif
  }
}

// n elements x to p + i, rounded to nearest even to the stream's type.
template <int kN> FO_HD FO_INLINE void store_mixed(void* p, uint8_t code, int64_t i, const float* x) {
  if (code == kCodeF32) {
    float* q = static_cast<float*>(p) + i;
    if constexpr (kN == 1) {
      store1(q, x[0]);
    } else {
FO_UNROLL
      for (int k = 0; k < kN; k += 4) store16(q + k, x + k);
    }
    return;
  }
  uint16_t h[kN];
FO_UNROLL
  for (int k = 0; k < kN; ++k) h[k] = narrow16(x[k], code);
  store_bits<kN>(p, i, h);
}

template <class Rule> struct MixedVisitor {
  static constexpr unsigned kReadOnly = Rule::kReads & ~Rule::kWrites;  // grads
  static constexpr int64_t kVec = 8;
  using Consts = typename Rule::template Consts<float>;
  const Consts& c;
  const MixedIo& io;

  FO_HD FO_INLINE int64_t slot_bytes(int s) const { return io.code[s] == kCodeF32 ? 4 : 2; }
  FO_HD FO_INLINE int64_t copy_bytes() const { return io.copy == kCodeNone ? 0 : 2; }

  template <int kN> FO_HD FO_INLINE void visit(const plan::SpanPtrs& sp, int64_t i) const {
    float x[kMaxSlots][kN];
FO_UNROLL
    for (int s = 0; s < kMaxSlots; ++s) {
      if (kReadOnly & (1u << s)) load_mixed<true, kN>(sp.p[s], io.code[s], i, x[s]);
      else if (Rule::kReads & (1u << s)) load_mixed<false, kN>(sp.p[s], io.code[s], i, x[s]);
    }
    if ((Rule::kReads & (1u << kGrad)) && io.grad_scale_inv != 1.0f) {  // (as RuleVisitor)
FO_UNROLL
      for (int k = 0; k < kN; ++k) x[kGrad][k] = x[kGrad][k] * io.grad_scale_inv;
    }
    constexpr bool kParamRead = (Rule::kReads & (1u << kParam)) != 0;
    constexpr bool kParamWritten = (Rule::kWrites & (1u << kParam)) != 0;
    if (kParamRead && io.kahan) {  // the rule sees p + compensation
      float comp[kN];
      load_mixed<false, kN>(sp.copy, kCodeBF16, i, comp);
FO_UNROLL
      for (int k = 0; k < kN; ++k) x[kParam][k] = x[kParam][k] + comp[k];
    }
FO_UNROLL
    for (int k = 0; k < kN; ++k) {
      float y[kMaxSlots];
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kReads & (1u << s)) y[s] = x[s][k];
      Rule::template apply<float>(y, c);
FO_UNROLL
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kWrites & (1u << s)) x[s][k] = y[s];
    }
    // the params: Kahan (p' = bf16(x), compensation' = bf16(x - p')), stochastic rounding, or
    // to nearest even; then the other written slots, then a copy format's copy
    if (!kParamWritten) {
      // (every rule writes its params; a rule that did not would write no copy either)
    } else if (io.kahan) {
      uint16_t h[kN], r[kN];
FO_UNROLL
      for (int k = 0; k < kN; ++k) {
        h[k] = bf16_bits_from_f32(f32_to_bits(x[kParam][k]));
        r[k] = bf16_bits_from_f32(f32_to_bits(x[kParam][k] - f32_from_bits(static_cast<uint32_t>(h[k]) << 16)));
      }
      store_bits<kN>(sp.p[kParam], i, h);
      store_bits<kN>(sp.copy, i, r);
    } else if (io.sr && io.code[kParam] == kCodeBF16) {
      uint16_t h[kN];
      const uint64_t at = io.sr_index0 + static_cast<uint64_t>(sp.base) + static_cast<uint64_t>(i);
FO_UNROLL
      for (int k = 0; k < kN; ++k)
        h[k] = bf16_bits_sr(f32_to_bits(x[kParam][k]), sr_hash(io.sr_key, at + static_cast<uint64_t>(k)));
      store_bits<kN>(sp.p[kParam], i, h);
    } else {
      store_mixed<kN>(sp.p[kParam], io.code[kParam], i, x[kParam]);
    }
FO_UNROLL
    for (int s = 1; s < kMaxSlots; ++s)
      if (Rule::kWrites & (1u << s)) store_mixed<kN>(sp.p[s], io.code[s], i, x[s]);
    if (kParamWritten && io.copy != kCodeNone && !io.kahan) store_mixed<kN>(sp.copy, io.copy, i, x[kParam]);
  }

  FO_HD FO_INLINE void scalar(const plan::SpanPtrs& sp, int64_t, int64_t i) const { visit<1>(sp, i); }
  FO_HD FO_INLINE void vector(const plan::SpanPtrs& sp, int64_t, int64_t i) const { visit<kVec>(sp, i); }
};

}  // namespace cuda
}  // namespace fastoptim
