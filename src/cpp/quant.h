// quant.h: the CPU driver of the quantized-state formats kF32Q8 and kF32Q4 (quant_api.h,
// Note [quantized states]). Part of kernels.h, which includes it between its helpers and its
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

#include <type_traits>

#include "kernel_api.h"
#include "quant_api.h"

namespace fastoptim {
namespace {

template <Format F> struct QuantBits : std::integral_constant<int, 0> {};
template <> struct QuantBits<kF32Q8> : std::integral_constant<int, 8> {};
template <> struct QuantBits<kF32Q4> : std::integral_constant<int, 4> {};

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

FO_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
}
FO_INLINE float float_of(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}

// The map of Note [quantized states] for one kind of state: a code is a small float of
// |x| / absmax with kF mantissa bits, its bit pattern offset by kBias so that the top code is
// 1.0 (non-negative states: every code; signed: a sign bit and the magnitudes 1..K, 0 = zero).
template <int kBits, bool kNonNegative> struct QuantMap {
  static constexpr int kF = kBits == 8 ? 3 : 0;          // mantissa bits
  static constexpr int kShift = 23 - kF;                  // fp32 mantissa bits dropped
  static constexpr uint32_t kTop = kNonNegative ? (1u << kBits) - 1u : (1u << (kBits - 1)) - 1u;
  static constexpr uint32_t kSign = kNonNegative ? 0u : 1u << (kBits - 1);
  static constexpr int32_t kBias = (127 << kF) - static_cast<int32_t>(kTop);  // code kTop = 1.0

  // A code (its kBits low bits) -> x.
  static FO_INLINE float decode(uint32_t c, float absmax) {
    if constexpr (kNonNegative) {
      return float_of((c + kBias) << kShift) * absmax;
    } else {
      const uint32_t k = c & kTop;
      const uint32_t u = ((k + kBias) << kShift) | ((c & kSign) << (31 - (kBits - 1)));
      return (k == 0 ? 0.0f : float_of(u)) * absmax;
    }
  }

  // x -> its code (kBits low bits), given inv = 1 / absmax (0 when absmax is 0): |x| * inv
  // rounded to kF mantissa bits, ties to even (on its bit pattern, an integer add), then offset.
  static FO_INLINE uint32_t encode(float x, float inv) {
    const uint32_t u = bits_of(__builtin_fabsf(x) * inv);
    const int32_t r = static_cast<int32_t>(
        (u + (1u << (kShift - 1)) - 1u + ((u >> kShift) & 1u)) >> kShift) - kBias;
    if constexpr (kNonNegative) {
      return static_cast<uint32_t>(r < 0 ? 0 : r > static_cast<int32_t>(kTop) ? kTop : r);
    } else {
      const uint32_t k = static_cast<uint32_t>(r < 1 ? 0 : r > static_cast<int32_t>(kTop) ? kTop : r);
      return k | (x < 0.0f && k != 0 ? kSign : 0u);  // zero has one code
    }
  }

  // Block `blk` of a tensor's stream (n elements) -> out[0, n).
  static FO_INLINE void load(const QuantStream& s, int64_t blk, int64_t n, float* out) {
    constexpr int64_t kB = quant_block(kBits);
    const float absmax = s.absmax[blk];
    if constexpr (kBits == 8) {
      const uint8_t* c = s.codes + blk * kB;
      for (int64_t i = 0; i < n; ++i) out[i] = decode(c[i], absmax);
    } else {
      const uint8_t* c = s.codes + blk * (kB / 2);
      const int64_t pairs = n / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        out[2 * j] = decode(c[j] & 15u, absmax);
        out[2 * j + 1] = decode(static_cast<uint32_t>(c[j]) >> 4, absmax);
      }
      if (n & 1) out[n - 1] = decode(c[pairs] & 15u, absmax);
    }
  }

  // in[0, n) -> block `blk` of the stream, given the block's max |x| and whether all its
  // values are finite: its absmax (NaN when not finite, with every code 0), then its codes.
  static FO_INLINE void store(const QuantStream& s, int64_t blk, int64_t n, const float* in,
                              float m, bool finite) {
    constexpr int64_t kB = quant_block(kBits);
    s.absmax[blk] = finite ? m : __builtin_nanf("");
    const float inv = finite && m > 0.0f ? 1.0f / m : 0.0f;
    if constexpr (kBits == 8) {
      uint8_t* c = s.codes + blk * kB;
      if (!finite) {
        for (int64_t k = 0; k < n; ++k) c[k] = 0;
        return;
      }
      for (int64_t k = 0; k < n; ++k) c[k] = static_cast<uint8_t>(encode(in[k], inv));
    } else {
      uint8_t* c = s.codes + blk * (kB / 2);
      const int64_t pairs = n / 2;
      if (!finite) {
        for (int64_t k = 0; k < (n + 1) / 2; ++k) c[k] = 0;
        return;
      }
      for (int64_t j = 0; j < pairs; ++j)
        c[j] = static_cast<uint8_t>(encode(in[2 * j], inv) | (encode(in[2 * j + 1], inv) << 4));
      if (n & 1) c[pairs] = static_cast<uint8_t>(encode(in[n - 1], inv));
    }
  }
};

// One lane group at element i of a block: params and grads from memory, states from the
// block's buffer. On the way, each written state's max |x| (amax) and a finiteness flag (bad:
// x - x is 0 for a finite x, NaN otherwise) are accumulated per lane; both are exact, so the
// order of lanes cannot change them.
template <class Rule, class V>
FO_INLINE void quant_apply(float* p, const float* g, float (*st)[256], int64_t i,
                           const typename Rule::template Consts<V>& c, V* amax, V* bad,
                           V grad_scale_inv) {
  V x[kMaxSlots];
  if constexpr ((Rule::kReads & bit(kParam)) != 0) x[kParam] = vload<V>(p + i);
  // the grads unscaled as they are loaded (kernel_api.h, Note [load/store options])
  if constexpr ((Rule::kReads & bit(kGrad)) != 0) x[kGrad] = vload<V>(g + i) * grad_scale_inv;
  each_slot([&](auto s) {
    if constexpr (s >= kState0 && (Rule::kReads & bit(s)) != 0) x[s] = vload<V>(st[s - kState0] + i);
  });
  Rule::template apply<V>(x, c);
  if constexpr ((Rule::kWrites & bit(kParam)) != 0) vstore(p + i, x[kParam]);
  each_slot([&](auto s) {
    if constexpr (s >= kState0 && (Rule::kWrites & bit(s)) != 0) {
      vstore(st[s - kState0] + i, x[s]);
      const V a = vabs(x[s]);
      amax[s] = vselect(vgt(a, amax[s]), a, amax[s]);
      bad[s] = bad[s] + (x[s] - x[s]);
    }
  });
}

// Note [quantized block driver].
constexpr int64_t kPrefetchBlocks = 2;
template <class D, class Rule, int kBits, class Args>
void quant_range(const Batch& b, int64_t begin, int64_t end, const Args& a) {
  using V = FO_VEC_F32;
  constexpr int kW = VecTraits<V>::kWidth;
  constexpr int64_t kB = quant_block(kBits);
  static_assert(kB <= 256, "the state buffer holds 256 elements per state");
  const typename Rule::template Consts<V> cv(a);
  const typename Rule::template Consts<float> cs(a);
  const int64_t* off = b.offsets;
  alignas(64) float st[kMaxStates][256];
  for (int64_t t = tensor_of(off, b.n_tensors, begin); t < b.n_tensors && off[t] < end; ++t) {
    const int64_t size = off[t + 1] - off[t];
    const int64_t lo = max64(begin - off[t], 0), hi = min64(end - off[t], size);
    if (lo >= hi) continue;
    float* p = static_cast<float*>(b.slots[kParam][t]);
    const float* g = b.slots[kGrad] ? static_cast<const float*>(b.slots[kGrad][t]) : nullptr;
    const QuantStream* q[kMaxSlots] = {};
    for (int s = kState0; s < kMaxSlots; ++s)
      if (b.slots[s]) q[s] = static_cast<const QuantStream*>(b.slots[s][t]);
    // The blocks whose first element lies in [lo, hi).
    for (int64_t blk = (lo + kB - 1) / kB; blk * kB < hi; ++blk) {
      const int64_t start = blk * kB, n = min64(kB, size - start);
      // Note [software prefetch] (kernels.h): the streams of the block kPrefetchBlocks ahead.
      // A prefetch past the end of an array never faults.
      const int64_t ahead = start + kPrefetchBlocks * kB;
      const uintptr_t pa = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead) * 4;
      const uintptr_t ga = reinterpret_cast<uintptr_t>(g) + static_cast<uintptr_t>(ahead) * 4;
      for (int64_t k = 0; k < kB * 4; k += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(pa + k), 1, 0);
        if (g) __builtin_prefetch(reinterpret_cast<const void*>(ga + k), 0, 0);
      }
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && ((Rule::kReads | Rule::kWrites) & bit(s)) != 0) {
          const uintptr_t c = reinterpret_cast<uintptr_t>(q[s]->codes) +
                              static_cast<uintptr_t>(quant_code_bytes(kBits, ahead));
          for (int64_t k = 0; k < quant_code_bytes(kBits, kB); k += 64)
            __builtin_prefetch(reinterpret_cast<const void*>(c + k), 1, 0);
        }
      });
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && (Rule::kReads & bit(s)) != 0)
          QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>::load(*q[s], blk, n, st[s - kState0]);
      });
      float* pb = p + start;
      const float* gb = g ? g + start : nullptr;
      V amax[kMaxSlots], bad[kMaxSlots];
      float amax1[kMaxSlots], bad1[kMaxSlots];
      for (int s = 0; s < kMaxSlots; ++s) {
        amax[s] = bad[s] = splat<V>(0.0f);
        amax1[s] = bad1[s] = 0.0f;
      }
      int64_t i = 0;
      for (; i + kW <= n; i += kW)
        quant_apply<Rule, V>(pb, gb, st, i, cv, amax, bad, splat<V>(b.grad_scale_inv_f));
      for (; i < n; ++i)
        quant_apply<Rule, float>(pb, gb, st, i, cs, amax1, bad1, b.grad_scale_inv_f);
      each_slot([&](auto s) {
        if constexpr (s >= kState0 && (Rule::kWrites & bit(s)) != 0) {
          float m = amax1[s], b = bad1[s];
          alignas(64) float lanes[kW], flags[kW];
          vstore(lanes, amax[s]);
          vstore(flags, bad[s]);
          for (int k = 0; k < kW; ++k) {
            m = lanes[k] > m ? lanes[k] : m;
            b = b + flags[k];
          }
          QuantMap<kBits, slot_non_negative<D, decltype(s)::value>()>::store(
              *q[s], blk, n, st[s - kState0], m, b == 0.0f);
        }
      });
    }
  }
}

// The kernel-table entry of rule D in quantized format F (rules without states have none).
template <class D, Format F>
void quant_entry(const Batch& b, int64_t lo, int64_t hi, const void* p, unsigned mask) {
  if constexpr (HasStates<D>::value) {
    const auto& a = *static_cast<const typename D::Args*>(p);
    dispatch_mask<D>(mask, [&](auto tag) {
      quant_range<D, typename decltype(tag)::type, QuantBits<F>::value>(b, lo, hi, a);
    });
  }
}

}  // namespace
}  // namespace fastoptim
