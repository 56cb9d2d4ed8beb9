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

template <class Rule, class V, class T>
FO_INLINE void apply_at(T* const* ptr, int64_t i, const typename Rule::template Consts<V>& c) {
  V x[kMaxSlots];
#pragma GCC unroll 8
  for (int s = 0; s < kMaxSlots; ++s)
    if (Rule::kReads & bit(s)) x[s] = vload<V>(ptr[s] + i);
  Rule::template apply<V>(x, c);
#pragma GCC unroll 8
  for (int s = 0; s < kMaxSlots; ++s)
    if (Rule::kWrites & bit(s)) vstore(ptr[s] + i, x[s]);
}

template <class Rule, class T>
FO_INLINE void run_span(T* const* ptr, int64_t i, int64_t n,
                        const typename Rule::template Consts<typename IsaVec<T>::type>& cv,
                        const typename Rule::template Consts<T>& cs) {
  using V = typename IsaVec<T>::type;
  constexpr int kW = VecTraits<V>::kWidth;
  if constexpr (kW > 1) {
    constexpr uintptr_t kAlign = kW * sizeof(T);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(ptr[0] + i);
    int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(T));
    head = min64(head, n - i);
    for (; head > 0; --head, ++i) apply_at<Rule, T>(ptr, i, cs);
    for (; i + 2 * kW <= n; i += 2 * kW) {
#pragma GCC unroll 8
      for (int s = 0; s < kMaxSlots; ++s)
        if (Rule::kReads & bit(s))
          __builtin_prefetch(reinterpret_cast<const void*>(  // integer math: may pass the end
              reinterpret_cast<uintptr_t>(ptr[s] + i) + kPrefetchAhead * sizeof(T)), 0, 0);
      apply_at<Rule, V>(ptr, i, cv);
      apply_at<Rule, V>(ptr, i + kW, cv);
    }
    for (; i + kW <= n; i += kW) apply_at<Rule, V>(ptr, i, cv);
  }
  for (; i < n; ++i) apply_at<Rule, T>(ptr, i, cs);
}

// Process the global element range [begin, end) of a batch.
template <class Rule, class T, class Args>
void run_range(const Batch& b, int64_t begin, int64_t end, const Args& a) {
  using V = typename IsaVec<T>::type;
  const typename Rule::template Consts<V> cv(a);
  const typename Rule::template Consts<T> cs(a);
  const int64_t* off = b.offsets;
  int64_t t = tensor_of(off, b.n_tensors, begin);
  for (; t < b.n_tensors && off[t] < end; ++t) {
    const int64_t lo = max64(begin, off[t]) - off[t];
    const int64_t hi = min64(end, off[t + 1]) - off[t];
    T* ptr[kMaxSlots];
    for (int s = 0; s < kMaxSlots; ++s)
      ptr[s] = b.slots[s] ? static_cast<T*>(b.slots[s][t]) : nullptr;
    run_span<Rule, T>(ptr, lo, hi, cv, cs);
  }
}

// One entry per (rule, dtype): the call's variant -> its instantiation (rule_api.h).
template <class D, class T>
void entry(const Batch& b, int64_t lo, int64_t hi, const void* p, unsigned mask) {
  const auto& a = *static_cast<const typename D::Args*>(p);
  dispatch_mask<D>(mask, [&](auto tag) { run_range<typename decltype(tag)::type, T>(b, lo, hi, a); });
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
#define FO_FILL(D)                                   \
  t->fn[kRule##D][kF32] = &entry<D, float>; \
  t->fn[kRule##D][kF64] = &entry<D, double>;
  FO_RULES(FO_FILL)
#undef FO_FILL
  t->convert[kBf16][0] = &convert_span<bf16, false>;
  t->convert[kBf16][1] = &convert_span<bf16, true>;
  t->convert[kF16][0] = &convert_span<f16, false>;
  t->convert[kF16][1] = &convert_span<f16, true>;
}

}  // namespace fastoptim
