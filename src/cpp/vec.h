// vec.h: the small vector vocabulary that every update rule in rules.h is written in.
//
// A rule is a template over a "vector" type V. V is one of
//   float, double                     scalar C++ and CUDA (one lane)
//   F32x8, F64x4                      AVX2 + FMA (compiled only where __AVX2__ is defined)
//   F32x16, F64x8                     AVX-512F   (compiled only where __AVX512F__ is defined)
// and supports: + - * / and unary -, vfma(a, b, c) = a*b + c rounded once, vsqrt, vmax (NaN
// propagating, like torch.maximum), splat<V>(scalar), vload<V>(ptr), vstore(ptr, v).
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
template <> struct VecTraits<float> { using Scalar = float; static constexpr int kWidth = 1; };
template <> struct VecTraits<double> { using Scalar = double; static constexpr int kWidth = 1; };

template <class V> FO_HD FO_INLINE V splat(typename VecTraits<V>::Scalar x);
template <> FO_HD FO_INLINE float splat<float>(float x) { return x; }
template <> FO_HD FO_INLINE double splat<double>(double x) { return x; }

template <class V> FO_HD FO_INLINE V vload(const typename VecTraits<V>::Scalar* p);
template <> FO_HD FO_INLINE float vload<float>(const float* p) { return *p; }
template <> FO_HD FO_INLINE double vload<double>(const double* p) { return *p; }
FO_HD FO_INLINE void vstore(float* p, float v) { *p = v; }
FO_HD FO_INLINE void vstore(double* p, double v) { *p = v; }

#if defined(__CUDACC__)
FO_HD FO_INLINE float vfma(float a, float b, float c) { return fmaf(a, b, c); }
FO_HD FO_INLINE double vfma(double a, double b, double c) { return fma(a, b, c); }
FO_HD FO_INLINE float vsqrt(float a) { return sqrtf(a); }
FO_HD FO_INLINE double vsqrt(double a) { return sqrt(a); }
#else
// Builtins rather than std::fma/std::sqrt: no shared out-of-line copy (kernels.h).
FO_INLINE float vfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
FO_INLINE double vfma(double a, double b, double c) { return __builtin_fma(a, b, c); }
FO_INLINE float vsqrt(float a) { return __builtin_sqrtf(a); }
FO_INLINE double vsqrt(double a) { return __builtin_sqrt(a); }
#endif
// NaN-propagating maximum (torch.maximum): a NaN in a wins, then a NaN in b.
template <class T> FO_HD FO_INLINE T scalar_max(T a, T b) {
  return (a != a) ? a : (b != b) ? b : (a > b ? a : b);
}
FO_HD FO_INLINE float vmax(float a, float b) { return scalar_max(a, b); }
FO_HD FO_INLINE double vmax(double a, double b) { return scalar_max(a, b); }

// ---- AVX2 + FMA ---------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
struct F32x8 { __m256 v; };
struct F64x4 { __m256d v; };
template <> struct VecTraits<F32x8> { using Scalar = float; static constexpr int kWidth = 8; };
template <> struct VecTraits<F64x4> { using Scalar = double; static constexpr int kWidth = 4; };

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
#endif

// ---- AVX-512F -----------------------------------------------------------------------------
#if defined(__AVX512F__)
struct F32x16 { __m512 v; };
struct F64x8 { __m512d v; };
template <> struct VecTraits<F32x16> { using Scalar = float; static constexpr int kWidth = 16; };
template <> struct VecTraits<F64x8> { using Scalar = double; static constexpr int kWidth = 8; };

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
#endif

}  // namespace fastoptim
