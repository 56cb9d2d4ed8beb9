// kernels.h: the CPU driver that turns a rule of rules.h into a kernel over a Batch.
//
// Included by each isa_<name>.cpp, which first defines FO_VEC_F32 / FO_VEC_F64 (the vector
// types of its ISA) and FO_FILL_TABLE (the name of the function it exports).
//
// Note [one definition per ISA]
// Everything here lives in an anonymous namespace. Each ISA translation unit is compiled with
// its own -m flags; were these templates external, the linker could keep the AVX-512 copy of
// an inline function and hand it to the scalar path (an illegal instruction on an older
// CPU). Internal linkage gives every ISA its own private copy.
//
// Note [tails and heads]
// A span is processed as: a scalar head until the param pointer is aligned to the vector
// size (two vectors' for the all-bf16 layouts, Note [paired bf16 lanes] in vec.h), whole
// vectors, then a scalar tail. Head and tail run the SAME rule instantiated for
// the scalar type (bitwise identical, Note [bitwise identical paths]). The last vector never
// overlaps elements already updated: an in-place update is not idempotent.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernel_api.h"

#if !defined(FO_VEC_F32) || !defined(FO_VEC_F64) || !defined(FO_FILL_TABLE)
#error "define FO_VEC_F32, FO_VEC_F64 and FO_FILL_TABLE before including kernels.h"
#endif
#if !defined(FO_ISA_SHARD)
#error "FO_ISA_SHARD is set by the generated shard file (CMakeLists.txt, fastoptim_add_isa)"
#endif

namespace fastoptim {
namespace {

// No std:: algorithms here: their instantiations have external linkage and would be
// shared between ISA translation units (Note [one definition per ISA]).
FO_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FO_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// Index of the tensor holding global element `i`: the last t with off[t] <= i.
FO_INLINE int64_t tensor_of(const int64_t* off, int64_t n, int64_t i) {
  int64_t lo = 0, hi = n;  // off[lo] <= i holds; answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (off[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Note [software prefetch]
// The vector body asks for every stream it reads b.prefetch_ahead elements ahead (Batch,
// kernel_api.h; 0: no software prefetch). The division and square root of a rule fill the
// out-of-order window, which limits how many cache misses the hardware prefetchers and the
// loads themselves keep in flight; an explicit prefetch keeps DRAM busy regardless. The
// distance is a process-wide setting (dispatch.h: by default default_prefetch_ahead; the
// tuning hook _core._set_prefetch_ahead) so that it can be measured in one process, on the
// same memory;
// no result depends on it. Measured on the AVX2 VM of the first sessions, Adam fp32, 1 thread:
// 2^25 and 2^26 elements 4-8% faster at 256 ahead.
//
// The prefetch is a plain loop over the slots in run_span. Written as a generic lambda through
// each_slot (as the loads are), GCC 12 emitted no prefetch at all, at -O1 as at -O3 (a
// 20-line reproduction in a test file did the same; an always_inline helper called from a
// plain loop keeps it; presumably the lambda's call, having no side effect, is deleted
// before it is inlined). From 0385c53 to the fix no run_span had a prefetch (objdump showed none).
// tests/test_build.py requires a prefetch in every vector span of the built module so that
// this cannot come back unseen. (The missing prefetch was first blamed for all-fp16 AdamW
// running at half speed on 64-byte-aligned arrays; Note [loads before stores] has what was
// measured about that.) The default distance is by the width of the params
// (default_prefetch_ahead, dispatch.cpp, with its measurements).
//
// Prefetch element j of a stream of `bytes`-sized elements (integer math: the address may
// pass the end of the array; a prefetch never faults).
FO_INLINE void prefetch_at(const void* base, int64_t j, int64_t bytes) {
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(j * bytes)),
      0, 0);
}

template <class T> struct IsaVec;
template <> struct IsaVec<float> { using type = FO_VEC_F32; };
template <> struct IsaVec<double> { using type = FO_VEC_F64; };

// How each stream of a format is stored (Note [storage formats], kernel_api.h). Compute is the
// register type; Copy is void when the format writes no copy of the params; kKahan: the copies
// stream is the params' compensation, read and written (kBF16Kahan).
template <class P, class G, class S, class C, class Compute_, bool kKahan_ = false>
struct Layout {
  using Compute = Compute_;
  using Copy = C;
  static constexpr bool kKahan = kKahan_;
  template <int kSlot> using Elem = std::conditional_t<kSlot == kParam, P,
                                    std::conditional_t<kSlot == kGrad, G, S>>;
};
template <Format F> struct LayoutOf;
template <> struct LayoutOf<kF32> { using type = Layout<float, float, float, void, float>; };
template <> struct LayoutOf<kF64> { using type = Layout<double, double, double, void, double>; };
template <> struct LayoutOf<kBF16> { using type = Layout<bf16, bf16, bf16, void, float>; };
template <> struct LayoutOf<kF16> { using type = Layout<f16, f16, f16, void, float>; };
template <> struct LayoutOf<kBF16F32States> { using type = Layout<bf16, bf16, float, void, float>; };
template <> struct LayoutOf<kF16F32States> { using type = Layout<f16, f16, float, void, float>; };
template <> struct LayoutOf<kF32BF16Grads> { using type = Layout<float, bf16, float, void, float>; };
template <> struct LayoutOf<kF32F16Grads> { using type = Layout<float, f16, float, void, float>; };
template <> struct LayoutOf<kF32BF16GradsCopy> { using type = Layout<float, bf16, float, bf16, float>; };
template <> struct LayoutOf<kF32F16GradsCopy> { using type = Layout<float, f16, float, f16, float>; };
template <> struct LayoutOf<kBF16Kahan> { using type = Layout<bf16, bf16, bf16, bf16, float, true>; };
template <> struct LayoutOf<kF32BF16States> { using type = Layout<float, float, bf16, void, float>; };

// Note [native bf16 stores]
// The avx512bf16 translation unit (isa_avx512bf16.cpp, compiled with -mavx512bf16) stores
// 16 lanes of bfloat16 with vcvtneps2bf16 instead of the integer code of vec.h: the same
// round to nearest even, but the instruction flushes subnormal inputs to zero and keeps a
// NaN's payload, where vec.h (and ml_dtypes) do not. A vector with any subnormal or NaN lane
// takes vec.h's code, so the bits stored are the same as on every other path. (The quantized
// driver stores without the check and stores a block with such a lane again after its loop:
// quant.h, Note [rare bf16 stores after the block].)
#if defined(__AVX512BF16__)
// The rare vector's store, out of line so that its code does not share the loop's registers
// (inlined, it made the all-bf16 AdamW loop 8-10% slower). GCC 12 then warns that the
// intrinsics' own _mm512_undefined_epi32() placeholder is uninitialized (a false positive of
// the header, silenced here only).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
[[gnu::noinline]] void store_bf16_rare(bf16* p, F32x16 v) { vstore_to(p, v); }
#pragma GCC diagnostic pop
// The lanes of v that vcvtneps2bf16 stores otherwise than vec.h: a subnormal or NaN lane, an
// exponent field of 0 or 255 (adding 1 to it gives 1 or wraps to 0 into the sign bit: no bit
// of 24..30 set, where every other exponent sets one) and a mantissa that is not 0 (zeros and
// infinities convert exactly). Three integer operations.
FO_INLINE __mmask16 bf16_native_special(F32x16 v) {
  const __m512i x = _mm512_castps_si512(v.v);
  const __mmask16 extreme = _mm512_testn_epi32_mask(_mm512_add_epi32(x, _mm512_set1_epi32(0x00800000)),
                                                    _mm512_set1_epi32(0x7F000000));
  return _mm512_mask_test_epi32_mask(extreme, x, _mm512_set1_epi32(0x007FFFFF));
}
// The same lanes in one vfpclassps (AVX-512DQ; quiet NaN 0x01, denormal 0x20, signalling NaN
// 0x80), right only while MXCSR.DAZ is clear: with DAZ set it classes a subnormal as a zero
// (tests/test_formats_convert.py caught that on Zen 4). Only the paired stores use it, behind
// daz_clear(): Note [paired native bf16 stores].
FO_INLINE __mmask16 bf16_native_special_no_daz(F32x16 v) {
  return _mm512_fpclass_ps_mask(v.v, 0x01 | 0x20 | 0x80);
}
// Whether this thread's MXCSR has DAZ (denormals are zero, bit 6) clear. Worker threads take
// the caller's mode (parallel.cpp), so each reads its own.
FO_INLINE bool daz_clear() { return (_mm_getcsr() & 0x0040u) == 0; }
// vcvtneps2bf16's store of v, right only where bf16_native_special(v) is 0, which it returns.
FO_INLINE __mmask16 store_bf16_native_unchecked(bf16* p, F32x16 v) {
  const __m256bh r = _mm512_cvtneps_pbh(v.v);
  __builtin_memcpy(p, &r, sizeof r);
  return bf16_native_special(v);
}
FO_INLINE void store_bf16_native(bf16* p, F32x16 v) {
  if (__builtin_expect(mask_any(bf16_native_special(v)), 0)) {
    store_bf16_rare(p, v);
    return;
  }
  const __m256bh r = _mm512_cvtneps_pbh(v.v);
  __builtin_memcpy(p, &r, sizeof r);
}
// Note [paired native bf16 stores]
// Two lane groups in the paired order of vec.h's Note [paired bf16 lanes] (`even` holds
// elements 0, 2, ..., 30 of p, `odd` 1, 3, ..., 31), rounded to nearest even: one
// vcvtne2ps2bf16 (even's 16 bf16, then odd's) and one word permute (vpermw, AVX-512BW) that
// interleaves them, one 64-byte store. A pair with any subnormal or NaN lane takes vec.h's
// integer rounding (vstore_bf16_pair) out of line, so the bits are those of every other path.
// The check is one vfpclassps per group (bf16_native_special_no_daz), right only while DAZ is
// clear: run_span reads MXCSR once per span (daz_clear) and takes the integer pair loop
// otherwise, as it does under stochastic rounding (whose param store is integer code anyway).
// The all-bf16 formats (plain, and Kahan, whose param is then read back from the line just
// written) used to load one group at a time on this ISA (a widening load and a shift each) and
// store each group with vcvtneps2bf16 after the three-operation check, since integer pairs had
// measured no faster. A stand-alone loop showed both halves of the gain (2^16, AdamW,
// ns/element): the old shape 0.41, with vfpclassps 0.35, pairs with the native store and the
// vfpclassps check 0.30-0.32, against the square-root and division floor of 0.27. In the
// library (bench_bf16_compute.py, 2^16, 1 thread, Zen 4 VM, two runs alternated with the
// build before): plain 0.45 -> 0.33, + Kahan 0.61-0.62 -> 0.45-0.46, + stochastic rounding
// 0.52-0.54 -> 0.52 (Note [opaque hash constants], vec.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // the header's placeholder, as store_bf16_rare
[[gnu::noinline]] void store_bf16_pair_rare(bf16* p, F32x16 even, F32x16 odd) {
  I32x16 re, ro;
  bf16_round_lanes2(even, odd, re, ro);
  vstore_bf16_pair<F32x16>(p, re, ro);
}
#pragma GCC diagnostic pop
FO_INLINE void store_bf16_pair_native(bf16* p, F32x16 even, F32x16 odd) {
  const __mmask16 rare = bf16_native_special_no_daz(even) | bf16_native_special_no_daz(odd);
  if (__builtin_expect(mask_any(rare), 0)) {
    store_bf16_pair_rare(p, even, odd);
    return;
  }
  const __m512bh r = _mm512_cvtne2ps_pbh(odd.v, even.v);  // words 0-15: even, 16-31: odd
  __m512i w;
  __builtin_memcpy(&w, &r, sizeof w);
  // word 2j <- word j, word 2j + 1 <- word 16 + j: dword j of the index is j | (16 + j) << 16
  const __m512i idx = _mm512_add_epi32(
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(0x10001)),
      _mm512_set1_epi32(16 << 16));
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(idx, w));
}
#endif
// Every store of the kernels: vec.h's vstore_to, or the native bf16 store above.
template <class E, class V> FO_INLINE void store_elem(E* p, V v) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<E, bf16> && std::is_same_v<V, F32x16>) {
    store_bf16_native(p, v);
    return;
  }
#endif
  vstore_to(p, v);
}

// The load/store options of one span (kernel_api.h, Note [load/store options]) for lane type V.
template <class V> struct Io {
  V grad_scale_inv;
  void* copy;       // this tensor's copy or compensation (or null)
  uint64_t base;    // this tensor's first element's index in the call (stochastic rounding)
  uint32_t sr_key;
  bool sr;
};

// f(std::integral_constant<int, s>{}) for every slot s: a slot's storage type is a
// compile-time function of s.
template <class F, int... S> FO_INLINE void each_slot_impl(F& f, std::integer_sequence<int, S...>) {
  (f(std::integral_constant<int, S>{}), ...);
}
template <class F> FO_INLINE void each_slot(F&& f) {
  each_slot_impl(f, std::make_integer_sequence<int, kMaxSlots>{});
}

template <class L, int kSlot> FO_INLINE auto* elem_ptr(void* const* ptr) {
  return static_cast<typename L::template Elem<kSlot>*>(ptr[kSlot]);
}
// The element size of slot s (params, grads, or the states' shared type).
template <class L> constexpr int64_t slot_bytes(int s) {
  return s == kParam ? sizeof(typename L::template Elem<kParam>)
                     : s == kGrad ? sizeof(typename L::template Elem<kGrad>)
                                  : sizeof(typename L::template Elem<kState0>);
}

// kGroups lane groups at elements i, i + W, ...: load the rule's slots (widening; grads
// unscaled, params plus their compensation under kKahan) into x[0], x[1], ..., slot by slot
// (each slot's groups back to back: Note [slot-major order]) ...
template <class Rule, class L, class V, int kGroups>
FO_INLINE void load_groups_at(void* const* ptr, const Io<V>& io, int64_t i,
                              V (&x)[kGroups][kMaxSlots]) {
  constexpr int kW = VecTraits<V>::kWidth;
  each_slot([&](auto s) {
    if constexpr ((Rule::kReads & bit(s)) != 0) {
      for (int k = 0; k < kGroups; ++k) {
        const int64_t at = i + k * kW;
        x[k][s] = vload_from<V>(elem_ptr<L, s>(ptr) + at);
        if constexpr (s == kGrad) x[k][s] = x[k][s] * io.grad_scale_inv;
        if constexpr (s == kParam && L::kKahan)
          x[k][s] = x[k][s] + vload_from<V>(static_cast<const typename L::Copy*>(io.copy) + at);
      }
    }
  });
}
// The store of params[i] (dst points to it; without compensation): rounded to nearest even,
// or stochastically for bf16 params when io.sr (element index io.base + i). Shared with the
// quantized-state driver (quant.h).
template <class P, class V>
FO_INLINE void store_param(P* dst, V x, const Io<V>& io, int64_t i) {
  if constexpr (std::is_same_v<P, bf16>) {
    if (io.sr) {
      vstore_sr(dst, x, io.sr_key, io.base + static_cast<uint64_t>(i));
      return;
    }
  }
  store_elem(dst, x);
}
// ... and, once the rule has run, store them (rounding: store_param for the params), slot by
// slot, and write the params' copy where the format has one.
template <class Rule, class L, class V, int kGroups>
FO_INLINE void store_groups_at(void* const* ptr, const Io<V>& io, int64_t i,
                               const V (&x)[kGroups][kMaxSlots]) {
  constexpr int kW = VecTraits<V>::kWidth;
  each_slot([&](auto s) {
    if constexpr ((Rule::kWrites & bit(s)) != 0) {
      for (int k = 0; k < kGroups; ++k) {
        const int64_t at = i + k * kW;
        auto* dst = elem_ptr<L, s>(ptr) + at;
        if constexpr (s == kParam && L::kKahan) {
          store_elem(dst, x[k][s]);  // p' = bf16(x); compensation' = bf16(x - p') (exact)
          store_elem(static_cast<typename L::Copy*>(io.copy) + at, x[k][s] - vload_from<V>(dst));
        } else if constexpr (s == kParam) {
          store_param(dst, x[k][s], io, at);
        } else {
          store_elem(dst, x[k][s]);
        }
      }
    }
  });
  if constexpr (!std::is_void_v<typename L::Copy> && !L::kKahan)
    for (int k = 0; k < kGroups; ++k)
      store_elem(static_cast<typename L::Copy*>(io.copy) + i + k * kW, x[k][kParam]);
}
// Whether every stream of layout L is bfloat16 (params, grads, states and any compensation):
// its vector body then loads and stores two lane groups at a time (vec.h, Note [paired bf16
// lanes]) with load_pair_at and store_pair_at, the pair forms of load_groups_at and store_groups_at.
template <class L> constexpr bool kPairedBf16 =
    std::is_same_v<typename L::template Elem<kParam>, bf16> &&
    std::is_same_v<typename L::template Elem<kGrad>, bf16> &&
    std::is_same_v<typename L::template Elem<kState0>, bf16> &&
    (std::is_void_v<typename L::Copy> || (L::kKahan && std::is_same_v<typename L::Copy, bf16>));
template <class Rule, class L, class V>
FO_INLINE void load_pair_at(void* const* ptr, const Io<V>& io, int64_t i, V (&x0)[kMaxSlots],
                            V (&x1)[kMaxSlots]) {
  each_slot([&](auto s) {
    if constexpr ((Rule::kReads & bit(s)) != 0) {
      vload_bf16_pair(elem_ptr<L, s>(ptr) + i, x0[s], x1[s]);
      if constexpr (s == kGrad) {
        x0[s] = x0[s] * io.grad_scale_inv;
        x1[s] = x1[s] * io.grad_scale_inv;
      }
      if constexpr (s == kParam && L::kKahan) {
        V c0, c1;
        vload_bf16_pair(static_cast<const bf16*>(io.copy) + i, c0, c1);
        x0[s] = x0[s] + c0;
        x1[s] = x1[s] + c1;
      }
    }
  });
}
// kNative (avx512bf16, without stochastic rounding, DAZ clear): every store rounds to nearest
// with vcvtne2ps2bf16 (Note [paired native bf16 stores]); the compensated param's rounded
// value is then read back from the line just written, as store_groups_at does.
template <class Rule, class L, class V, bool kNative>
FO_INLINE void store_pair_at(void* const* ptr, const Io<V>& io, int64_t i, const V (&x0)[kMaxSlots],
                             const V (&x1)[kMaxSlots]) {
  using I = IntOf<V>;
  const auto store_nearest = [](bf16* dst, V a, V b) {
#if defined(__AVX512BF16__)
    if constexpr (kNative && std::is_same_v<V, F32x16>) {
      store_bf16_pair_native(dst, a, b);
      return;
    }
#endif
    I ra, rb;
    bf16_round_lanes2(a, b, ra, rb);
    vstore_bf16_pair<V>(dst, ra, rb);
  };
  each_slot([&](auto s) {
    if constexpr ((Rule::kWrites & bit(s)) != 0) {
      bf16* dst = elem_ptr<L, s>(ptr) + i;
      if constexpr (s == kParam && L::kKahan && kNative) {
        // p' = bf16(x) and compensation' = bf16(x - p'), p' read back from dst
        store_nearest(dst, x0[s], x1[s]);
        V p0, p1;
        vload_bf16_pair(dst, p0, p1);
        store_nearest(static_cast<bf16*>(io.copy) + i, x0[s] - p0, x1[s] - p1);
      } else if constexpr (s == kParam && L::kKahan) {
        // the same, p' from the rounded bits rather than from memory: the same value
        I r0, r1, c0, c1;
        bf16_round_lanes2(x0[s], x1[s], r0, r1);
        vstore_bf16_pair<V>(dst, r0, r1);
        const I hi = isplat<V>(0xFFFF0000u);
        bf16_round_lanes2(x0[s] - vfloat<V>(r0 & hi), x1[s] - vfloat<V>(r1 & hi), c0, c1);
        vstore_bf16_pair<V>(static_cast<bf16*>(io.copy) + i, c0, c1);
      } else {
        // params stochastically rounded when io.sr (as store_param), all else to nearest
        if constexpr (s == kParam && !kNative) {
          if (io.sr) {
            const uint64_t at = io.base + static_cast<uint64_t>(i);
            vstore_bf16_pair<V>(dst, SrStore<V>::template bits<2>(x0[s], io.sr_key, at),
                                SrStore<V>::template bits<2>(x1[s], io.sr_key, at + 1));
            return;
          }
        }
        store_nearest(dst, x0[s], x1[s]);
      }
    }
  });
}
template <class Rule, class L, class V>
FO_INLINE void apply_at(void* const* ptr, const Io<V>& io, int64_t i,
                        const typename Rule::template Consts<V>& c) {
  V x[1][kMaxSlots];
  load_groups_at<Rule, L, V, 1>(ptr, io, i, x);
  Rule::template apply<V>(x[0], c);
  store_groups_at<Rule, L, V, 1>(ptr, io, i, x);
}

// Note [loads before stores]
// The 2x unrolled vector body loads both lane groups before it updates and stores either
// (it used to run load, update, store for one group, then the next). Why: all-fp16 AdamW 2^26
// at 1 thread (Zen 5) ran 36-46 ms, twice its 18-24 ms, when the four arrays sat at one page
// offset and the loop started on a 64-byte boundary (32 bytes off it was fast). With the
// loads first that case measured 19-24 ms in every run (four, alternating with the old
// module). The cause is NOT established: a hypothesis was that the second group's loads wait
// on the first group's stores to other arrays whose addresses agree in the low 12 bits (4K
// aliasing), but a build that kept the old order and only fixed the prefetch (Note [software
// prefetch]) was fast in two runs of three and slow in the third, so the generated code, not
// the order alone, decides. Kept because it was never slower, and it leaves the compiler free
// to schedule both groups (it cannot hoist loads above stores itself: as far as it knows the
// arrays may alias; the bindings refuse overlapping arrays, so they do not).
// Note [slot-major order]
// Within the body, each slot's two lane groups are loaded back to back (p0 p1 g0 g1 m0 m1 v0
// v1), and stored so (p0 p1 m0 m1 v0 v1); they used to go group by group (p0 g0 m0 v0 p1 ...).
// Why: arrays whose distance aliases in the L1 data cache evict one another's lines. On a
// 2-vCPU Zen 4 (AVX-512 BF16) AdamW at 2^26 on slices of one buffer, 1 thread: all-bf16 44.5
// ms with the arrays 2^27 + 4 KiB apart (the distance separate allocations get), 29.2 ms at
// 2^27 + 64 KiB, 54 ms at exactly 2^27, 126 ms at 2^28 (all four streams alias); fp32 is hit
// the same at its own aliasing distances (2^28 + 2^27 + 4 KiB: 44.3 ms against 32.0; 2^28 or
// 2^29: 85 ms), so it is the distance, not the format. Which distances alias fits the
// linear-address way predictor ("utag") that Lipp et al. ("Take A Way", 2020) reverse-
// engineered on Zen: a hash of address bits 12-27 that folds bit 12 with 27, 13 with 26, 14
// with 25, 15 with 20, ..., 19 with 24; two lines of one set with equal hashes cannot both stay
// in L1. Measured: 2^28 + 2^13 or + 2^12 apart, 30 ms; 2^28 + 2^20 + 2^15, 51 ms; 2^28 + 2^26 +
// 2^13, 36 ms; 2^28 + 2^26 + 2^12, 37 ms (the first and fourth arrays alias: 12, 13, 26, 27). A line evicted between the two
// half-line touches of a 16-bit stream must come back; slot-major order makes the touches of
// one line adjacent. Effect, two alternating runs each (ms, 1 | 2 threads, + 4 KiB apart):
// all-bf16 44.7-45.0 -> 39.9-40.0 | 23.7-26.9 -> 21.5-21.6, all-fp16 44.6-44.7 -> 38.9-39.7 |
// 25.1-29.4 -> 21.5-21.8; at + 64 KiB and for fp32 within the noise. Not recovered: the rest of
// the aliasing cost (40 against 29 ms). A stand-alone loop also tried one 64-byte load and one
// vcvtne2ps2bf16 store per line (12% slower than slot-major), a software prefetch of every
// stream to L1 or L2 at 512 or 2,048 elements (up to 12%: the prefetched lines alias too), and
// staging 256- or 1,024-element blocks of each stream through an L1 buffer (no better at + 4
// KiB, 1.4-2.4x slower where nothing aliases).
// Tried and not kept (Zen 3, AVX2, all-bf16 AdamW): a software-pipelined body, the next pair's
// loads and update issued before this pair's stores, so that the square root and division of
// one pair overlap the other's rounding. A stand-alone loop gained 6% in cache; here the
// carried registers spilled (16 ymm registers) and plain all-bf16 ran 0.70 -> 0.74-0.78
// ns/element in cache and 1.02-1.11x the time at 2^26; only Kahan gained (0.99 -> 0.89-0.92,
// 0.95-0.98x at 2^26).
// The 2x unrolled vector body from element i while two lane groups fit; returns where it
// stopped. kPaired: Note [paired bf16 lanes] (vec.h); kNative: store_pair_at.
template <bool kPaired, bool kNative, class Rule, class L, class V>
FO_INLINE int64_t run_body(void* const* ptr, int64_t i, int64_t n,
                           const typename Rule::template Consts<V>& cv, const Io<V>& iov,
                           int64_t ahead) {
  constexpr int kW = VecTraits<V>::kWidth;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    // Note [software prefetch]: a plain loop over the slots, never a lambda.
    if (ahead > 0) {
      for (int s = 0; s < kMaxSlots; ++s)
        if ((Rule::kReads & bit(s)) != 0) prefetch_at(ptr[s], i + ahead, slot_bytes<L>(s));
      if constexpr (L::kKahan) prefetch_at(iov.copy, i + ahead, sizeof(typename L::Copy));
    }
    // Note [loads before stores]: both lane groups' loads, then both updates and stores;
    // Note [slot-major order]: a slot's two groups back to back.
    V x[2][kMaxSlots];
    if constexpr (kPaired) {
      load_pair_at<Rule, L, V>(ptr, iov, i, x[0], x[1]);
    } else {
      load_groups_at<Rule, L, V, 2>(ptr, iov, i, x);
    }
    Rule::template apply<V>(x[0], cv);
    Rule::template apply<V>(x[1], cv);
    if constexpr (kPaired) {
      store_pair_at<Rule, L, V, kNative>(ptr, iov, i, x[0], x[1]);
    } else {
      store_groups_at<Rule, L, V, 2>(ptr, iov, i, x);
    }
  }
  return i;
}

template <class Rule, class L>
FO_INLINE void run_span(void* const* ptr, int64_t i, int64_t n,
                        const typename Rule::template Consts<typename IsaVec<typename L::Compute>::type>& cv,
                        const typename Rule::template Consts<typename L::Compute>& cs,
                        const Io<typename IsaVec<typename L::Compute>::type>& iov,
                        const Io<typename L::Compute>& ios, int64_t ahead) {
  using T = typename L::Compute;
  using V = typename IsaVec<T>::type;
  using P = typename L::template Elem<kParam>;
  constexpr int kW = VecTraits<V>::kWidth;
  if constexpr (kW > 1) {
    // Align the param stream to its vector size (its element size times the lane count; two
    // vectors' worth where the body may load a pair as one vector of 32-bit lanes).
    constexpr uintptr_t kAlign = (kPairedBf16<L> ? 2 : 1) * kW * sizeof(P);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(elem_ptr<L, kParam>(ptr) + i);
    int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(P));
    head = min64(head, n - i);
    for (; head > 0; --head, ++i) apply_at<Rule, L, T>(ptr, ios, i, cs);
    if constexpr (kPairedBf16<L>) {
      // Note [paired bf16 lanes] (vec.h); vcvtne2ps2bf16 stores where the ISA has them, nothing
      // rounds stochastically and DAZ is clear (Note [paired native bf16 stores])
#if defined(__AVX512BF16__)
      i = !iov.sr && daz_clear() ? run_body<true, true, Rule, L, V>(ptr, i, n, cv, iov, ahead)
                                 : run_body<true, false, Rule, L, V>(ptr, i, n, cv, iov, ahead);
#else
      i = run_body<true, false, Rule, L, V>(ptr, i, n, cv, iov, ahead);
#endif
    } else {
      i = run_body<false, false, Rule, L, V>(ptr, i, n, cv, iov, ahead);
    }
    for (; i + kW <= n; i += kW) apply_at<Rule, L, V>(ptr, iov, i, cv);
  }
  for (; i < n; ++i) apply_at<Rule, L, T>(ptr, ios, i, cs);
}

// Process the global element range [begin, end) of a batch.
template <class Rule, class L, class Args>
void run_range(const Batch& b, int64_t begin, int64_t end, const Args& a) {
  using T = typename L::Compute;
  using V = typename IsaVec<T>::type;
  const typename Rule::template Consts<V> cv(a);
  const typename Rule::template Consts<T> cs(a);
  const T inv = static_cast<T>(std::is_same_v<T, float> ? b.grad_scale_inv_f : b.grad_scale_inv_d);
  const int64_t* off = b.offsets;
  int64_t t = tensor_of(off, b.n_tensors, begin);
  for (; t < b.n_tensors && off[t] < end; ++t) {
    const int64_t lo = max64(begin, off[t]) - off[t];
    const int64_t hi = min64(end, off[t + 1]) - off[t];
    void* ptr[kMaxSlots];
    for (int s = 0; s < kMaxSlots; ++s) ptr[s] = b.slots[s] ? b.slots[s][t] : nullptr;
    void* copy = b.copies ? b.copies[t] : nullptr;
    const uint64_t base = b.sr_index0 + static_cast<uint64_t>(off[t]);
    const Io<V> iov{splat<V>(inv), copy, base, b.sr_key, b.sr};
    const Io<T> ios{inv, copy, base, b.sr_key, b.sr};
    run_span<Rule, L>(ptr, lo, hi, cv, cs, iov, ios, b.prefetch_ahead);
  }
}

}  // namespace
}  // namespace fastoptim
#include "quant.h"  // the quantized-state formats' block driver (quant_entry)
namespace fastoptim {
namespace {

// Note [deterministic norm]
// global_norm's sum of squares must not depend on the thread count or the ISA. Each tensor is
// cut into blocks of kNormBlock elements (kernel_api.h); a block is summed by one thread, in
// fp64, into 16 accumulators, element i of the tensor into accumulator i % 16 in index order
// (the square of an fp32 value is exact in fp64, so only the additions round, always in the
// same order), and the 16 are added in a fixed tree. The caller adds the blocks' sums in block
// order. The vector ISAs only widen 16 elements at a time into a buffer; the fp64 loop is the
// same text in every translation unit.

// Adds the squares of g[0..16) to acc[0..16) (fp64; element j into accumulator j).
template <class E> FO_INLINE void add_squares16(const E* g, double* acc) {
  if constexpr (std::is_same_v<E, double>) {
    for (int j = 0; j < 16; ++j) acc[j] += g[j] * g[j];
  } else {
    using V = FO_VEC_F32;
    constexpr int kW = VecTraits<V>::kWidth;
    static_assert(16 % kW == 0, "a group of 16 is whole vectors");
    float buf[16];
    for (int j = 0; j < 16; j += kW) vstore(buf + j, vload_from<V>(g + j));
    for (int j = 0; j < 16; ++j) {
      const double d = buf[j];
      acc[j] += d * d;
    }
  }
}

template <class E>
void sumsq_blocks(const Batch& b, const int64_t* boff, int64_t k0, int64_t k1, double* partial) {
  using T = std::conditional_t<std::is_same_v<E, double>, double, float>;
  int64_t t = tensor_of(boff, b.n_tensors, k0);
  for (int64_t k = k0; k < k1; ++k) {
    while (boff[t + 1] <= k) ++t;
    const auto* g = static_cast<const E*>(b.slots[0][t]);
    const int64_t n = b.offsets[t + 1] - b.offsets[t];
    int64_t i = (k - boff[t]) * kNormBlock;
    const int64_t hi = min64(n, i + kNormBlock);
    double acc[16] = {};
    for (; i + 16 <= hi; i += 16) add_squares16(g + i, acc);
    for (; i < hi; ++i) {
      const double d = vload_from<T>(g + i);
      acc[i & 15] += d * d;
    }
    for (int w = 8; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) acc[j] = acc[j] + acc[j + w];
    partial[k] = acc[0];
  }
}

// torch.amp's unscale: every element is checked (non-finite before scaling) and multiplied by
// `scale` in the compute type (fp32; fp64 for float64), stored back rounded to nearest even.
template <class E>
bool unscale_range(const Batch& b, int64_t begin, int64_t end, double scale) {
  using T = std::conditional_t<std::is_same_v<E, double>, double, float>;
  using V = typename IsaVec<T>::type;
  constexpr int kW = VecTraits<V>::kWidth;
  const V sv = splat<V>(static_cast<T>(scale));
  const V zero = splat<V>(T(0));
  V bad = zero;    // x*0 is NaN exactly for inf and NaN; the sum keeps any NaN
  T bad_s = T(0);
  const int64_t* off = b.offsets;
  for (int64_t t = tensor_of(off, b.n_tensors, begin); t < b.n_tensors && off[t] < end; ++t) {
    auto* g = static_cast<E*>(b.slots[0][t]);
    const int64_t hi = min64(end, off[t + 1]) - off[t];
    int64_t i = max64(begin, off[t]) - off[t];
    for (; i + kW <= hi; i += kW) {
      const V x = vload_from<V>(g + i);
      bad = bad + x * zero;
      vstore_to(g + i, x * sv);
    }
    for (; i < hi; ++i) {
      const T x = vload_from<T>(g + i);
      bad_s = bad_s + x * T(0);
      vstore_to(g + i, x * static_cast<T>(scale));
    }
  }
  T lanes[kW];
  vstore(lanes, bad);
  bool found = bad_s != bad_s;
  for (int j = 0; j < kW; ++j) found = found || lanes[j] != lanes[j];
  return found;
}

// One entry per (rule, format): the call's variant -> its instantiation (rule_api.h).
template <class D, Format F>
void entry(const Batch& b, int64_t lo, int64_t hi, const void* p, unsigned mask) {
  if constexpr (QuantOf<F>::kBits != 0) {
    quant_entry<D, F>(b, lo, hi, p, mask);
  } else {
    const auto& a = *static_cast<const typename D::Args*>(p);
    dispatch_mask<D>(mask, [&](auto tag) {
      run_range<typename decltype(tag)::type, typename LayoutOf<F>::type>(b, lo, hi, a);
    });
  }
}

// Note [ISA shards]
// One ISA's kernels are compiled in kIsaShards translation units (CMakeLists.txt generates
// one file per shard that defines FO_ISA_SHARD and includes isa_<name>.cpp): shard s fills
// the table entries of the formats F with F % kIsaShards == s, which spreads the heavy formats
// (quantized, compensated, stochastic rounding) over the shards, and shard 0 also fills the
// non-rule entries. Each shard is a complete copy of this file in its own anonymous namespace
// (Note [one definition per ISA]); the shards write disjoint entries of the same table.
//
// FO_FORMAT_FILTER(F): whether this ISA fills format F at all (isa_avx512bf16.cpp fills only
// the formats that store bfloat16, stores_bf16 below; dispatch.cpp takes the rest from the
// avx512 table).
//
// Whether format F stores bfloat16: its params, states, param copies or compensation
// (Layout), or the params of a quantized format (QuantOf). Gradients are only read.
template <Format F> constexpr bool stores_bf16() {
  if constexpr (QuantOf<F>::kBits != 0) {
    return std::is_same_v<typename QuantOf<F>::Param, bf16>;
  } else {
    using L = typename LayoutOf<F>::type;
    return std::is_same_v<typename L::template Elem<kParam>, bf16> ||
           std::is_same_v<typename L::template Elem<kState0>, bf16> ||
           std::is_same_v<typename L::Copy, bf16>;
  }
}
#if !defined(FO_FORMAT_FILTER)
#define FO_FORMAT_FILTER(F) true
#endif
template <class D, int F> void fill_one(KernelTable* t) {
  if constexpr (F % kIsaShards == FO_ISA_SHARD && FO_FORMAT_FILTER(static_cast<Format>(F)))
    t->fn[RuleIdOf<D>::value][F] = &entry<D, static_cast<Format>(F)>;
}
template <class D, int... Fs> void fill_rule(KernelTable* t, std::integer_sequence<int, Fs...>) {
  (fill_one<D, Fs>(t), ...);
}

// Test hook of the storage conversions (vec.h, Note [storage formats]): n elements fp32 -> E
// (kWiden false) or E -> fp32, split as run_span splits a span: scalar head until src is
// vector-aligned, whole vectors, scalar tail.
template <class SrcT, class At> void split_span(const SrcT* src, int64_t n, At at) {
  using V = FO_VEC_F32;
  constexpr int64_t kW = VecTraits<V>::kWidth;
  constexpr uintptr_t kAlign = kW * sizeof(SrcT);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(src);
  const int64_t head =
      min64(n, static_cast<int64_t>((kAlign - addr % kAlign) % kAlign / sizeof(SrcT)));
  int64_t i = 0;
  for (; i < head; ++i) at(float{}, i);
  for (; i + kW <= n; i += kW) at(V{}, i);
  for (; i < n; ++i) at(float{}, i);
}
template <class E, bool kWiden>
void convert_span(const void* src, void* dst, int64_t n) {
  if constexpr (kWiden) {
    split_span(static_cast<const E*>(src), n, [&](auto lane, int64_t i) {
      vstore(static_cast<float*>(dst) + i, vload_from<decltype(lane)>(static_cast<const E*>(src) + i));
    });
  } else {
    split_span(static_cast<const float*>(src), n, [&](auto lane, int64_t i) {
      store_elem(static_cast<E*>(dst) + i, vload<decltype(lane)>(static_cast<const float*>(src) + i));
    });
  }
}
void convert_sr_span(const float* src, void* dst, int64_t n, uint32_t key, uint64_t index0) {
  split_span(src, n, [&](auto lane, int64_t i) {
    vstore_sr(static_cast<bf16*>(dst) + i, vload<decltype(lane)>(src + i), key,
              index0 + static_cast<uint64_t>(i));
  });
}

// Note [byte ceiling] (kernel_api.h). The streams are walked one after the other in runs of
// s.run blocks (s.run x 128 elements of a stream, then the same elements of the next stream),
// 64 bytes at a time, with a software prefetch of each stream s.prefetch_ahead elements ahead
// (0: none). Which shape the memory system likes best depends on the streams and on where
// they sit (Note [slot-major order]), so the benchmarks time more than one and take the
// fastest. GCC's generic vectors: one zmm on AVX-512, two ymm on AVX2, four xmm on the scalar
// ISA's SSE2.
void stream_bytes_range(const ByteStreams& s, int64_t begin, int64_t end) {
  typedef uint32_t U __attribute__((vector_size(64)));
  U zero = {};
  zero += s.zero;
  U acc = {};
  for (int64_t blk = begin; blk < end; blk += s.run) {
    const int64_t blocks = min64(s.run, end - blk);
    for (int j = 0; j < s.n; ++j) {
      const int64_t first = blk * s.block_bytes[j], bytes = blocks * s.block_bytes[j];
      uint8_t* p = s.base[j] + first;
      if (s.prefetch_ahead > 0) {
        const int64_t ahead = s.prefetch_ahead * s.block_bytes[j] / kByteBlock;
        for (int64_t k = 0; k < bytes; k += 64) prefetch_at(s.base[j], first + k + ahead, 1);
      }
      if (!s.write[j]) {
        for (int64_t k = 0; k < bytes; k += 64) {
          U x;
          __builtin_memcpy(&x, p + k, 64);
          acc |= x;
        }
      } else if (s.read[j]) {
        for (int64_t k = 0; k < bytes; k += 64) {
          U x;
          __builtin_memcpy(&x, p + k, 64);
          x += zero;  // zero is 0 at run time: the values stay as they were
          __builtin_memcpy(p + k, &x, 64);
        }
      } else {
        for (int64_t k = 0; k < bytes; k += 64) __builtin_memcpy(p + k, &zero, 64);
      }
    }
  }
  // the read-only streams' bits reach memory, so their loads stay (0 at run time as well)
  acc &= zero;
  uint32_t bits = 0;
  for (int k = 0; k < 16; ++k) bits |= acc[k];
  __atomic_fetch_or(s.sink, bits, __ATOMIC_RELAXED);
}

}  // namespace

#define FO_SHARD_NAME_(table, shard) table##_shard##shard
#define FO_SHARD_NAME(table, shard) FO_SHARD_NAME_(table, shard)
void FO_SHARD_NAME(FO_FILL_TABLE, FO_ISA_SHARD)(KernelTable* t) {
#define FO_FILL(D) fill_rule<D>(t, std::make_integer_sequence<int, kNumFormats>{});
  FO_RULES(FO_FILL)
#undef FO_FILL
  if (FO_ISA_SHARD != 0) return;
  t->stream_bytes = &stream_bytes_range;
  t->convert[kStorageBF16][0] = &convert_span<bf16, false>;
  t->convert[kStorageBF16][1] = &convert_span<bf16, true>;
  t->convert[kStorageF16][0] = &convert_span<f16, false>;
  t->convert[kStorageF16][1] = &convert_span<f16, true>;
  t->convert_sr = &convert_sr_span;
  t->sumsq[kGradF32] = &sumsq_blocks<float>;
  t->sumsq[kGradF64] = &sumsq_blocks<double>;
  t->sumsq[kGradBF16] = &sumsq_blocks<bf16>;
  t->sumsq[kGradF16] = &sumsq_blocks<f16>;
  t->unscale[kGradF32] = &unscale_range<float>;
  t->unscale[kGradF64] = &unscale_range<double>;
  t->unscale[kGradBF16] = &unscale_range<bf16>;
  t->unscale[kGradF16] = &unscale_range<f16>;
}

}  // namespace fastoptim
