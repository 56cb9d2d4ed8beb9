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
// size, whole vectors, then a scalar tail. Head and tail run the SAME rule instantiated for
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
// The vector body asks for every stream it reads kPrefetchAhead elements ahead (1 KiB of
// fp32). The division and square root of a rule fill the out-of-order window, which limits
// how many cache misses the hardware prefetchers and the loads themselves keep in flight; an
// explicit prefetch keeps DRAM busy regardless. Measured on the AVX2 VM at hand, Adam fp32,
// 1 thread: 2^25 and 2^26 elements 4-8% faster (45-46 ms instead of 49-50 ms at 2^26, the
// same as the in-place ceiling loop); smaller sizes within noise. A prefetch past the end of
// an array is harmless: it never faults.
constexpr int64_t kPrefetchAhead = 256;

template <class T> struct IsaVec;
template <> struct IsaVec<float> { using type = FO_VEC_F32; };
template <> struct IsaVec<double> { using type = FO_VEC_F64; };

// How each stream of a format is stored (Note [storage formats], kernel_api.h). Compute is the
// register type; Copy is void when the format writes no copy of the params.
template <class P, class G, class S, class C, class Compute_>
struct Layout {
  using Compute = Compute_;
  using Copy = C;
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
template <> struct LayoutOf<kF32BF16States> { using type = Layout<float, float, bf16, void, float>; };

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

// One lane group at element i: load the rule's slots (widening), apply, store (rounding),
// and write the params' copy where the format has one.
template <class Rule, class L, class V>
FO_INLINE void apply_at(void* const* ptr, void* copy, int64_t i,
                        const typename Rule::template Consts<V>& c) {
  V x[kMaxSlots];
  each_slot([&](auto s) {
    if constexpr ((Rule::kReads & bit(s)) != 0) x[s] = vload_from<V>(elem_ptr<L, s>(ptr) + i);
  });
  Rule::template apply<V>(x, c);
  each_slot([&](auto s) {
    if constexpr ((Rule::kWrites & bit(s)) != 0) vstore_to(elem_ptr<L, s>(ptr) + i, x[s]);
  });
  if constexpr (!std::is_void_v<typename L::Copy>)
    vstore_to(static_cast<typename L::Copy*>(copy) + i, x[kParam]);
}

template <class Rule, class L>
FO_INLINE void run_span(void* const* ptr, void* copy, int64_t i, int64_t n,
                        const typename Rule::template Consts<typename IsaVec<typename L::Compute>::type>& cv,
                        const typename Rule::template Consts<typename L::Compute>& cs) {
  using T = typename L::Compute;
  using V = typename IsaVec<T>::type;
  using P = typename L::template Elem<kParam>;
  constexpr int kW = VecTraits<V>::kWidth;
  if constexpr (kW > 1) {
    // Align the param stream to its vector size (its element size times the lane count).
    constexpr uintptr_t kAlign = kW * sizeof(P);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(elem_ptr<L, kParam>(ptr) + i);
    int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(P));
    head = min64(head, n - i);
    for (; head > 0; --head, ++i) apply_at<Rule, L, T>(ptr, copy, i, cs);
    for (; i + 2 * kW <= n; i += 2 * kW) {
      each_slot([&](auto s) {
        if constexpr ((Rule::kReads & bit(s)) != 0)
          __builtin_prefetch(reinterpret_cast<const void*>(  // integer math: may pass the end
              reinterpret_cast<uintptr_t>(elem_ptr<L, s>(ptr) + i) +
              kPrefetchAhead * sizeof(typename L::template Elem<s>)), 0, 0);
      });
      apply_at<Rule, L, V>(ptr, copy, i, cv);
      apply_at<Rule, L, V>(ptr, copy, i + kW, cv);
    }
    for (; i + kW <= n; i += kW) apply_at<Rule, L, V>(ptr, copy, i, cv);
  }
  for (; i < n; ++i) apply_at<Rule, L, T>(ptr, copy, i, cs);
}

// Process the global element range [begin, end) of a batch.
template <class Rule, class L, class Args>
void run_range(const Batch& b, int64_t begin, int64_t end, const Args& a) {
  using T = typename L::Compute;
  using V = typename IsaVec<T>::type;
  const typename Rule::template Consts<V> cv(a);
  const typename Rule::template Consts<T> cs(a);
  const int64_t* off = b.offsets;
  int64_t t = tensor_of(off, b.n_tensors, begin);
  for (; t < b.n_tensors && off[t] < end; ++t) {
    const int64_t lo = max64(begin, off[t]) - off[t];
    const int64_t hi = min64(end, off[t + 1]) - off[t];
    void* ptr[kMaxSlots];
    for (int s = 0; s < kMaxSlots; ++s) ptr[s] = b.slots[s] ? b.slots[s][t] : nullptr;
    run_span<Rule, L>(ptr, b.copies ? b.copies[t] : nullptr, lo, hi, cv, cs);
  }
}

}  // namespace
}  // namespace fastoptim
#include "quant.h"  // the quantized-state formats' block driver (quant_entry)
namespace fastoptim {
namespace {

// One entry per (rule, format): the call's variant -> its instantiation (rule_api.h).
template <class D, Format F>
void entry(const Batch& b, int64_t lo, int64_t hi, const void* p, unsigned mask) {
  if constexpr (QuantBits<F>::value != 0) {
    quant_entry<D, F>(b, lo, hi, p, mask);
  } else {
    const auto& a = *static_cast<const typename D::Args*>(p);
    dispatch_mask<D>(mask, [&](auto tag) {
      run_range<typename decltype(tag)::type, typename LayoutOf<F>::type>(b, lo, hi, a);
    });
  }
}

template <class D, int... Fs> void fill_rule(KernelTable* t, std::integer_sequence<int, Fs...>) {
  ((t->fn[RuleIdOf<D>::value][Fs] = &entry<D, static_cast<Format>(Fs)>), ...);
}

// Test hook of the storage conversions (vec.h, Note [storage formats]): n elements fp32 -> E
// (kWiden false) or E -> fp32, split as run_span splits a span: scalar head until src is
// vector-aligned, whole vectors, scalar tail.
template <class E, bool kWiden>
void convert_span(const void* src, void* dst, int64_t n) {
  const auto at = [&](auto lane, int64_t i) {
    using V = decltype(lane);
    if constexpr (kWiden)
      vstore(static_cast<float*>(dst) + i, vload_from<V>(static_cast<const E*>(src) + i));
    else
      vstore_to(static_cast<E*>(dst) + i, vload<V>(static_cast<const float*>(src) + i));
  };
  using V = FO_VEC_F32;
  constexpr int64_t kW = VecTraits<V>::kWidth;
  constexpr uintptr_t kSrcSize = kWiden ? sizeof(E) : sizeof(float);
  constexpr uintptr_t kAlign = kW * kSrcSize;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(src);
  const int64_t head = min64(n, static_cast<int64_t>((kAlign - addr % kAlign) % kAlign / kSrcSize));
  int64_t i = 0;
  for (; i < head; ++i) at(float{}, i);
  for (; i + kW <= n; i += kW) at(V{}, i);
  for (; i < n; ++i) at(float{}, i);
}

}  // namespace

void FO_FILL_TABLE(KernelTable* t) {
#define FO_FILL(D) fill_rule<D>(t, std::make_integer_sequence<int, kNumFormats>{});
  FO_RULES(FO_FILL)
#undef FO_FILL
  t->convert[kStorageBF16][0] = &convert_span<bf16, false>;
  t->convert[kStorageBF16][1] = &convert_span<bf16, true>;
  t->convert[kStorageF16][0] = &convert_span<f16, false>;
  t->convert[kStorageF16][1] = &convert_span<f16, true>;
}

}  // namespace fastoptim
