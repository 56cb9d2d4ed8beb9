// vec.h: the small vector vocabulary that every update rule in rules.h is written in.
//
// A rule is a template over a "vector" type V. V is one of
//   float, double                     scalar C++ and CUDA (one lane)
//   F32x8, F64x4                      AVX2 + FMA (compiled only where __AVX2__ is defined)
//   F32x16, F64x8                     AVX-512F   (compiled only where __AVX512F__ is defined)
// and supports: + - * / and unary -, vfma(a, b, c) = a*b + c rounded once, vsqrt, vabs, vmax and
// vmin (NaN propagating, like torch.maximum/minimum), splat<V>(scalar), vload<V>(ptr),
// vstore(ptr, v), and the comparisons vgt/vlt/veq, which give a MaskOf<V> that
// vselect(mask, a, b) (= mask ? a : b, lane by lane) consumes. Storage formats (bf16, f16)
// enter and leave through vload_from<V>(ptr) and vstore_to(ptr, v) (Note [storage formats]).
//
// Note [bitwise identical paths]
// Every operation here is correctly rounded IEEE arithmetic (add, sub, mul, div, sqrt, fma),
// and the project compiles with -ffp-contract=off, so the compiler never fuses a*b+c on its
// own. Hence a rule gives bitwise the same result per element whatever V is: scalar tails,
// AVX2 bodies, AVX-512 bodies and CUDA threads agree to the last bit, and the tests assert
// it. Precision conversion (fp16/bf16) belongs to load/store, never to a rule: the end of
// this file.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// ---- storage formats: bf16 and f16 in memory, fp32 in registers --------------------------
// Note [storage formats]
// A rule never sees a storage format. vload_from<V>(const E* p) loads kWidth elements of E and
// widens them to the fp32 (or fp64) lanes of V; vstore_to(E* p, V v) narrows them back. E is
// the vector's own scalar (float, double: plain vload/vstore), bf16 or f16 (fp32 vectors
// only). Every (V, E) pair gives bitwise the same elements on every ISA, NaN payloads
// included (tests/test_formats_convert.py checks all 2^32 fp32 and all 2^16 16-bit inputs):
//   bf16 widen:  bits << 16, exact (a signalling NaN stays signalling).
//   bf16 narrow: round to nearest even, as ml_dtypes and torch's c10::BFloat16
//                round_to_nearest_even: (x + 0x7FFF + lsb) >> 16 on the bits, so fp32
//                subnormals round to bf16 subnormals (never flushed) and values from
//                0x1.FFp127 up round to inf. A NaN becomes sign | 0x7FC0, the canonical
//                quiet NaN of ml_dtypes (torch's scalar path drops the sign, its vector path
//                writes 0xFFFF; neither is a payload anyone relies on).
//                Integer emulation on EVERY ISA: AVX512_BF16's vcvtneps2bf16 flushes
//                subnormal inputs to zero, which ml_dtypes and torch do not.
//   f16 widen:   exact (subnormals normalised); a NaN is quieted, payload kept:
//                sign | 0x7FC00000 | mantissa << 13 (what vcvtph2ps does).
//   f16 narrow:  round to nearest even, overflow to inf from 65520 up, fp32 values below
//                2^-25 to a signed zero; a NaN is quieted and keeps the top of its payload:
//                sign | 0x7E00 | mantissa >> 13 (what vcvtps2ph does; NumPy's own cast keeps
//                a signalling NaN signalling and so differs on NaN bits only).
// AVX2 and AVX-512 convert f16 with F16C (vcvtph2ps / vcvtps2ph with an explicit
// round-to-nearest immediate); the scalar lane emulates those two instructions bit for bit in
// plain integer code, usable on a CUDA device as well. The scalar lane is also the head and
// tail of the vector paths, so the emulation runs in every translation unit. No path does
// floating-point arithmetic, so FTZ/DAZ (torch.set_flush_denormal) change no result.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2, "storage formats are 2 bytes");

FO_HD FO_INLINE uint32_t f32_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}
FO_HD FO_INLINE float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// fp32 bits -> bf16 bits, round to nearest even; NaN -> sign | 0x7FC0.
FO_HD FO_INLINE uint16_t bf16_bits_from_f32(uint32_t x) {
  if ((x & 0x7FFFFFFFu) > 0x7F800000u)
    return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7FC0u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// fp32 bits -> f16 bits exactly as vcvtps2ph with round to nearest even.
FO_HD FO_INLINE uint16_t f16_bits_from_f32(uint32_t x) {
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (a >= 0x38800000u) {  // >= 2^-14: normal; a carry out of the mantissa bumps the exponent
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
  }
  // Subnormal (or zero): the result counts units of 2^-24, value = m * 2^(e - 150).
  const uint32_t e = a >> 23;
  const uint32_t shift = 126u - e;  // >= 14
  if (shift > 24u) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t up = (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return static_cast<uint16_t>(sign | (q + up));  // q + up == 0x400 is the smallest normal
}

// f16 bits -> fp32 bits exactly as vcvtph2ps (exact; NaN quieted, payload kept).
FO_HD FO_INLINE uint32_t f32_bits_from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1Fu) return sign | (m ? 0x7FC00000u | (m << 13) : 0x7F800000u);
  if (e != 0u) return sign | ((e + 112u) << 23) | (m << 13);
  if (m == 0u) return sign;
  uint32_t e32 = 113u;  // subnormal: normalise (at most 10 shifts)
  while ((m & 0x400u) == 0u) {
    m <<= 1;
    --e32;
  }
  return sign | (e32 << 23) | ((m & 0x3FFu) << 13);
}

// How V is loaded from and stored to E; undefined for a pair that is not supported.
template <class V, class E> struct StorageIO;
template <class V> struct StorageIO<V, typename VecTraits<V>::Scalar> {
  using E = typename VecTraits<V>::Scalar;
  static FO_HD FO_INLINE V load(const E* p) { return vload<V>(p); }
  static FO_HD FO_INLINE void store(E* p, V v) { vstore(p, v); }
};

template <class V, class E> FO_HD FO_INLINE V vload_from(const E* p) {
  return StorageIO<V, E>::load(p);
}
template <class E, class V> FO_HD FO_INLINE void vstore_to(E* p, V v) {
  StorageIO<V, E>::store(p, v);
}

// Scalar lane: 2-byte memcpy, an element need not be aligned (Note [unaligned elements]).
template <> struct StorageIO<float, bf16> {
  static FO_HD FO_INLINE float load(const bf16* p) {
    uint16_t h;
    __builtin_memcpy(&h, p, sizeof h);
    return f32_from_bits(static_cast<uint32_t>(h) << 16);
  }
  static FO_HD FO_INLINE void store(bf16* p, float v) {
    const uint16_t h = bf16_bits_from_f32(f32_to_bits(v));
    __builtin_memcpy(p, &h, sizeof h);
  }
};
template <> struct StorageIO<float, f16> {
  static FO_HD FO_INLINE float load(const f16* p) {
    uint16_t h;
    __builtin_memcpy(&h, p, sizeof h);
    return f32_from_bits(f32_bits_from_f16(h));
  }
  static FO_HD FO_INLINE void store(f16* p, float v) {
    const uint16_t h = f16_bits_from_f32(f32_to_bits(v));
    __builtin_memcpy(p, &h, sizeof h);
  }
};

// Note [stochastic rounding]
// A bfloat16 param store may round stochastically: x rounds up (away from zero) to the next
// bf16 with probability equal to the fraction of the gap that x covers, so the expected stored
// value is x and tiny updates are not lost (Gupta et al. 2015; llm.c uses the same idea). The
// random bits are a pure function of (key, element index): sr_key_of(seed, counter) once per
// call on the host, sr_hash(key, index) per element, with `index` the element's position in
// the call (its tensor's offset in the concatenation plus its index in the tensor). So the
// result does not depend on the ISA, the thread count or the run. sr_hash is the murmur3
// 32-bit finaliser over the two 32-bit halves of the index, each multiplied by an odd
// constant, xor the key. The store adds the hash's low 16 bits to the fp32 bits and truncates;
// infinities and NaN take the round-to-nearest path (an infinity stays infinite, a NaN is
// quieted). A finite value may round up to infinity, with the probability it covers of the
// gap to 2^128. fastoptim.reference writes the same functions in NumPy.
FO_HD FO_INLINE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
FO_HD FO_INLINE uint32_t sr_key_of(uint64_t seed, uint64_t counter) {
  return static_cast<uint32_t>(splitmix64(splitmix64(seed) ^ counter) >> 32);
}
constexpr uint32_t kSrMulLo = 0x9E3779B1u, kSrMulHi = 0x85EBCA77u;
constexpr uint32_t kFmix1 = 0x85EBCA6Bu, kFmix2 = 0xC2B2AE35u;
FO_HD FO_INLINE uint32_t sr_hash(uint32_t key, uint64_t index) {
  uint32_t h = (static_cast<uint32_t>(index) * kSrMulLo) ^
               (static_cast<uint32_t>(index >> 32) * kSrMulHi) ^ key;
  h ^= h >> 16;
  h *= kFmix1;
  h ^= h >> 13;
  h *= kFmix2;
  h ^= h >> 16;
  return h;
}
// fp32 bits -> bf16 bits, rounded stochastically with the random bits r (low 16 used).
FO_HD FO_INLINE uint16_t bf16_bits_sr(uint32_t x, uint32_t r) {
  if ((x & 0x7FFFFFFFu) >= 0x7F800000u) return bf16_bits_from_f32(x);  // inf, NaN
  return static_cast<uint16_t>((x + (r & 0xFFFFu)) >> 16);
}

// How V is stored to bf16 with stochastic rounding; `index` is the first lane's element index.
// The scalar store here; the vector ISAs' (the primary template) at the end of this file.
template <class V> struct SrStore;
template <> struct SrStore<float> {
  static FO_HD FO_INLINE void store(bf16* p, float v, uint32_t key, uint64_t index) {
    const uint16_t h = bf16_bits_sr(f32_to_bits(v), sr_hash(key, index));
    __builtin_memcpy(p, &h, sizeof h);
  }
};
template <class V> FO_HD FO_INLINE void vstore_sr(bf16* p, V v, uint32_t key, uint64_t index) {
  SrStore<V>::store(p, v, key, index);
}

#if defined(__AVX2__) && defined(__FMA__)
#if !defined(__F16C__)
#error "the AVX2 and AVX-512 paths convert f16 with F16C: compile them with -mf16c"
#endif
template <> struct StorageIO<F32x8, bf16> {
  // The 8 bf16 in both 128-bit halves (a broadcast load: no ALU work), then one byte shuffle
  // puts element j into the high half of lane j (elements 0-3 from the low half's copy,
  // 4-7 from the high half's) and zeros the low halves.
  static FO_INLINE F32x8 load(const bf16* p) {
    const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i put = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                         -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
    return {_mm256_castsi256_ps(_mm256_shuffle_epi8(h, put))};
  }
  // Round to nearest even, on the bit patterns x: x + 0x7FFF + (bit 16 of x), whose high half
  // is the bf16, exact for every finite x and infinity (a carry out of the mantissa is the
  // correct rounding up). A NaN would carry too, so a vector with a NaN lane takes the branch
  // that makes those lanes sign | 0x7FC00000 (the canonical quiet NaN). The SR store rounds
  // its inf and NaN lanes with it too.
  static FO_INLINE __m256i round_bits(__m256i x) {
    const __m256i r = round_not_nan(x);
    const __m256i abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F800000));
    if (__builtin_expect(_mm256_testz_si256(nan, nan), 1)) return r;
    const __m256i qnan = _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0x80000000u))),
                                         _mm256_set1_epi32(0x7FC00000));
    return _mm256_blendv_epi8(r, qnan, nan);
  }
  // round_bits without the NaN lanes' fix: the same bits where no lane is a NaN
  static FO_INLINE __m256i round_not_nan(__m256i x) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
  }
  // The high halves are gathered with a byte shuffle and a 64-bit lane permute (two
  // operations where shift, pack and permute took three).
  static FO_INLINE void store(bf16* p, F32x8 v) {
    store_high_halves(p, round_bits(_mm256_castps_si256(v.v)));
  }
  // The high 16 bits of each lane of r, in lane order, to p[0..8).
  static FO_INLINE void store_high_halves(bf16* p, __m256i r) {
    const __m256i pick = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                          2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r, pick), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};
template <> struct StorageIO<F32x8, f16> {
  static FO_INLINE F32x8 load(const f16* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static FO_INLINE void store(f16* p, F32x8 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#endif

#if defined(__AVX512F__)
// Whether any lane of a mask is set, tested in a general register: kmovw and test rather than
// kortestw, which measured slower here (Zen 5) in the bf16 store loops. The empty asm keeps
// GCC from turning the test back into kortestw.
FO_INLINE bool mask_any(__mmask16 m) {
  uint32_t u = _cvtmask16_u32(m);
  __asm__("" : "+r"(u));
  return u != 0;
}
template <> struct StorageIO<F32x16, bf16> {
  static FO_INLINE F32x16 load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  // The AVX2 store's rounding (above), with the NaN lanes behind one branch.
  static FO_INLINE __m512i round_bits(__m512i x) {
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    const __m512i abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F800000));
    if (__builtin_expect(!mask_any(nan), 1)) return r;
    const __m512i qnan = _mm512_or_si512(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0x80000000u))),
                                         _mm512_set1_epi32(0x7FC00000));
    return _mm512_mask_mov_epi32(r, nan, qnan);
  }
  // The high 16 bits of each lane of r to p[0..16) (vpmovdw, AVX-512F, keeps the low 16 bits
  // of each lane of r >> 16).
  static FO_INLINE void store_high_halves(bf16* p, __m512i r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
  static FO_INLINE void store(bf16* p, F32x16 v) { store_high_halves(p, round_bits(_mm512_castps_si512(v.v))); }
};
template <> struct StorageIO<F32x16, f16> {
  static FO_INLINE F32x16 load(const f16* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static FO_INLINE void store(f16* p, F32x16 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#endif

// ---- integer lanes of an fp32 vector, and codes in bytes and nibbles ----------------------
// Note [integer lanes]
// The quantized-state maps (quant.h) work on the bit patterns of fp32 values, so each fp32
// vector type V has a matching vector of 32-bit integer lanes, IntOf<V>: uint32_t for float,
// I32x8 (AVX2) and I32x16 (AVX-512). Their vocabulary, all exact integer operations, hence
// bitwise the same on every ISA: isplat<V>(u), vbits(v) / vfloat<V>(i) (bit casts),
// + - * & | ^ (wrapping, as uint32_t; * keeps the low 32 bits), viota<V>() (lane j holds j),
// vshl<k> / vshr<k> (logical) / vsra<k> (arithmetic) by a constant, vmin_i32 / vmax_i32
// (signed), vmin_u32 / vmax_u32 (unsigned), veq_i32 / vgt_i32 (signed) and vlt_u32 (unsigned),
// giving a MaskOf<V> like the fp32 comparisons; masks combine with &, vany(mask) says whether
// any lane is set; vselect(mask, a, b)
// selects integer lanes too, and vreduce_max_u32 is the unsigned maximum of all lanes.
// vzero_unless(a, b, x) is x in the lanes where a & b has a bit set and +0.0f elsewhere (one
// zero-masked operation on AVX-512, where vselect(veq_i32(a & b, 0), splat<V>(0.0f), x) costs
// an and, a compare and a blend). vpositive_or(a, b, c) (vector lanes only) is a | (b & c) in
// the lanes where int32(a) > 0 and 0 elsewhere (on AVX-512 a compare and one zero-masked
// vpternlogd).
// Codes: vload_u8<V>(p) reads kWidth bytes, one per lane (zero-extended), vload_s8<V>(p) the
// same bytes sign-extended (bit 7 copied to bits 8-31); vstore_u8(p, i)
// writes the low byte of each lane. The 4-bit forms hold two codes per byte, lane 2j in the
// low nibble of byte j and lane 2j+1 in the high nibble: vload_u4<V>(p) reads kWidth / 2
// bytes, vstore_u4(p, i) writes them from lanes that are each below 16 (vector types only:
// one lane is half a byte). Where kLookup16<V> (AVX-512: a 16-entry lookup is one vpermps),
// vlookup16(i, t) is lane (i & 15) of t in each lane, and vload_u4_low<V>(p) reads the same
// nibbles as vload_u4 with lane j's in bits 0-3 and the bits above unspecified (vlookup16
// ignores them); there vload_u4 and vload_u4_top are not defined, since nothing reads nibbles
// otherwise (quant.h, Note [int4 codes by lookup]). Where kLookup8x2<V> (AVX2: a lookup in
// two 8-lane tables is two vpermps and a vblendvps), vlookup8x2(i, top, lo, hi) is lane (i & 7)
// of lo in the lanes where top's bit 31 is clear and of hi where it is set: with i =
// vload_u4_low<V>(p) and top = vload_u4_top<V>(p) (the nibble's bit 3 at bit 31), lane
// (nibble & 15) of the 16 entries lo, hi.
// Groups of codes: kCodeGroup<V> vectors of codes are written together, by vstore_u8s(p, a)
// (the codes of a[0], a[1], ... one after another, like that many vstore_u8) and vstore_u4s
// (the same as nibbles); their lanes must be below 256 (vstore_u8s) or 16 (vstore_u4s). One
// vector on AVX-512, four on AVX2, which has only these group forms: there one narrowing
// store per vector took three shuffles and a store, where four vectors take two saturating
// packs of pairs, one more pack and one permute (Note [quantized code groups], quant.h).
template <class V> struct IntLanes;
template <> struct IntLanes<float> { using type = uint32_t; };
template <class V> using IntOf = typename IntLanes<V>::type;

template <class V> FO_HD FO_INLINE IntOf<V> isplat(uint32_t u);
template <> FO_HD FO_INLINE uint32_t isplat<float>(uint32_t u) { return u; }
FO_HD FO_INLINE uint32_t vbits(float x) { return f32_to_bits(x); }
template <class V> FO_HD FO_INLINE V vfloat(IntOf<V> i);
template <> FO_HD FO_INLINE float vfloat<float>(uint32_t u) { return f32_from_bits(u); }
template <int k> FO_HD FO_INLINE uint32_t vshl(uint32_t a) { return a << k; }
template <int k> FO_HD FO_INLINE uint32_t vshr(uint32_t a) { return a >> k; }
template <int k> FO_HD FO_INLINE uint32_t vsra(uint32_t a) {  // floor(int32(a) / 2^k)
  return static_cast<uint32_t>(static_cast<int32_t>(a) >> k);
}
FO_HD FO_INLINE uint32_t vmin_i32(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(a) < static_cast<int32_t>(b) ? a : b;
}
FO_HD FO_INLINE uint32_t vmax_i32(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(a) > static_cast<int32_t>(b) ? a : b;
}
FO_HD FO_INLINE uint32_t vmin_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }
FO_HD FO_INLINE bool vany(bool m) { return m; }
template <class V> FO_HD FO_INLINE IntOf<V> viota();
template <> FO_HD FO_INLINE uint32_t viota<float>() { return 0u; }
FO_HD FO_INLINE bool vlt_u32(uint32_t a, uint32_t b) { return a < b; }
FO_HD FO_INLINE uint32_t vmax_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }
FO_HD FO_INLINE bool veq_i32(uint32_t a, uint32_t b) { return a == b; }
FO_HD FO_INLINE bool vgt_i32(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(a) > static_cast<int32_t>(b);
}
FO_HD FO_INLINE uint32_t vselect(bool m, uint32_t a, uint32_t b) { return m ? a : b; }
FO_HD FO_INLINE uint32_t vreduce_max_u32(uint32_t a) { return a; }
template <class V> FO_HD FO_INLINE IntOf<V> vload_u8(const uint8_t* p);
template <> FO_HD FO_INLINE uint32_t vload_u8<float>(const uint8_t* p) { return *p; }
template <class V> FO_HD FO_INLINE IntOf<V> vload_s8(const uint8_t* p);
template <> FO_HD FO_INLINE uint32_t vload_s8<float>(const uint8_t* p) {
  return static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(*p)));
}
FO_HD FO_INLINE float vzero_unless(uint32_t a, uint32_t b, float x) { return (a & b) != 0 ? x : 0.0f; }
FO_HD FO_INLINE void vstore_u8(uint8_t* p, uint32_t a) { *p = static_cast<uint8_t>(a); }
template <class V> FO_INLINE IntOf<V> vload_u4(const uint8_t* p);
template <class V> constexpr bool kLookup16 = false;
template <class V> constexpr bool kLookup8x2 = false;
// vload_u4_top<V>(p) (AVX2): lane j's nibble in bits 28-31, the lower nibbles of its 32-bit
// word below. For a signed code that an arithmetic shift then sign-extends (QuantMap::load),
// whose mask drops the rest.
template <class V> FO_INLINE IntOf<V> vload_u4_top(const uint8_t* p);
template <class V> FO_INLINE IntOf<V> vload_u4_low(const uint8_t* p);
template <class V> constexpr int kCodeGroup = 1;
template <class I> FO_INLINE void vstore_u8s(uint8_t* p, const I* a) { vstore_u8(p, a[0]); }
template <class I> FO_INLINE void vstore_u4s(uint8_t* p, const I* a) { vstore_u4(p, a[0]); }

#if defined(__AVX2__) && defined(__FMA__)
struct I32x8 { __m256i v; };
template <> struct IntLanes<F32x8> { using type = I32x8; };
template <> FO_INLINE I32x8 isplat<F32x8>(uint32_t u) { return {_mm256_set1_epi32(static_cast<int>(u))}; }
FO_INLINE I32x8 vbits(F32x8 x) { return {_mm256_castps_si256(x.v)}; }
template <> FO_INLINE F32x8 vfloat<F32x8>(I32x8 i) { return {_mm256_castsi256_ps(i.v)}; }
FO_INLINE I32x8 operator+(I32x8 a, I32x8 b) { return {_mm256_add_epi32(a.v, b.v)}; }
FO_INLINE I32x8 operator-(I32x8 a, I32x8 b) { return {_mm256_sub_epi32(a.v, b.v)}; }
FO_INLINE I32x8 operator&(I32x8 a, I32x8 b) { return {_mm256_and_si256(a.v, b.v)}; }
FO_INLINE I32x8 operator|(I32x8 a, I32x8 b) { return {_mm256_or_si256(a.v, b.v)}; }
FO_INLINE I32x8 operator^(I32x8 a, I32x8 b) { return {_mm256_xor_si256(a.v, b.v)}; }
FO_INLINE I32x8 operator*(I32x8 a, I32x8 b) { return {_mm256_mullo_epi32(a.v, b.v)}; }
template <> FO_INLINE I32x8 viota<F32x8>() { return {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)}; }
template <int k> FO_INLINE I32x8 vshl(I32x8 a) { return {_mm256_slli_epi32(a.v, k)}; }
template <int k> FO_INLINE I32x8 vshr(I32x8 a) { return {_mm256_srli_epi32(a.v, k)}; }
template <int k> FO_INLINE I32x8 vsra(I32x8 a) { return {_mm256_srai_epi32(a.v, k)}; }
FO_INLINE I32x8 vmin_i32(I32x8 a, I32x8 b) { return {_mm256_min_epi32(a.v, b.v)}; }
FO_INLINE I32x8 vmax_i32(I32x8 a, I32x8 b) { return {_mm256_max_epi32(a.v, b.v)}; }
FO_INLINE I32x8 vmin_u32(I32x8 a, I32x8 b) { return {_mm256_min_epu32(a.v, b.v)}; }
FO_INLINE I32x8 vmax_u32(I32x8 a, I32x8 b) { return {_mm256_max_epu32(a.v, b.v)}; }
FO_INLINE M32x8 veq_i32(I32x8 a, I32x8 b) { return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(a.v, b.v))}; }
FO_INLINE M32x8 vgt_i32(I32x8 a, I32x8 b) { return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(a.v, b.v))}; }
FO_INLINE bool vany(M32x8 m) { return !_mm256_testz_ps(m.v, m.v); }
FO_INLINE M32x8 vlt_u32(I32x8 a, I32x8 b) {  // signed compare with both sign bits flipped
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_xor_si256(b.v, flip), _mm256_xor_si256(a.v, flip)))};
}
FO_INLINE M32x8 operator&(M32x8 a, M32x8 b) { return {_mm256_and_ps(a.v, b.v)}; }
FO_INLINE I32x8 vselect(M32x8 m, I32x8 a, I32x8 b) {
  return {_mm256_blendv_epi8(b.v, a.v, _mm256_castps_si256(m.v))};
}
FO_INLINE uint32_t vreduce_max_u32(I32x8 a) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a.v), _mm256_extracti128_si256(a.v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}
template <> FO_INLINE I32x8 vload_u8<F32x8>(const uint8_t* p) {
  return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))};
}
template <> FO_INLINE I32x8 vload_s8<F32x8>(const uint8_t* p) {
  return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))};
}
FO_INLINE F32x8 vzero_unless(I32x8 a, I32x8 b, F32x8 x) {
  const __m256i zero = _mm256_cmpeq_epi32(_mm256_and_si256(a.v, b.v), _mm256_setzero_si256());
  return {_mm256_andnot_ps(_mm256_castsi256_ps(zero), x.v)};
}
FO_INLINE I32x8 vpositive_or(I32x8 a, I32x8 b, I32x8 c) {
  return {_mm256_and_si256(_mm256_cmpgt_epi32(a.v, _mm256_setzero_si256()),
                           _mm256_or_si256(a.v, _mm256_and_si256(b.v, c.v)))};
}
// The 4 bytes (8 nibbles) broadcast to every lane (a load: no ALU work), lane j shifted by its
// own count so that nibble j lands at the bottom (vload_u4) or at the top (vload_u4_top), where
// the byte-to-qword widening, a shift, an or and an and took four operations (measured with
// the changes of quant.h, Note [paired bf16 param stores], on a Zen 3 only; a variable shift is
// one operation there, three on Haswell).
FO_INLINE __m256i vload_nibbles_bcast(const uint8_t* p) {
  int32_t w;
  __builtin_memcpy(&w, p, sizeof w);
  return _mm256_set1_epi32(w);
}
template <> FO_INLINE I32x8 vload_u4_low<F32x8>(const uint8_t* p) {
  const __m256i down = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return {_mm256_srlv_epi32(vload_nibbles_bcast(p), down)};
}
template <> FO_INLINE I32x8 vload_u4<F32x8>(const uint8_t* p) {
  return vload_u4_low<F32x8>(p) & isplat<F32x8>(15u);
}
template <> FO_INLINE I32x8 vload_u4_top<F32x8>(const uint8_t* p) {
  const __m256i up = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  return {_mm256_sllv_epi32(vload_nibbles_bcast(p), up)};
}
template <> constexpr bool kLookup8x2<F32x8> = true;
FO_INLINE F32x8 vlookup8x2(I32x8 i, I32x8 top, F32x8 lo, F32x8 hi) {
  return {_mm256_blendv_ps(_mm256_permutevar8x32_ps(lo.v, i.v), _mm256_permutevar8x32_ps(hi.v, i.v),
                           _mm256_castsi256_ps(top.v))};
}
template <> constexpr int kCodeGroup<F32x8> = 4;
// a[0..3] as 16-bit and then 8-bit lanes (the packs saturate, exact below 256), in each
// 128-bit half the dwords (4 codes each) a0 b0 c0 d0 | a1 b1 c1 d1 (a0: a[0]'s lanes 0-3),
// which one permute puts in order
FO_INLINE __m256i pack_codes(const I32x8* a) {
  const __m256i ab = _mm256_packus_epi32(a[0].v, a[1].v), cd = _mm256_packus_epi32(a[2].v, a[3].v);
  return _mm256_packus_epi16(ab, cd);
}
template <> FO_INLINE void vstore_u8s<I32x8>(uint8_t* p, const I32x8* a) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permutevar8x32_epi32(pack_codes(a), order));
}
template <> FO_INLINE void vstore_u4s<I32x8>(uint8_t* p, const I32x8* a) {
  // each pair of neighbouring codes (lo, hi) -> the 16-bit lo + 16 hi (below 256), packed to
  // bytes: in each half the words a0 b0 c0 d0 (a0: a[0]'s lanes 0-3 in two bytes), and the
  // two halves' words interleaved
  const __m256i w = _mm256_maddubs_epi16(pack_codes(a), _mm256_set1_epi16(0x1001));
  const __m256i b = _mm256_packus_epi16(w, w);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_unpacklo_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
#endif

#if defined(__AVX512F__)
struct I32x16 { __m512i v; };
template <> struct IntLanes<F32x16> { using type = I32x16; };
template <> FO_INLINE I32x16 isplat<F32x16>(uint32_t u) { return {_mm512_set1_epi32(static_cast<int>(u))}; }
FO_INLINE I32x16 vbits(F32x16 x) { return {_mm512_castps_si512(x.v)}; }
template <> FO_INLINE F32x16 vfloat<F32x16>(I32x16 i) { return {_mm512_castsi512_ps(i.v)}; }
FO_INLINE I32x16 operator+(I32x16 a, I32x16 b) { return {_mm512_add_epi32(a.v, b.v)}; }
FO_INLINE I32x16 operator-(I32x16 a, I32x16 b) { return {_mm512_sub_epi32(a.v, b.v)}; }
FO_INLINE I32x16 operator&(I32x16 a, I32x16 b) { return {_mm512_and_si512(a.v, b.v)}; }
FO_INLINE I32x16 operator|(I32x16 a, I32x16 b) { return {_mm512_or_si512(a.v, b.v)}; }
FO_INLINE I32x16 operator^(I32x16 a, I32x16 b) { return {_mm512_xor_si512(a.v, b.v)}; }
FO_INLINE I32x16 operator*(I32x16 a, I32x16 b) { return {_mm512_mullo_epi32(a.v, b.v)}; }
template <> FO_INLINE I32x16 viota<F32x16>() {
  return {_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)};
}
template <int k> FO_INLINE I32x16 vshl(I32x16 a) { return {_mm512_slli_epi32(a.v, k)}; }
template <int k> FO_INLINE I32x16 vshr(I32x16 a) { return {_mm512_srli_epi32(a.v, k)}; }
template <int k> FO_INLINE I32x16 vsra(I32x16 a) { return {_mm512_srai_epi32(a.v, k)}; }
FO_INLINE I32x16 vmin_i32(I32x16 a, I32x16 b) { return {_mm512_min_epi32(a.v, b.v)}; }
FO_INLINE I32x16 vmax_i32(I32x16 a, I32x16 b) { return {_mm512_max_epi32(a.v, b.v)}; }
FO_INLINE I32x16 vmin_u32(I32x16 a, I32x16 b) { return {_mm512_min_epu32(a.v, b.v)}; }
FO_INLINE I32x16 vmax_u32(I32x16 a, I32x16 b) { return {_mm512_max_epu32(a.v, b.v)}; }
FO_INLINE M16 veq_i32(I32x16 a, I32x16 b) { return {_mm512_cmpeq_epi32_mask(a.v, b.v)}; }
FO_INLINE M16 vgt_i32(I32x16 a, I32x16 b) { return {_mm512_cmpgt_epi32_mask(a.v, b.v)}; }
FO_INLINE M16 vlt_u32(I32x16 a, I32x16 b) { return {_mm512_cmplt_epu32_mask(a.v, b.v)}; }
FO_INLINE bool vany(M16 m) { return mask_any(m.k); }
FO_INLINE M16 operator&(M16 a, M16 b) { return {static_cast<__mmask16>(a.k & b.k)}; }
FO_INLINE I32x16 vselect(M16 m, I32x16 a, I32x16 b) { return {_mm512_mask_blend_epi32(m.k, b.v, a.v)}; }
FO_INLINE uint32_t vreduce_max_u32(I32x16 a) {
  return static_cast<uint32_t>(_mm512_reduce_max_epu32(a.v));
}
template <> FO_INLINE I32x16 vload_u8<F32x16>(const uint8_t* p) {
  return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
template <> FO_INLINE I32x16 vload_s8<F32x16>(const uint8_t* p) {
  return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
// vptestmd, and a zero-masking move that the compiler folds into the instruction computing x
FO_INLINE F32x16 vzero_unless(I32x16 a, I32x16 b, F32x16 x) {
  return {_mm512_maskz_mov_ps(_mm512_test_epi32_mask(a.v, b.v), x.v)};
}
FO_INLINE I32x16 vpositive_or(I32x16 a, I32x16 b, I32x16 c) {  // 0xF8: a | (b & c)
  return {_mm512_maskz_ternarylogic_epi32(_mm512_cmpgt_epi32_mask(a.v, _mm512_setzero_si512()),
                                          a.v, b.v, c.v, 0xF8)};
}
FO_INLINE void vstore_u8(uint8_t* p, I32x16 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a.v));
}
template <> constexpr bool kLookup16<F32x16> = true;
FO_INLINE F32x16 vlookup16(I32x16 i, F32x16 t) { return {_mm512_permutexvar_ps(i.v, t.v)}; }
template <> FO_INLINE I32x16 vload_u4_low<F32x16>(const uint8_t* p) {
  // byte j -> 64-bit lane j; a copy shifted up 28 puts its high nibble at the bottom of lane
  // 2j + 1 (lane 2j keeps the byte: its low nibble at the bottom)
  const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return {_mm512_or_si512(q, _mm512_slli_epi64(q, 28))};
}
FO_INLINE void vstore_u4(uint8_t* p, I32x16 a) {
  // lanes 2j, 2j+1 -> the low byte of 64-bit lane j (vpmovqb keeps that byte)
  const __m512i q = _mm512_or_si512(a.v, _mm512_srli_epi64(a.v, 28));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm512_cvtepi64_epi8(q));
}
#endif


// ---- stochastic-rounding bf16 stores of the vector ISAs -----------------------------------
// (here, after the integer lanes, in whose vocabulary their hash is written)
// Note [opaque hash constants]
// The hash's and the SR store's constant lanes pass through opaque(): an empty asm that GCC
// cannot see through but may hoist out of the loop (it is not volatile), so a constant is
// built once and then kept in a register or spilled to the stack (a memory operand), never
// rebuilt (mov + vpbroadcastd from a general register) every iteration, which GCC chose for
// the avx512bf16 all-bf16 SR loop once the native pair loop (kernels.h, Note [paired native
// bf16 stores]) sat beside it: 0.52 -> 0.59-0.60 ns/element in cache (bench_bf16_compute.py);
// with opaque() 0.52 again, and the avx512 SR loop 0.58 -> 0.52. AVX-512 only: AVX2's 16
// registers then held the constants through the shared pair loop (the SR branch is taken at
// run time), which cost its plain all-bf16 AdamW 0.56 -> 0.68.
template <class I> FO_INLINE I opaque(I x) {
  if constexpr (sizeof(x.v) == 64) __asm__("" : "+v"(x.v));
  return x;
}

// Note [sr_hash strength reduction]
// A vector store hashes the indices index .. index + W - 1 in one go. sr_hash's first step,
// (lo * kSrMulLo) ^ (hi * kSrMulHi) ^ key over the index's 32-bit halves, is affine in the
// lanes: (lo0 + j) * kSrMulLo is lo0 * kSrMulLo + j * kSrMulLo mod 2^32 (the lane constants
// fold at compile time), and while lo0 + j does not wrap every lane shares hi0, so the high
// half and the key fold into one scalar: a broadcast, an add and an xor per vector. A vector
// whose low halves wrap past 2^32 (one in 2^27 at most: a paired group spans 2W - 1 indices)
// takes the general form, in which a wrapped lane's high half is hi0 + 1. Both are the same
// bits as sr_hash.
// Written once over the integer lanes (Note [integer lanes]) for the vector types; sr_hash,
// the scalar definition, stays as it is for the host and CUDA.
// kStride: lane j hashes index + kStride * j (kStride = 2: one half of a pair of lane groups,
// Note [paired bf16 lanes]).
template <class V, uint32_t kStride = 1> FO_INLINE IntOf<V> sr_hash_lanes(uint32_t key, uint64_t index) {
  using I = IntOf<V>;
  constexpr uint32_t kLast = kStride * (VecTraits<V>::kWidth - 1);
  const uint32_t lo0 = static_cast<uint32_t>(index), hi0 = static_cast<uint32_t>(index >> 32);
  const I lanes = viota<V>();
  const I lo_mul = isplat<V>(lo0 * kSrMulLo) + opaque(lanes * isplat<V>(kStride * kSrMulLo));
  I h;
  if (__builtin_expect(lo0 <= 0xFFFFFFFFu - kLast, 1)) {
    h = lo_mul ^ isplat<V>((hi0 * kSrMulHi) ^ key);
  } else {
    const I base = isplat<V>(lo0);
    // a lane whose low half wrapped (unsigned lo0 + kStride * j < lo0) carries into the high half
    const I hi_mul = vselect(vlt_u32(base + lanes * isplat<V>(kStride), base),
                             isplat<V>((hi0 + 1u) * kSrMulHi), isplat<V>(hi0 * kSrMulHi));
    h = lo_mul ^ hi_mul ^ isplat<V>(key);
  }
  h = h ^ vshr<16>(h);
  h = h * opaque(isplat<V>(kFmix1));
  h = h ^ vshr<13>(h);
  h = h * opaque(isplat<V>(kFmix2));
  return h ^ vshr<16>(h);
}

// The vector ISAs' store (the primary template, declared with the scalar one above), written
// once too: a finite lane is (x + (h & 0xFFFF)) >> 16; only a vector with an inf or NaN lane
// takes the branch that rounds those lanes to nearest (an infinity stays, a NaN is quieted:
// StorageIO's round_bits).
template <class V> struct SrStore {
  static_assert(VecTraits<V>::kWidth > 1 && std::is_same_v<typename VecTraits<V>::Scalar, float>,
                "stochastic-rounding bf16 stores take fp32 vectors");
  // The bf16 of each lane in its high 16 bits; lane j is element index + kStride * j.
  template <uint32_t kStride = 1>
  static FO_INLINE IntOf<V> bits(V v, uint32_t key, uint64_t index) {
    using I = IntOf<V>;
    const I x = vbits(v);
    // Note [opaque hash constants]
    I out = x + (sr_hash_lanes<V, kStride>(key, index) & opaque(isplat<V>(0xFFFFu)));
    const auto special = vgt_i32(x & opaque(isplat<V>(0x7FFFFFFFu)),
                                 opaque(isplat<V>(0x7F7FFFFFu)));  // inf, NaN
    if (__builtin_expect(vany(special), 0))
      out = vselect(special, I{StorageIO<V, bf16>::round_bits(x.v)}, out);
    return out;
  }
  static FO_INLINE void store(bf16* p, V v, uint32_t key, uint64_t index) {
    StorageIO<V, bf16>::store_high_halves(p, bits(v, key, index).v);
  }
};

// ---- paired bf16 lanes --------------------------------------------------------------------
// Note [paired bf16 lanes]
// A span whose every stream is bfloat16 (all-bf16, and all-bf16 with Kahan compensation)
// loads and stores two lane groups at a time, 2W elements, de-interleaved: the 2W bf16 read
// as W 32-bit lanes hold element 2j in lane j's low half and element 2j+1 in its high half,
// so `even` = lanes << 16 and `odd` = lanes & 0xFFFF0000 are both groups widened to fp32,
// one integer operation per group (where one group at a time takes a widening load and a
// shift). A rule runs lane by lane, so which element sits in which lane does not change a
// bit of it. The store is the inverse:
// each group rounded to nearest even (StorageIO's round_bits) or stochastically (SrStore's
// bits, with lane j of `even` at element index + 2j and of `odd` at index + 2j + 1), then
// (even >> 16) | (odd & 0xFFFF0000) written as W 32-bit lanes. Same bits as the stores one
// group at a time, by construction (the scalar ISA has no pairs, and the tests compare every
// ISA with it). Where the ISA has vcvtne2ps2bf16 (the avx512bf16 unit) a pair rounded to
// nearest is stored with it: kernels.h, Note [paired native bf16 stores].
// Measured: all-bf16 AdamW in cache (2^16 elements, 1 thread, one Zen 4 vCPU; the minimum of
// 7 timings of 200 calls, five processes per module alternated), ns/element, before -> after:
//   avx512bf16: + stochastic rounding 0.65 -> 0.54, + Kahan 0.64 -> 0.63 (plain: unchanged);
//   avx512:     plain 0.52 -> 0.48, + SR 0.67 -> 0.60, + Kahan 0.78 -> 0.64;
//   avx2:       plain 0.75 -> 0.73, + SR 0.95 -> 0.93, + Kahan 1.12 -> 0.97.
// AVX2 rounds a pair with one NaN test for both groups (bf16_round_lanes2: an unordered
// compare of the two and a movemask, where each group's round_bits took an and, a compare
// and a vptest) and writes it with a word blend (vstore_bf16_pair). On a 2.45 GHz Zen 3
// (bench_bf16_compute.py, two runs alternated with the build before): plain 0.94 -> 0.69-0.70,
// + SR 1.16 -> 1.01-1.02, + Kahan 1.16-1.21 -> 0.98-0.99.
// At 2^26 (torch's tensors, both modules in one process, 7 interleaved rounds, three runs)
// the memory decides and the same code moved +-10% between runs: + SR 0.91-0.98x the old time
// with avx512bf16, 0.87-0.97x on every row with avx512, + Kahan 0.84x with avx2; the rest
// within that noise. The vector types only.
template <class V> FO_INLINE IntOf<V> vload_words(const void* p);
#if defined(__AVX2__) && defined(__FMA__)
template <> FO_INLINE I32x8 vload_words<F32x8>(const void* p) {
  return {_mm256_loadu_si256(static_cast<const __m256i*>(p))};
}
FO_INLINE void vstore_words(void* p, I32x8 w) { _mm256_storeu_si256(static_cast<__m256i*>(p), w.v); }
#endif
#if defined(__AVX512F__)
template <> FO_INLINE I32x16 vload_words<F32x16>(const void* p) { return {_mm512_loadu_si512(p)}; }
FO_INLINE void vstore_words(void* p, I32x16 w) { _mm512_storeu_si512(p, w.v); }
#endif
template <class V> FO_INLINE void vload_bf16_pair(const bf16* p, V& even, V& odd) {
  const IntOf<V> w = vload_words<V>(p);
  even = vfloat<V>(vshl<16>(w));
  odd = vfloat<V>(w & isplat<V>(0xFFFF0000u));
}
// Each lane's bf16, rounded to nearest even, in its high 16 bits (the low 16 are not cleared).
template <class V> FO_INLINE IntOf<V> bf16_round_lanes(V v) {
  return IntOf<V>{StorageIO<V, bf16>::round_bits(vbits(v).v)};
}
// bf16_round_lanes of a pair of lane groups, ra of a and rb of b. AVX2 tests both for a NaN
// lane at once (one unordered compare and one movemask, where each round_bits takes an and,
// a compare and a vptest): Note [paired bf16 lanes].
template <class V> FO_INLINE void bf16_round_lanes2(V a, V b, IntOf<V>& ra, IntOf<V>& rb) {
  ra = bf16_round_lanes(a);
  rb = bf16_round_lanes(b);
}
#if defined(__AVX2__) && defined(__FMA__)
template <> FO_INLINE void bf16_round_lanes2<F32x8>(F32x8 a, F32x8 b, I32x8& ra, I32x8& rb) {
  using S = StorageIO<F32x8, bf16>;
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q)) == 0, 1)) {
    ra = {S::round_not_nan(_mm256_castps_si256(a.v))};
    rb = {S::round_not_nan(_mm256_castps_si256(b.v))};
  } else {
    ra = {S::round_bits(_mm256_castps_si256(a.v))};
    rb = {S::round_bits(_mm256_castps_si256(b.v))};
  }
}
#endif
// The bf16 in the high halves of `even` and `odd` to p[0, 2W).
template <class V> FO_INLINE void vstore_bf16_pair(bf16* p, IntOf<V> even, IntOf<V> odd) {
  vstore_words(p, vshr<16>(even) | (odd & isplat<V>(0xFFFF0000u)));
}
#if defined(__AVX2__) && defined(__FMA__)
// the low word of each lane from even >> 16, the high word from odd: one word blend where the
// generic form takes an and and an or
template <> FO_INLINE void vstore_bf16_pair<F32x8>(bf16* p, I32x8 even, I32x8 odd) {
  vstore_words(p, I32x8{_mm256_blend_epi16(_mm256_srli_epi32(even.v, 16), odd.v, 0xAA)});
}
#endif
// Two consecutive lane groups, a to p[0, W) and b to p[W, 2W), rounded to nearest even (the
// bits of two StorageIO stores). AVX2 rounds them with one NaN test (bf16_round_lanes2) and
// writes them with one pack, one permute and one 256-bit store, where two stores take two NaN
// tests, two byte shuffles, two permutes and two 128-bit stores: Note [paired bf16 param
// stores] (quant.h). Only the ISA with two lane groups per step has one (kLaneGroups, quant.h).
template <class V> FO_INLINE void vstore_bf16_x2(bf16* p, V a, V b);
#if defined(__AVX2__) && defined(__FMA__)
template <> FO_INLINE void vstore_bf16_x2<F32x8>(bf16* p, F32x8 a, F32x8 b) {
  I32x8 ra, rb;
  bf16_round_lanes2(a, b, ra, rb);
  // packus per 128-bit half: [a0-3 b0-3 | a4-7 b4-7] (each value < 2^16: no saturation);
  // the 64-bit permute 0xD8 puts them in order
  const __m256i w = _mm256_packus_epi32(_mm256_srli_epi32(ra.v, 16), _mm256_srli_epi32(rb.v, 16));
  vstore_words(p, I32x8{_mm256_permute4x64_epi64(w, 0xD8)});
}
#endif

}  // namespace fastoptim
