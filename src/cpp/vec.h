// vec.h: the small vector vocabulary that every update rule in rules.h is written in.
//
// A rule is a template over a "vector" type V. V is one of
//   float, double                     scalar C++ and CUDA (one lane)
//   F32x8, F64x4                      AVX2 + FMA (compiled only where __AVX2__ is defined)
//   F32x16, F64x8                     AVX-512F   (compiled only where __AVX512F__ is defined)
// and supports: + - * / and unary -, vfma(a, b, c) = a*b + c rounded once, vsqrt, vabs, vmax and
// vmin (NaN propagating, like torch.maximum/minimum), splat<V>(scalar), vload<V>(ptr),
// vstore(ptr, v), and the comparisons vgt/vlt/veq, which give a MaskOf<V> that
// vselect(mask, a, b) (= mask ? a : b, lane by lane) consumes.
//
// Note [bitwise identical paths]
// Every operation here is correctly rounded IEEE arithmetic (add, sub, mul, div, sqrt, fma),
// and the project compiles with -ffp-contract=off, so the compiler never fuses a*b+c on its
// own. Hence a rule gives bitwise the same result per element whatever V is: scalar tails,
// AVX2 bodies, AVX-512 bodies and CUDA threads agree to the last bit, and the tests assert
// it. Precision conversion (fp16/bf16) would belong in vload/vstore, never in a rule.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FO_HD __host__ __device__
#define FO_INLINE __forceinline__
#else
#define FO_HD
#define FO_INLINE inline __attribute__((always_inline))
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastoptim {

// ---- scalar lanes (host and device) -------------------------------------------------------
template <class V> struct VecTraits;
template <> struct VecTraits<float> { using Scalar = float; using Mask = bool; static constexpr int kWidth = 1; };
template <> struct VecTraits<double> { using Scalar = double; using Mask = bool; static constexpr int kWidth = 1; };
template <class V> using MaskOf = typename VecTraits<V>::Mask;

template <class V> FO_HD FO_INLINE V splat(typename VecTraits<V>::Scalar x);
template <> FO_HD FO_INLINE float splat<float>(float x) { return x; }
template <> FO_HD FO_INLINE double splat<double>(double x) { return x; }

template <class V> FO_HD FO_INLINE V vload(const typename VecTraits<V>::Scalar* p);
#if defined(__CUDACC__)
template <> FO_HD FO_INLINE float vload<float>(const float* p) { return *p; }
template <> FO_HD FO_INLINE double vload<double>(const double* p) { return *p; }
FO_HD FO_INLINE void vstore(float* p, float v) { *p = v; }
FO_HD FO_INLINE void vstore(double* p, double v) { *p = v; }
#else
// Note [unaligned elements]: NumPy arrays need not be aligned to their itemsize (aligned=False,
// np.frombuffer at an odd offset). A memcpy load/store is defined for any address and compiles
// to one plain mov on x86 (the vector loads below are the unaligned forms already); the CUDA
// path refuses such arrays (bindings.cpp).
template <> FO_INLINE float vload<float>(const float* p) { float v; __builtin_memcpy(&v, p, sizeof v); return v; }
template <> FO_INLINE double vload<double>(const double* p) { double v; __builtin_memcpy(&v, p, sizeof v); return v; }
FO_INLINE void vstore(float* p, float v) { __builtin_memcpy(p, &v, sizeof v); }
FO_INLINE void vstore(double* p, double v) { __builtin_memcpy(p, &v, sizeof v); }
#endif

#if defined(__CUDACC__)
FO_HD FO_INLINE float vfma(float a, float b, float c) { return fmaf(a, b, c); }
FO_HD FO_INLINE double vfma(double a, double b, double c) { return fma(a, b, c); }
FO_HD FO_INLINE float vsqrt(float a) { return sqrtf(a); }
FO_HD FO_INLINE double vsqrt(double a) { return sqrt(a); }
FO_HD FO_INLINE float vabs(float a) { return fabsf(a); }
FO_HD FO_INLINE double vabs(double a) { return fabs(a); }
#else
// Builtins rather than std::fma/std::sqrt: no shared out-of-line copy (kernels.h).
FO_INLINE float vfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
FO_INLINE double vfma(double a, double b, double c) { return __builtin_fma(a, b, c); }
FO_INLINE float vsqrt(float a) { return __builtin_sqrtf(a); }
FO_INLINE double vsqrt(double a) { return __builtin_sqrt(a); }
FO_INLINE float vabs(float a) { return __builtin_fabsf(a); }
FO_INLINE double vabs(double a) { return __builtin_fabs(a); }
#endif
// NaN-propagating maximum (torch.maximum): a NaN in a wins, then a NaN in b.
template <class T> FO_HD FO_INLINE T scalar_max(T a, T b) {
  return (a != a) ? a : (b != b) ? b : (a > b ? a : b);
}
FO_HD FO_INLINE float vmax(float a, float b) { return scalar_max(a, b); }
FO_HD FO_INLINE double vmax(double a, double b) { return scalar_max(a, b); }
// NaN-propagating minimum (torch.minimum), the mirror of scalar_max.
template <class T> FO_HD FO_INLINE T scalar_min(T a, T b) {
  return (a != a) ? a : (b != b) ? b : (a < b ? a : b);
}
FO_HD FO_INLINE float vmin(float a, float b) { return scalar_min(a, b); }
FO_HD FO_INLINE double vmin(double a, double b) { return scalar_min(a, b); }
// Comparisons (false when either side is NaN, as in IEEE) and lane selection.
FO_HD FO_INLINE bool vgt(float a, float b) { return a > b; }
FO_HD FO_INLINE bool vgt(double a, double b) { return a > b; }
FO_HD FO_INLINE bool vlt(float a, float b) { return a < b; }
FO_HD FO_INLINE bool vlt(double a, double b) { return a < b; }
FO_HD FO_INLINE bool veq(float a, float b) { return a == b; }
FO_HD FO_INLINE bool veq(double a, double b) { return a == b; }
FO_HD FO_INLINE float vselect(bool m, float a, float b) { return m ? a : b; }
FO_HD FO_INLINE double vselect(bool m, double a, double b) { return m ? a : b; }

// ---- AVX2 + FMA ---------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
struct F32x8 { __m256 v; };
struct F64x4 { __m256d v; };
struct M32x8 { __m256 v; };   // all-ones / all-zeros lanes
struct M64x4 { __m256d v; };
template <> struct VecTraits<F32x8> { using Scalar = float; using Mask = M32x8; static constexpr int kWidth = 8; };
template <> struct VecTraits<F64x4> { using Scalar = double; using Mask = M64x4; static constexpr int kWidth = 4; };

template <> FO_INLINE F32x8 splat<F32x8>(float x) { return {_mm256_set1_ps(x)}; }
template <> FO_INLINE F64x4 splat<F64x4>(double x) { return {_mm256_set1_pd(x)}; }
template <> FO_INLINE F32x8 vload<F32x8>(const float* p) { return {_mm256_loadu_ps(p)}; }
template <> FO_INLINE F64x4 vload<F64x4>(const double* p) { return {_mm256_loadu_pd(p)}; }
FO_INLINE void vstore(float* p, F32x8 a) { _mm256_storeu_ps(p, a.v); }
FO_INLINE void vstore(double* p, F64x4 a) { _mm256_storeu_pd(p, a.v); }

FO_INLINE F32x8 operator+(F32x8 a, F32x8 b) { return {_mm256_add_ps(a.v, b.v)}; }
FO_INLINE F32x8 operator-(F32x8 a, F32x8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
FO_INLINE F32x8 operator*(F32x8 a, F32x8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
FO_INLINE F32x8 operator/(F32x8 a, F32x8 b) { return {_mm256_div_ps(a.v, b.v)}; }
FO_INLINE F32x8 operator-(F32x8 a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
FO_INLINE F32x8 vfma(F32x8 a, F32x8 b, F32x8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
FO_INLINE F32x8 vsqrt(F32x8 a) { return {_mm256_sqrt_ps(a.v)}; }
FO_INLINE F32x8 vmax(F32x8 a, F32x8 b) {
  __m256 m = _mm256_max_ps(a.v, b.v);
  m = _mm256_blendv_ps(m, b.v, _mm256_cmp_ps(b.v, b.v, _CMP_UNORD_Q));
  return {_mm256_blendv_ps(m, a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}

FO_INLINE F32x8 vmin(F32x8 a, F32x8 b) {
  __m256 m = _mm256_min_ps(a.v, b.v);
  m = _mm256_blendv_ps(m, b.v, _mm256_cmp_ps(b.v, b.v, _CMP_UNORD_Q));
  return {_mm256_blendv_ps(m, a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
FO_INLINE F32x8 vabs(F32x8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
FO_INLINE M32x8 vgt(F32x8 a, F32x8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
FO_INLINE M32x8 vlt(F32x8 a, F32x8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
FO_INLINE M32x8 veq(F32x8 a, F32x8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
FO_INLINE F32x8 vselect(M32x8 m, F32x8 a, F32x8 b) { return {_mm256_blendv_ps(b.v, a.v, m.v)}; }

FO_INLINE F64x4 operator+(F64x4 a, F64x4 b) { return {_mm256_add_pd(a.v, b.v)}; }
FO_INLINE F64x4 operator-(F64x4 a, F64x4 b) { return {_mm256_sub_pd(a.v, b.v)}; }
FO_INLINE F64x4 operator*(F64x4 a, F64x4 b) { return {_mm256_mul_pd(a.v, b.v)}; }
FO_INLINE F64x4 operator/(F64x4 a, F64x4 b) { return {_mm256_div_pd(a.v, b.v)}; }
FO_INLINE F64x4 operator-(F64x4 a) { return {_mm256_xor_pd(a.v, _mm256_set1_pd(-0.0))}; }
FO_INLINE F64x4 vfma(F64x4 a, F64x4 b, F64x4 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
FO_INLINE F64x4 vsqrt(F64x4 a) { return {_mm256_sqrt_pd(a.v)}; }
FO_INLINE F64x4 vmax(F64x4 a, F64x4 b) {
  __m256d m = _mm256_max_pd(a.v, b.v);
  m = _mm256_blendv_pd(m, b.v, _mm256_cmp_pd(b.v, b.v, _CMP_UNORD_Q));
  return {_mm256_blendv_pd(m, a.v, _mm256_cmp_pd(a.v, a.v, _CMP_UNORD_Q))};
}
FO_INLINE F64x4 vmin(F64x4 a, F64x4 b) {
  __m256d m = _mm256_min_pd(a.v, b.v);
  m = _mm256_blendv_pd(m, b.v, _mm256_cmp_pd(b.v, b.v, _CMP_UNORD_Q));
  return {_mm256_blendv_pd(m, a.v, _mm256_cmp_pd(a.v, a.v, _CMP_UNORD_Q))};
}
FO_INLINE F64x4 vabs(F64x4 a) { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), a.v)}; }
FO_INLINE M64x4 vgt(F64x4 a, F64x4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_GT_OQ)}; }
FO_INLINE M64x4 vlt(F64x4 a, F64x4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ)}; }
FO_INLINE M64x4 veq(F64x4 a, F64x4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_EQ_OQ)}; }
FO_INLINE F64x4 vselect(M64x4 m, F64x4 a, F64x4 b) { return {_mm256_blendv_pd(b.v, a.v, m.v)}; }
#endif

// ---- AVX-512F -----------------------------------------------------------------------------
#if defined(__AVX512F__)
struct F32x16 { __m512 v; };
struct F64x8 { __m512d v; };
struct M16 { __mmask16 k; };
struct M8 { __mmask8 k; };
template <> struct VecTraits<F32x16> { using Scalar = float; using Mask = M16; static constexpr int kWidth = 16; };
template <> struct VecTraits<F64x8> { using Scalar = double; using Mask = M8; static constexpr int kWidth = 8; };

template <> FO_INLINE F32x16 splat<F32x16>(float x) { return {_mm512_set1_ps(x)}; }
template <> FO_INLINE F64x8 splat<F64x8>(double x) { return {_mm512_set1_pd(x)}; }
template <> FO_INLINE F32x16 vload<F32x16>(const float* p) { return {_mm512_loadu_ps(p)}; }
template <> FO_INLINE F64x8 vload<F64x8>(const double* p) { return {_mm512_loadu_pd(p)}; }
FO_INLINE void vstore(float* p, F32x16 a) { _mm512_storeu_ps(p, a.v); }
FO_INLINE void vstore(double* p, F64x8 a) { _mm512_storeu_pd(p, a.v); }

FO_INLINE F32x16 operator+(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
FO_INLINE F32x16 operator-(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
FO_INLINE F32x16 operator*(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
FO_INLINE F32x16 operator/(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
FO_INLINE F32x16 operator-(F32x16 a) {  // flip the sign bit, as scalar negation does (-0.0 too)
  return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))};
}
FO_INLINE F32x16 vfma(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
FO_INLINE F32x16 vsqrt(F32x16 a) { return {_mm512_sqrt_ps(a.v)}; }
FO_INLINE F32x16 vmax(F32x16 a, F32x16 b) {
  __m512 m = _mm512_max_ps(a.v, b.v);
  m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(b.v, b.v, _CMP_UNORD_Q), b.v);
  return {_mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}

FO_INLINE F32x16 vmin(F32x16 a, F32x16 b) {
  __m512 m = _mm512_min_ps(a.v, b.v);
  m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(b.v, b.v, _CMP_UNORD_Q), b.v);
  return {_mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}
FO_INLINE F32x16 vabs(F32x16 a) {  // clear the sign bit (AVX-512F has no vandps)
  return {_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MAX)))};
}
FO_INLINE M16 vgt(F32x16 a, F32x16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
FO_INLINE M16 vlt(F32x16 a, F32x16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
FO_INLINE M16 veq(F32x16 a, F32x16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
FO_INLINE F32x16 vselect(M16 m, F32x16 a, F32x16 b) { return {_mm512_mask_blend_ps(m.k, b.v, a.v)}; }

FO_INLINE F64x8 operator+(F64x8 a, F64x8 b) { return {_mm512_add_pd(a.v, b.v)}; }
FO_INLINE F64x8 operator-(F64x8 a, F64x8 b) { return {_mm512_sub_pd(a.v, b.v)}; }
FO_INLINE F64x8 operator*(F64x8 a, F64x8 b) { return {_mm512_mul_pd(a.v, b.v)}; }
FO_INLINE F64x8 operator/(F64x8 a, F64x8 b) { return {_mm512_div_pd(a.v, b.v)}; }
FO_INLINE F64x8 operator-(F64x8 a) {
  return {_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)))};
}
FO_INLINE F64x8 vfma(F64x8 a, F64x8 b, F64x8 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
FO_INLINE F64x8 vsqrt(F64x8 a) { return {_mm512_sqrt_pd(a.v)}; }
FO_INLINE F64x8 vmax(F64x8 a, F64x8 b) {
  __m512d m = _mm512_max_pd(a.v, b.v);
  m = _mm512_mask_mov_pd(m, _mm512_cmp_pd_mask(b.v, b.v, _CMP_UNORD_Q), b.v);
  return {_mm512_mask_mov_pd(m, _mm512_cmp_pd_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}
FO_INLINE F64x8 vmin(F64x8 a, F64x8 b) {
  __m512d m = _mm512_min_pd(a.v, b.v);
  m = _mm512_mask_mov_pd(m, _mm512_cmp_pd_mask(b.v, b.v, _CMP_UNORD_Q), b.v);
  return {_mm512_mask_mov_pd(m, _mm512_cmp_pd_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}
FO_INLINE F64x8 vabs(F64x8 a) {
  return {_mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MAX)))};
}
FO_INLINE M8 vgt(F64x8 a, F64x8 b) { return {_mm512_cmp_pd_mask(a.v, b.v, _CMP_GT_OQ)}; }
FO_INLINE M8 vlt(F64x8 a, F64x8 b) { return {_mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ)}; }
FO_INLINE M8 veq(F64x8 a, F64x8 b) { return {_mm512_cmp_pd_mask(a.v, b.v, _CMP_EQ_OQ)}; }
FO_INLINE F64x8 vselect(M8 m, F64x8 a, F64x8 b) { return {_mm512_mask_blend_pd(m.k, b.v, a.v)}; }
#endif


// ---- storage formats (TEMPORARY generic stand-in; replaced by the per-ISA conversions) ----
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };
FO_INLINE float widen_scalar(bf16 h) { const uint32_t u = uint32_t(h.bits) << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
FO_INLINE bf16 narrow_bf16(float f) {
  uint32_t u; __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x0040u) };
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
FO_INLINE float widen_scalar(f16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) { u = sign; } else { float f = static_cast<float>(m) * 5.9604644775390625e-08f; __builtin_memcpy(&u, &f, 4); u |= sign; }
  } else if (e == 31) { u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u); }
  else { u = sign | ((e + 112u) << 23) | (m << 13); }
  float f; __builtin_memcpy(&f, &u, 4); return f;
}
FO_INLINE f16 narrow_f16(float f) {
  uint32_t u; __builtin_memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // subnormal or zero in f16: round a * 2^24 to an integer, RNE
    float af; __builtin_memcpy(&af, &a, 4);
    const float scaled = af * 16777216.0f;  // exact
    const float r = __builtin_nearbyintf(scaled);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}
template <class E> FO_INLINE E narrow_scalar(float f);
template <> FO_INLINE bf16 narrow_scalar<bf16>(float f) { return narrow_bf16(f); }
template <> FO_INLINE f16 narrow_scalar<f16>(float f) { return narrow_f16(f); }
template <class V, class E> FO_INLINE V vload_from(const E* p) {
  if constexpr (sizeof(E) == sizeof(typename VecTraits<V>::Scalar)) {
    return vload<V>(reinterpret_cast<const typename VecTraits<V>::Scalar*>(p));
  } else {
    alignas(64) float tmp[VecTraits<V>::kWidth];
    for (int l = 0; l < VecTraits<V>::kWidth; ++l) tmp[l] = widen_scalar(p[l]);
    return vload<V>(tmp);
  }
}
template <class E, class V> FO_INLINE void vstore_to(E* p, V v) {
  if constexpr (sizeof(E) == sizeof(typename VecTraits<V>::Scalar)) {
    vstore(reinterpret_cast<typename VecTraits<V>::Scalar*>(p), v);
  } else {
    alignas(64) float tmp[VecTraits<V>::kWidth];
    vstore(tmp, v);
    for (int l = 0; l < VecTraits<V>::kWidth; ++l) p[l] = narrow_scalar<E>(tmp[l]);
  }
}

}  // namespace fastoptim
