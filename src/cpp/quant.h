// quant.h: the CPU driver of the quantized-state formats kF32Q8, kF32Q4, kBF16Q8 and kBF16Q4
// (quant_api.h, Note [quantized states]). Part of kernels.h, which includes it between its helpers and its
// table (same anonymous namespace, Note [one definition per ISA]); not a header of its own.
//
// Note [quantized block driver]
// The unit of work is a block of one tensor: its params and grads stay where they are, its
// states are dequantized into an fp32 buffer on the stack (kMaxStates x 256 floats, in L1),
// the rule runs over the block exactly as over fp32 arrays (the same Rule<M>::apply, vector
// body and scalar tail), and each written state is requantized from the buffer with the new
// absmax of the block. A kernel call over the global range [begin, end) updates the blocks
// whose FIRST element lies in that range: the dispatcher's chunks (dispatch.cpp) then hand
// every block to exactly one thread whatever the chunk size and thread count, with no change
// to the split itself; a chunk may run up to one block past its end. Each block's result
// depends on that block alone, so any split gives the same bits.
#pragma once

#include <limits>
#include <type_traits>

#include "kernel_api.h"
#include "quant_api.h"

namespace fastoptim {
namespace {

// A quantized format's code bits (kBits; 0: not quantized) and the storage of its params and
// grads (Param: float or bf16; loaded with vload_from, stored with store_param: kernels.h),
// one specialization per format.
template <Format F> struct QuantOf { static constexpr int kBits = 0; };
template <int kBits_, class Param_> struct QuantFormat {
  static constexpr int kBits = kBits_;
  using Param = Param_;
};
template <> struct QuantOf<kF32Q8> : QuantFormat<8, float> {};
template <> struct QuantOf<kF32Q4> : QuantFormat<4, float> {};
template <> struct QuantOf<kBF16Q8> : QuantFormat<8, bf16> {};
template <> struct QuantOf<kBF16Q4> : QuantFormat<4, bf16> {};

template <class D, class = void> struct HasStates : std::false_type {};
template <class D>
struct HasStates<D, std::void_t<decltype(D::kStates)>>
    : std::bool_constant<(D::kStates.size() > 0)> {};

// Whether state slot kSlot of rule D is declared non-negative (rules.h).
template <class D, int kSlot> constexpr bool slot_non_negative() {
  if constexpr (kSlot >= kState0 && kSlot - kState0 < static_cast<int>(D::kStates.size()))
    return D::kStates[kSlot - kState0].non_negative;
  return false;
}

// What QuantMap::load needs of a block (QuantMap::block_scale): its absmax in every lane, or
// the values of its codes, looked up (Note [int4 codes by lookup]): t[0] for codes 0-15 in one
// 16-lane table (AVX-512), or t[0] for codes 0-7 and t[1] for codes 8-15 (AVX2).
template <class V> struct BlockScale { V t[kLookup8x2<V> ? 2 : 1]; };

// The map of Note [quantized states] for one kind of state: a code is a small float of
// |x| / absmax with kF mantissa bits, its bit pattern offset by kBias so that the top code is
// 1.0 (non-negative states: every code; signed: a sign bit and the magnitudes 1..K, 0 = zero).
// load (decode) and encode are written once over the lane type V (float, F32x8, F32x16) in the
// integer vocabulary of vec.h (Note [integer lanes]): every step is an exact integer op or
// one IEEE fp32 multiplication, so every lane type gives the same bits (Note [quantized
// codes in registers]).
template <int kBits, bool kNonNegative> struct QuantMap {
  static constexpr int kF = kBits == 8 ? 3 : 0;          // mantissa bits
  static constexpr int kShift = 23 - kF;                  // fp32 mantissa bits dropped
  static constexpr uint32_t kTop = kNonNegative ? (1u << kBits) - 1u : (1u << (kBits - 1)) - 1u;
  static constexpr uint32_t kSign = kNonNegative ? 0u : 1u << (kBits - 1);
  static constexpr int32_t kBias = (127 << kF) - static_cast<int32_t>(kTop);  // code kTop = 1.0
  static constexpr uint32_t kOne = 0x3F800000u;           // 1.0f: encodes to kTop
  // (1 << (kShift - 1)) - (kBias << kShift), as uint32: half an ulp of the kept mantissa (ties
  // round up), minus the offset
  static constexpr uint32_t kRound = (1u << (kShift - 1)) - (static_cast<uint32_t>(kBias) << kShift);

  // Whether codes are decoded by a lookup in a table of the block's values (Note [int4 codes
  // by lookup]): int4 states on AVX-512, and signed int4 states on AVX2.
  template <class V>
  static constexpr bool kLookup = kBits == 4 && (kLookup16<V> || (kLookup8x2<V> && !kNonNegative));

  // What load needs of a block whose absmax is `absmax`: that absmax in every lane, or where
  // kLookup<V>, the block's values: lane k of the table(s) holds code k's (on AVX2 code 8 +
  // k's in t[1]), decoded by values() below.
  template <class V> static FO_INLINE BlockScale<V> block_scale(float absmax) {
    const V a = splat<V>(absmax);
    if constexpr (kLookup<V> && kLookup8x2<V>) {
      return {{values<V>(viota<V>(), a), values<V>(viota<V>() + isplat<V>(8u), a)}};
    } else if constexpr (kLookup<V>) {
      return {{values<V>(viota<V>(), a)}};
    } else {
      return {{a}};
    }
  }

  // The values of elements [i, i + width of V) of a block whose codes start at c, given
  // block_scale<V>(absmax).
  template <class V> static FO_INLINE V load(const uint8_t* c, int64_t i, const BlockScale<V>& scale) {
    if constexpr (kLookup<V> && kLookup8x2<V>) {
      // Note [int4 codes by lookup]: the nibble's low 3 bits index both tables, its top bit
      // (at bit 31 of vload_u4_top) picks one
      return vlookup8x2(vload_u4_low<V>(c + i / 2), vload_u4_top<V>(c + i / 2), scale.t[0], scale.t[1]);
    } else if constexpr (kLookup<V>) {
      return vlookup16(vload_u4_low<V>(c + i / 2), scale.t[0]);  // Note [int4 codes by lookup]
    } else if constexpr (!kNonNegative && kBits == 8) {
      // vload_s8 sign-extends the byte as it loads (see signed_values)
      return signed_values(vshl<kShift>(vload_s8<V>(c + i)), scale.t[0]);
    } else if constexpr (!kNonNegative && VecTraits<V>::kWidth > 1) {
      // the nibble moved to the top (the bits below it fall below kShift, where
      // signed_values' mask drops them) and shifted back arithmetically
      return signed_values(vsra<32 - kBits - kShift>(vload_u4_top<V>(c + i / 2)), scale.t[0]);
    } else {
      return values<V>(load_codes<V>(c, i), scale.t[0]);
    }
  }

  // The values of codes k (each lane's code in its low kBits, zero above) of a block.
  template <class V> static FO_INLINE V values(IntOf<V> k, V absmax) {
    if constexpr (kNonNegative) {
      return vfloat<V>(vshl<kShift>(k + isplat<V>(kBias))) * absmax;
    } else {
      return signed_values(vsra<32 - kBits - kShift>(vshl<32 - kBits>(k)), absmax);
    }
  }

  // The values of signed codes from t: the code sign-extended (its top bit copied upwards)
  // and shifted left by kShift, so the magnitude k sits where the fp32 mantissa's top bits go
  // and the sign fills bits kShift + kBits - 1 to 31.
  template <class V> static FO_INLINE V signed_values(IntOf<V> t, V absmax) {
    using I = IntOf<V>;
    constexpr uint32_t kMag = kTop << kShift;
    // the sign at bit 31 and k + kBias above the mantissa bits dropped: (k + kBias) << kShift
    // < 2^30, so the addition cannot carry into the sign
    const I u = (t & isplat<V>(0x80000000u | kMag)) + isplat<V>(static_cast<uint32_t>(kBias) << kShift);
    // k = 0 is +0 whatever the sign and the absmax (a NaN block's absmax is NaN: the mask, not
    // the multiplication, gives the +0)
    return vzero_unless(t, isplat<V>(kMag), vfloat<V>(u) * absmax);
  }

  // Values -> codes, given inv = 1 / absmax (0 when absmax is 0): |x| * inv rounded to kF
  // mantissa bits, ties away from zero (up, on the magnitude), on its bit pattern u, then offset
  // and clamped. u is first clamped (unsigned) to 1.0's pattern: a larger u, a NaN's included,
  // rounds to at least kTop and is clamped to kTop anyway; then (u + 2^(kShift-1)) >> kShift -
  // kBias is one add and one arithmetic shift of a non-negative-or-small int32 (floor division:
  // exact). Ties go up rather than to even: the even rule's low-bit term cost three of the
  // encode's integer ops (Note [quantized rounding ties]).
  // kClamp = false skips the clamp where inv is finite (>= 0 and below inf): |x| <= absmax then
  // gives |x| * inv <= 1 + 2^-22 (inv = 1 / absmax rounded, subnormal when absmax >= 2^126),
  // far below the 1 + 2^-(kF+1) that would round past kTop; only a block whose 1 / absmax
  // overflows (absmax <= 2^-128) meets a larger u.
  // A non-negative state's x is passed as |x| already (quant_store stores it so).
  template <class V, bool kClamp = true> static FO_INLINE IntOf<V> encode(V x, V inv) {
    using I = IntOf<V>;
    if constexpr (!kNonNegative && !kClamp) {
      // Note [signed encode from the signed product]
      static_assert(static_cast<int32_t>(kRound) > -(1 << 30), "2 (u + kRound) fits in int32");
      const I b = vbits(x * inv);
      const I r = vsra<kShift + 1>(vshl<1>(b) + isplat<V>(kRound << 1));
      return vpositive_or(r, vshr<32 - kBits>(b), isplat<V>(kSign));
    }
    const I b = vbits((kNonNegative ? x : vabs(x)) * inv);
    I u = b;
    if constexpr (kClamp) u = vmin_u32(b, isplat<V>(kOne));
    const I r = vsra<kShift>(u + isplat<V>(kRound));
    const I k = vmax_i32(r, isplat<V>(0));  // r <= kTop already
    if constexpr (kNonNegative) {
      return k;
    } else {
      // the sign where x < 0 and the magnitude is not zero (zero has one code)
      return vselect(vlt(x, splat<V>(0.0f)) & vgt_i32(k, isplat<V>(0)), k | isplat<V>(kSign), k);
    }
  }

  // Note [signed encode from the signed product]
  // Where inv is finite (kClamp = false), a signed state's code is computed from the bits b of
  // x * inv, sign included, in fewer operations than the general form above (on AVX-512, 9
  // per vector with the load, narrowing and store, against 12: the abs, the reload of x and
  // its compare, the max, the second compare and the blend go): b << 1 is |x * inv|'s pattern
  // u shifted up one (u < 2^31), and with T = u + kRound as int32, which lies in [-2^30, 2^30)
  // (u <= 1.0's pattern plus 2 ulps; kRound's int32 value is above -2^30 for both maps:
  // -931,659,776 at 8 bits, -1,002,438,656 at 4), (b << 1) + (kRound << 1) is exactly 2T, so
  // an arithmetic shift by kShift + 1 gives the r of the general form (r <= kTop since inv is
  // finite). vpositive_or then returns r with the sign bit of b moved to the code's sign where
  // r > 0, and 0 (the one zero code) where r <= 0, for the general form's max(r, 0) and its
  // sign test; r > 0 means x * inv is not +-0, so b's sign is that of x (inv > 0; inv = 0 puts
  // every r below 1). The general form stays where inv may be infinite: there 0 * inf is a
  // NaN with its sign bit set, where x < 0 is false. In cache (bench_quant.py --in-cache, two
  // runs alternated with the build before, 3.2 GHz Zen 4; with an AVX-512 vload_u4_top of its
  // own, since replaced by Note [int4 codes by lookup]), ns/element: AVX2 int8 AdamW 0.769-0.774 -> 0.737-0.739, int4 0.900-0.914 ->
  // 0.861-0.883; AVX-512 int8 0.545-0.546 -> 0.546 (it trades an and, a compare, a max and a
  // blend for two shifts; a third run of the new build read 0.903 on both AVX-512 ISAs, an
  // outlier of that process), int4 0.697-0.710 -> 0.681-0.685.

  // The codes of elements [i, i + width of V) of a block whose codes start at c.
  template <class V> static FO_INLINE IntOf<V> load_codes(const uint8_t* c, int64_t i) {
    if constexpr (kBits == 8) {
      return vload_u8<V>(c + i);
    } else if constexpr (VecTraits<V>::kWidth == 1) {
      return (static_cast<uint32_t>(c[i >> 1]) >> ((i & 1) * 4)) & 15u;
    } else {
      return vload_u4<V>(c + i / 2);  // i is a multiple of the (even) width
    }
  }

  // Block `blk`'s absmax from the bit pattern of its max |x| (as found by quant_lanes: >=
  // 0x7F800000 when any value is not finite). Returns 1 / absmax (0 when absmax is 0; inf
  // when it overflows) for store_codes, or -1 when a value is not finite: the absmax is then
  // NaN and the block's n codes are written here, all 0.
  static FO_INLINE float store_absmax(const QuantStream& s, int64_t blk, int64_t n, uint32_t m_bits) {
    if (m_bits >= 0x7F800000u) {
      s.absmax[blk] = __builtin_nanf("");
      uint8_t* c = s.codes + quant_code_bytes(kBits, blk * quant_block(kBits));
      for (int64_t k = 0; k < quant_code_bytes(kBits, n); ++k) c[k] = 0;
      return -1.0f;
    }
    const float m = vfloat<float>(m_bits);
    s.absmax[blk] = m;
    return m > 0.0f ? 1.0f / m : 0.0f;
  }

  // The codes of in[i, i + kCodeGroup<V> x width of V) of a block whose codes start at c (i a
  // multiple of that; V is a vector: int4 lanes come in whole bytes).
  template <class V, bool kClamp = true>
  static FO_INLINE void store_codes(uint8_t* c, int64_t i, const float* in, V inv) {
    constexpr int kW = VecTraits<V>::kWidth, kG = kCodeGroup<V>;
    static_assert(kW > 1, "codes are stored from vectors");
    IntOf<V> k[kG];
    for (int j = 0; j < kG; ++j) k[j] = encode<V, kClamp>(vload<V>(in + i + j * kW), inv);
    if constexpr (kBits == 8) {
      vstore_u8s(c + i, k);
    } else {
      vstore_u4s(c + i / 2, k);
    }
  }

  // in[0, n) -> the codes of block `blk` of the stream, given inv as store_absmax returned it
  // (nothing to do for -1: that block's codes are written).
  template <class V = FO_VEC_F32>
  static FO_INLINE void store_block_codes(const QuantStream& s, int64_t blk, int64_t n,
                                          const float* in, float inv) {
    constexpr int kGW = VecTraits<V>::kWidth * kCodeGroup<V>;
    if (inv < 0.0f) return;
    uint8_t* c = s.codes + quant_code_bytes(kBits, blk * quant_block(kBits));
    int64_t i = 0;
    if constexpr (kGW > 1)
      for (; i + kGW <= n; i += kGW) store_codes<V>(c, i, in, splat<V>(inv));
    if constexpr (kBits == 8) {
      for (; i < n; ++i) vstore_u8(c + i, encode<float>(in[i], inv));
    } else {
      for (; i + 1 < n; i += 2)
        c[i / 2] = static_cast<uint8_t>(encode<float>(in[i], inv) | (encode<float>(in[i + 1], inv) << 4));
      if (i < n) c[i / 2] = static_cast<uint8_t>(encode<float>(in[i], inv));
    }
  }
};

// Note [quantized codes in registers]
// One lane group at element i of a block: params and grads from memory (widened from bf16 in
// the kBF16 formats; grads unscaled), each read state decoded from its codes straight into
// registers, the rule applied, params stored (store_param: rounded to nearest even, or
// stochastically with io.sr, element index io.base + i), and each
// written state stored to the block's fp32 buffer (its codes wait for the block's absmax;
// a non-negative state's map takes |x|, so |x| is what is stored). On
// the way, each written state's max |x| is accumulated per lane as an unsigned max of the bit
// patterns of |x|: for non-negative floats the bit patterns order as the values do, and an
// Inf or NaN pattern is above every finite one, so one integer max per vector gives both the
// block's absmax and whether the block is finite. Both are exact, so the order of lanes
// cannot change them.
//
// Note [int4 codes by lookup]
// An int4 state has 16 codes, and a block has one absmax, so a block has 16 values. Where a
// lookup in a 16-lane register is one operation (vec.h, kLookup16: AVX-512's vpermps), the
// driver decodes them once per block and state, lane k of QuantMap::block_scale holding code
// k's value (QuantMap::values of viota, the arithmetic decode, times the absmax: the same
// operations on the same operands, so the same bits, +0 for a signed zero code included), and
// each lane group's decode is a lookup: the nibbles widened to lanes (vload_u4_low: a
// widening load, a shift and an or) and one vpermps, where the arithmetic decode took, in
// place of the vpermps, an and, an add, a shift and a multiply (signed: a second shift, an
// arithmetic shift, an and, an add, a test and a masked multiply). AVX2 has no 16-lane lookup,
// but a lookup in two 8-lane tables (vec.h, kLookup8x2) is two vpermps indexed by the nibble's
// low 3 bits and a vblendvps on its top bit: with the broadcast word shifted down
// (vload_u4_low) and up (vload_u4_top), 5 operations per 8 elements where a signed code's
// arithmetic decode took 8 (the up shift, an arithmetic shift, two ands, an add, a compare,
// an andnot and a multiply). A non-negative state's arithmetic decode (the down shift, an and,
// an add, a shift and a multiply) is 5 operations too, and keeps it: by lookup its int4 AdamW
// measured 0.884-0.885 ns/element in cache against 0.849-0.867 with the signed state's lookup
// alone. The scalar ISA keeps the arithmetic. The table costs each block one vector of
// arithmetic decode per read state (two on AVX2), against the 8 (16) lane groups of a block of
// 128 that it saves 3 to 5 operations each. In cache (AdamW, 2^16 elements, 1 thread, min
// of 15 x 300 calls, two runs alternated with the build before, 3.2 GHz Zen 4), ns/element:
// int4 0.643-0.654 -> 0.567-0.579 (avx512 and avx512bf16), bf16 params with int4 0.759 ->
// 0.688-0.692 (avx512bf16) and 0.814-0.821 -> 0.733-0.735 (avx512); int8 unchanged (the same
// loop). At 2^26 (bench/ab_builds.py, new / old, 1 | 2 threads): int4 0.911 | 0.933, bf16
// params with int4 0.915 | 0.897.
//
// Note [rare bf16 stores after the block]
// On avx512bf16, bf16 params stored to nearest (no stochastic rounding) take vcvtneps2bf16
// without the per-vector check of store_bf16_native (kernels.h, Note [native bf16 stores]):
// quant_lanes also writes the fp32 params to the block's stack buffer and ORs the lanes the
// instruction gets wrong (subnormal or NaN) into `rare`, and a block with any such lane has
// its vector part stored again from the buffer, exactly, after its loop. The bits are those
// of store_param. Why: with the check's out-of-line call inside the loop, GCC rebuilt six
// integer constants every iteration (mov + vpbroadcastd from a general register: perf
// annotate), since a call clobbers every vector register, where the float32-params loop keeps
// all of its constants in registers; without the call it keeps them too. In cache
// (bench_quant.py --in-cache, five runs alternated with the build before this and the
// kSr split, 2.6 GHz Zen 4): bf16-params int8 AdamW on avx512bf16 0.76-0.77 -> 0.67-0.68
// ns/element (now below AVX-512's 0.71), int4 0.93-0.94 -> 0.82-0.84. The cost: one more
// 64-byte store per 16 params, to the stack buffer, in L1.
#if defined(__AVX512BF16__)
template <class P, class V, bool kSr>
constexpr bool kRareAfterBlock = std::is_same_v<P, bf16> && std::is_same_v<V, F32x16> && !kSr;
using RareLanes = __mmask16;
// The block's first n (whole vectors of) params stored again, exactly, from buf.
FO_INLINE void store_rare_block(bf16* p, const float* buf, int64_t n) {
  for (int64_t k = 0; k + 16 <= n; k += 16) store_bf16_rare(p + k, vload<F32x16>(buf + k));
}
#else
template <class P, class V, bool kSr> constexpr bool kRareAfterBlock = false;
using RareLanes = unsigned;
#endif

// Note [lane groups in flight]
// quant_lanes updates kU lane groups per call (i, i + W, ...): all their loads and decodes,
// then the rule on each, then all their stores, so that the second group's square root and
// division need not wait for the first group's stores to leave the scheduler. kLaneGroups<V>:
// two on AVX2, one elsewhere (on a Zen 4, AVX-512, a 2x unrolled int8 loop measured slower:
// 0.61 -> 0.64-0.67 ns/element in cache). On a 2.45 GHz Zen 3, AVX2, in cache
// (bench_quant.py --in-cache, three runs alternated with the build before): bf16 params
// with int8 states 1.41-1.42 -> 1.27-1.28 ns/element, with int4 1.62-1.64 -> 1.45-1.46, fp32
// params with int4 1.22-1.23 -> 1.17-1.19, with int8 0.98-1.00 -> 0.97-0.99 (unchanged);
// at 2^26 (bench/ab_builds.py, 1 / 2 threads, new / old): bf16p-int8 0.92 / 0.91, int4
// 0.96 / 0.94, int8 0.99 / 0.99.
template <class V> constexpr int kLaneGroups = 1;
#if defined(__AVX2__) && defined(__FMA__)
template <> constexpr int kLaneGroups<F32x8> = 2;
#endif

// The loads of one lane group at element k: params and grads from memory (grads unscaled),
// each read state decoded from its codes, given the block's QuantMap::block_scale.
template <class D, class Rule, int kBits, class V, class P>
FO_INLINE void quant_load(const P* p, const P* g, const uint8_t* const* codes, const BlockScale<V>* scale,
                          int64_t k, const Io<V>& io, V* x) {
  if constexpr ((Rule::kReads & bit(kParam)) != 0) x[kParam] = vload_from<V>(p + k);
  // the grads unscaled as they are loaded (kernel_api.h, Note [load/store options])
  if constexpr ((Rule::kReads & bit(kGrad)) != 0) x[kGrad] = vload_from<V>(g + k) * io.grad_scale_inv;
  each_slot([&](auto s) {
    if constexpr (s >= kState0 && (Rule::kReads & bit(s)) != 0) {
      using Map = QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>;
      x[s] = Map::template load<V>(codes[s], k, scale[s]);
    }
  });
}

// The stores of one updated lane group at element k: the param (unless kParamDone), each
// written state to the block's buffer and its max |x|.
template <class D, class Rule, int kBits, class V, bool kSr, bool kParamDone = false, class P>
FO_INLINE void quant_store(P* p, float (*st)[quant_block(kBits)], int64_t k, IntOf<V>* amax,
                           const Io<V>& io, float* pbuf, RareLanes& rare, const V* x) {
  if constexpr ((Rule::kWrites & bit(kParam)) != 0 && !kParamDone) {
    if constexpr (kRareAfterBlock<P, V, kSr>) {
      // Note [rare bf16 stores after the block]
      vstore(pbuf + k, x[kParam]);
      rare = rare | store_bf16_native_unchecked(p + k, x[kParam]);
    } else {
      store_param(p + k, x[kParam], io, k);
    }
  }
  each_slot([&](auto s) {
    if constexpr (s >= kState0 && (Rule::kWrites & bit(s)) != 0) {
      const V ax = vabs(x[s]);
      vstore(st[s - kState0] + k, slot_non_negative<D, decltype(s)::value>() ? ax : x[s]);
      amax[s] = vmax_u32(amax[s], vbits(ax));
    }
  });
}

template <class D, class Rule, int kBits, class V, bool kSr, int kU = 1, class P>
FO_INLINE void quant_lanes(P* p, const P* g, const uint8_t* const* codes,
                           const BlockScale<V>* scale, float (*st)[quant_block(kBits)], int64_t i,
                           const typename Rule::template Consts<V>& c, IntOf<V>* amax,
                           const Io<V>& io, float* pbuf, RareLanes& rare) {
  constexpr int kW = VecTraits<V>::kWidth;
  V x[kU][kMaxSlots];
  for (int u = 0; u < kU; ++u) quant_load<D, Rule, kBits>(p, g, codes, scale, i + u * kW, io, x[u]);
  for (int u = 0; u < kU; ++u) Rule::template apply<V>(x[u], c);
  // Note [paired bf16 param stores]
  constexpr bool kParamsX2 =
      kU == 2 && std::is_same_v<P, bf16> && !kSr && (Rule::kWrites & bit(kParam)) != 0;
  if constexpr (kParamsX2) vstore_bf16_x2(p + i, x[0][kParam], x[1][kParam]);
  for (int u = 0; u < kU; ++u)
    quant_store<D, Rule, kBits, V, kSr, kParamsX2>(p, st, i + u * kW, amax, io, pbuf, rare, x[u]);
}

// Note [quantized block driver].
// Prefetch distance: the batch's prefetch_ahead (0: none); by default 256 elements ahead (one
// int8 block, two int4 blocks), first measured at 2^24, 1 thread, AVX-512: 6.7-7.3 ms for int8
// against 7.8-7.9 ms at 512 and 1024 elements ahead, and for int4 8.3-8.5 ms against 9.1-9.8
// ms at 128 elements ahead; except int8 states on fp32 params, which take none since a Zen 4
// VM measured them faster so (default_prefetch_ahead, dispatch.cpp).
//
// Note [deferred block encode]
// A block's codes can only be written once its absmax is known, after its last lane. Encoded
// in a loop of their own, they left the divider and square root (the update's bottleneck
// in cache) idle for the encode's integer work, and the encode's ports idle during the
// update: int8 AdamW in cache took 0.40 ns/element on AVX-512 where fp32 takes 0.18. So a
// full, finite block's encode is deferred: its states wait in one of two stack buffers, and
// vector i of its codes is written in the same loop iteration as vector i of the next
// block's update (same tensor), which gives the out-of-order core both kinds of work in one
// window. The last block of a tensor's range, a partial block, a block with a non-finite
// value or with a 1 / absmax that overflows, and the scalar ISA store at once; so the deferred
// encode knows 1 / absmax to be finite and skips the clamp that only an infinite one needs
// (QuantMap::encode). The codes are the same (the same encode of the
// same values; only when they are written changes), and every block stays with the thread
// that updated it.
// kSr: the params' stores round stochastically (b.sr; bf16 params only).
//
// Note [quantized code groups]
// Codes are written kCodeGroup<V> vectors at a time (vec.h: one on AVX-512, four on AVX2),
// by store_codes from the block's buffer: the deferred encode takes one code group of the
// previous block per kCodeGroup<V> vectors of this block's update (kGW elements), and a
// block's own encode runs whole groups, then its scalar tail. AVX2 has no narrowing store: one
// vector's 8 codes took a byte shuffle, an extract, an unpack and a store (int4: a shift and
// an or more), where four vectors' 32 take two saturating packs of pairs, a third pack and
// one permute (int4: a pack and a multiply-add pair the nibbles). Same codes. In cache
// (bench_quant.py --in-cache, two runs alternated with the build before, 2.45 GHz Zen 3,
// AVX2), ns/element: int8 AdamW 1.13-1.20 -> 1.05-1.06, int4 1.47-1.53 -> 1.27-1.31, bf16
// params with int8 states 1.59-1.63 -> 1.46-1.49, with int4 1.98-2.01 -> 1.70-1.74.
//
// Note [deferred encode between steps]
// Where a code group is several steps of the update (AVX2: 32 elements, two steps of two
// vectors), the deferred block's codes of that group are written between the steps, spread
// over them by state: written state number j (0 for the first state the rule writes) after
// step j modulo the number of steps, so Adam's m after the first step and v after the
// second, where both went after the last. The same codes at the same places. Our reading of
// why it helps (not measured directly): each encode's integer work now sits between two
// update steps for the out-of-order core to overlap it with, rather than both encodes queued
// after the last step. AVX2 only: on AVX-512 a code group is one step.
//
// Note [paired bf16 param stores]
// With two lane groups per step (AVX2), bf16 params rounded to nearest are stored by
// vstore_bf16_x2 (vec.h): one NaN test for both groups (bf16_round_lanes2, Note [paired bf16
// lanes]), one pack, one permute and one 256-bit store, where two StorageIO stores took two
// NaN tests (an and, a compare, a vptest each), two byte shuffles, two permutes and two
// 128-bit stores. The same bits. Stochastic rounding keeps the per-group store.
// Measured, this note and the one above together with the AVX2 nibble loads (vec.h, vload_u4
// and vload_u4_top), on a 2.45 GHz
// Zen 3: in cache (bench_quant.py --in-cache, six runs alternated with the build before),
// ns/element, int8 AdamW 0.99-1.03 -> 0.96-0.97, int4 1.18-1.19 -> 1.14-1.15 (one 1.20), bf16
// params with int8 states 1.29-1.31 -> 1.25-1.26 (one 1.29), with int4 1.46-1.47 ->
// 1.38-1.44; of that, a build without the paired stores had bf16p-int8 at 1.28-1.30 and
// bf16p-int4 at 1.45 (the other two as with them). At 2^26 (bench/ab_builds.py, two runs,
// new / old at 1 | 2 threads): int8 0.97 | 0.96, int4 0.96 | 0.96-0.98, bf16p-int8 0.95-0.96 |
// 0.95-0.96, bf16p-int4 0.94 | 0.94-0.96; the unchanged fp32 row 1.02 | 1.00.
//
// Note [loads one lane group ahead]
// On AVX-512 (one lane group per step: kSteps = kU = 1), a full block updated while the
// previous block's encode is deferred runs software-pipelined: lane group i + 1's params and
// grads are loaded and its states decoded (quant_load) before group i's rule runs, then group
// i's stores (quant_store) and the deferred block's codes of group i. Same operations, same
// bits, in another order: the decode (a byte load, then shifts, an add and a multiply) no
// longer sits at the head of the chain that ends in the square root, the division and the
// stores, so fewer of each group's operations wait in the scheduler for it. One more vector of
// each read slot stays live across the loop. In cache (AdamW, 2^16 elements, 1 thread, min of
// 15 x 300 calls, three runs alternated with the build before, 3.2 GHz Zen 4, AVX-512),
// ns/element: int8 0.538-0.546 -> 0.518-0.524, int4 0.682-0.686 -> 0.643-0.650, bf16 params
// with int8 0.718-0.725 -> 0.696-0.697, with int4 0.885-0.891 -> 0.810-0.812. AVX2 keeps its
// two lane groups per step (Note [lane groups in flight]), a block's first group and a
// partial block the plain loop.
//
// Note [stochastic rounding off the loop]
// kSr is a compile-time constant (quant_entry picks the instantiation from b.sr), so the loop
// of a call without stochastic rounding holds none of its hash code, and the Io it passes to
// store_param has io.sr folded to false. With io.sr a runtime flag the bf16-params loops
// carried that branch and its constants. In cache (bench_quant.py --in-cache, three runs
// alternated with the previous build, 2.6 GHz Zen 4): bf16-params int8 AdamW on AVX-512
// 0.749-0.756 -> 0.713-0.716 ns/element, int4 0.92 -> 0.87; AVX2 int8 1.25 -> 1.19-1.24, int4
// 1.51 -> 1.36; avx512bf16 int8 0.76 -> 0.75 (within noise). It costs a second instantiation
// of every bf16-params quantized loop (the build's compile time rose by about 15%).
// On avx512bf16 the bf16-params loop also lost an out-of-line call (Note [rare bf16 stores
// after the block]).

// The ordinal of state slot s among the states in `writes` (0 for the first written state).
constexpr int written_ordinal(unsigned writes, int s) {
  int n = 0;
  for (int t = kState0; t < s; ++t) n += (writes & bit(t)) != 0;
  return n;
}

template <class D, class Rule, int kBits, class P, bool kSr, class Args>
void quant_range(const Batch& b, int64_t begin, int64_t end, const Args& a) {
  using V = FO_VEC_F32;
  using I = IntOf<V>;
  constexpr int kW = VecTraits<V>::kWidth;
  constexpr int64_t kB = quant_block(kBits);
  constexpr int64_t kGW = kW * kCodeGroup<V>;  // Note [quantized code groups]
  constexpr int kU = kLaneGroups<V>;  // Note [lane groups in flight]
  static_assert(kGW % (kU * kW) == 0, "a code group is whole steps of the update");
  constexpr int kSteps = static_cast<int>(kGW / (kU * kW));  // update steps per code group
  static_assert(kB % kGW == 0 && (kW == 1 || kW % 2 == 0), "a full block is whole code groups of whole bytes");
  constexpr bool kDefer = kW > 1;  // Note [deferred block encode]
  const typename Rule::template Consts<V> cv(a);
  const typename Rule::template Consts<float> cs(a);
  const int64_t* off = b.offsets;
  alignas(64) float st[2][kMaxStates][kB];
  alignas(64) float pbuf[kRareAfterBlock<P, V, kSr> ? kB : 1];  // Note [rare bf16 stores after the block]
  for (int64_t t = tensor_of(off, b.n_tensors, begin); t < b.n_tensors && off[t] < end; ++t) {
    const int64_t size = off[t + 1] - off[t];
    const int64_t lo = max64(begin - off[t], 0), hi = min64(end - off[t], size);
    if (lo >= hi) continue;
    P* p = static_cast<P*>(b.slots[kParam][t]);
    const P* g = b.slots[kGrad] ? static_cast<const P*>(b.slots[kGrad][t]) : nullptr;
    const QuantStream* q[kMaxSlots] = {};
    for (int s = kState0; s < kMaxSlots; ++s)
      if (b.slots[s]) q[s] = static_cast<const QuantStream*>(b.slots[s][t]);
    // The deferred block (Note [deferred block encode]): its buffer, each written state's
    // codes and 1 / absmax.
    bool deferred = false;
    float (*dst)[kB] = nullptr;
    uint8_t* dcodes[kMaxSlots] = {};
    V dinv[kMaxSlots];
    for (V& x : dinv) x = splat<V>(0.0f);
    // The deferred block's codes of code group i (kGW elements): of the written states whose
    // ordinal among them is u modulo nu (Note [deferred encode between steps]).
    const auto encode_deferred = [&](int64_t i, int u, int nu) {
      each_slot([&](auto s) {
        if constexpr (kDefer && s >= kState0 && (Rule::kWrites & bit(s)) != 0)
          if (written_ordinal(Rule::kWrites, s) % nu == u)
            QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>::template store_codes<V, false>(
                dcodes[s], i, dst[s - kState0], dinv[s]);
      });
    };
    // The blocks whose first element lies in [lo, hi).
    for (int64_t blk = (lo + kB - 1) / kB; blk * kB < hi; ++blk) {
      const int64_t start = blk * kB, n = min64(kB, size - start);
      float (*cur)[kB] = st[blk & 1];
      // Note [software prefetch] (kernels.h): the streams of the block(s) b.prefetch_ahead
      // elements ahead. A prefetch past the end of an array never faults.
      const bool pf = b.prefetch_ahead > 0;
      const int64_t ahead = start + (b.prefetch_ahead + 1) / 2 * 2;  // even: whole int4 bytes
      const uintptr_t pa = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead) * sizeof(P);
      const uintptr_t ga = reinterpret_cast<uintptr_t>(g) + static_cast<uintptr_t>(ahead) * sizeof(P);
      if (pf) {
        for (int64_t k = 0; k < kB * static_cast<int64_t>(sizeof(P)); k += 64) {
          __builtin_prefetch(reinterpret_cast<const void*>(pa + k), 1, 0);
          if (g) __builtin_prefetch(reinterpret_cast<const void*>(ga + k), 0, 0);
        }
      }
      const uint8_t* codes[kMaxSlots] = {};
      BlockScale<V> scale[kMaxSlots];  // QuantMap::block_scale of the states read
      BlockScale<float> scale1[kMaxSlots];  // the same for the scalar tail
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && ((Rule::kReads | Rule::kWrites) & bit(s)) != 0) {
          const uintptr_t c = reinterpret_cast<uintptr_t>(q[s]->codes) +
                              static_cast<uintptr_t>(quant_code_bytes(kBits, ahead));
          if (pf)
            for (int64_t k = 0; k < quant_code_bytes(kBits, kB); k += 64)
              __builtin_prefetch(reinterpret_cast<const void*>(c + k), 1, 0);
          codes[s] = q[s]->codes + quant_code_bytes(kBits, start);  // start is even
          if constexpr ((Rule::kReads & bit(s)) != 0) {
            using Map = QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>;
            scale[s] = Map::template block_scale<V>(q[s]->absmax[blk]);
            scale1[s] = Map::template block_scale<float>(q[s]->absmax[blk]);
          }
        }
      });
      P* pb = p + start;
      const P* gb = g ? g + start : nullptr;
      // the load/store options (kernels.h, Io): element pb[i] has index
      // sr_index0 + off[t] + start + i
      const uint64_t base = b.sr_index0 + static_cast<uint64_t>(off[t] + start);
      const Io<V> iov{splat<V>(b.grad_scale_inv_f), nullptr, base, b.sr_key, kSr};
      const Io<float> ios{b.grad_scale_inv_f, nullptr, base, b.sr_key, kSr};
      I amax[kMaxSlots];
      uint32_t amax1[kMaxSlots];
      for (int s = 0; s < kMaxSlots; ++s) {
        amax[s] = isplat<V>(0u);
        amax1[s] = 0u;
      }
      int64_t i = 0;
      RareLanes rare = 0;
      // Note [quantized code groups]: with a deferred block, a code group of this block's
      // update, then the same group of the deferred block's codes; the rest of both after
      // (this block is partial)
      if (deferred) {
        if constexpr (kDefer && kSteps == 1 && kU == 1) {
          if (n == kB) {
            // Note [loads one lane group ahead]
            V xc[kMaxSlots], xn[kMaxSlots];
            quant_load<D, Rule, kBits>(pb, gb, codes, scale, 0, iov, xc);
            for (; i + kW < kB; i += kW) {
              quant_load<D, Rule, kBits>(pb, gb, codes, scale, i + kW, iov, xn);
              Rule::template apply<V>(xc, cv);
              quant_store<D, Rule, kBits, V, kSr>(pb, cur, i, amax, iov, pbuf, rare, xc);
              encode_deferred(i, 0, 1);
              each_slot([&](auto s) {
                if constexpr ((Rule::kReads & bit(s)) != 0) xc[s] = xn[s];
              });
            }
            Rule::template apply<V>(xc, cv);
            quant_store<D, Rule, kBits, V, kSr>(pb, cur, i, amax, iov, pbuf, rare, xc);
            encode_deferred(i, 0, 1);
            i = kB;
          }
        }
        for (; i + kGW <= n; i += kGW) {
          for (int u = 0; u < kSteps; ++u) {
            quant_lanes<D, Rule, kBits, V, kSr, kU>(pb, gb, codes, scale, cur, i + u * kU * kW, cv, amax, iov,
                                                    pbuf, rare);
            encode_deferred(i, u, kSteps);
          }
        }
      }
      const int64_t encoded = i;
      for (; i + kU * kW <= n; i += kU * kW)
        quant_lanes<D, Rule, kBits, V, kSr, kU>(pb, gb, codes, scale, cur, i, cv, amax, iov, pbuf, rare);
      for (; i + kW <= n; i += kW)
        quant_lanes<D, Rule, kBits, V, kSr>(pb, gb, codes, scale, cur, i, cv, amax, iov, pbuf, rare);
      if (deferred) {
        for (int64_t k = encoded; k < kB; k += kGW) encode_deferred(k, 0, 1);
        deferred = false;
      }
#if defined(__AVX512BF16__)
      if constexpr (kRareAfterBlock<P, V, kSr>)
        if (__builtin_expect(rare != 0, 0)) store_rare_block(pb, pbuf, i);
#endif
      for (; i < n; ++i)
        quant_lanes<D, Rule, kBits, float, kSr>(pb, gb, codes, scale1, cur, i, cs, amax1, ios, pbuf, rare);
      // This block's absmax; its codes now (the last block of the range, a partial block,
      // one with a non-finite value or a 1 / absmax that overflows) or deferred to the next
      // block's loop, whose encode then needs no clamp (QuantMap::encode).
      float inv[kMaxSlots] = {};
      bool defer = kDefer && n == kB && (blk + 1) * kB < hi;
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && (Rule::kWrites & bit(s)) != 0) {
          using Map = QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>;
          inv[s] = Map::store_absmax(*q[s], blk, n, vmax_u32(vreduce_max_u32(amax[s]), amax1[s]));
          defer = defer && inv[s] >= 0.0f && inv[s] <= std::numeric_limits<float>::max();
        }
      });
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && (Rule::kWrites & bit(s)) != 0) {
          if (defer) {
            dinv[s] = splat<V>(inv[s]);
            dcodes[s] = q[s]->codes + quant_code_bytes(kBits, start);
          } else {
            QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>::template store_block_codes<V>(
                *q[s], blk, n, cur[s - kState0], inv[s]);
          }
        }
      });
      deferred = defer;
      dst = cur;
    }
  }
}

// The kernel-table entry of rule D in quantized format F (rules without states have none).
template <class D, Format F>
void quant_entry(const Batch& b, int64_t lo, int64_t hi, const void* p, unsigned mask) {
  if constexpr (HasStates<D>::value) {
    const auto& a = *static_cast<const typename D::Args*>(p);
    using Q = QuantOf<F>;
    dispatch_mask<D>(mask, [&](auto tag) {
      using Rule = typename decltype(tag)::type;
      if constexpr (std::is_same_v<typename Q::Param, bf16>) {
        if (b.sr) return quant_range<D, Rule, Q::kBits, bf16, true>(b, lo, hi, a);
      }
      quant_range<D, Rule, Q::kBits, typename Q::Param, false>(b, lo, hi, a);
    });
  }
}

}  // namespace
}  // namespace fastoptim
