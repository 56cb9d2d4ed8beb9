// kernel_api.h: what an ISA translation unit exports, and what the dispatcher calls.
//
// A Batch is one functional call: n tensors, each with up to kMaxSlots streams (param, grad,
// states). Work is addressed by a GLOBAL element index over the concatenation of all
// tensors, so the dispatcher can split 2,000 small tensors between threads as easily as one
// big buffer. A KernelFn processes the global range [begin, end) of variant `mask` of its
// rule (rule_api.h, Note [one flag dispatch]) with the rule's host-side Args.
#pragma once

#include <cstdint>

#include "rules.h"

namespace fastoptim {

struct Batch {
  int64_t n_tensors = 0;
  const int64_t* offsets = nullptr;        // n_tensors + 1 prefix sums of element counts
  void* const* slots[kMaxSlots] = {};       // slots[s][t]: data of stream s of tensor t (or null)
};

// One id per rule of FO_RULES (rules.h), in its order: kRuleSgd, kRuleAdam, ...
#define FO_RULE_ID(D) kRule##D,
enum RuleId : int { FO_RULES(FO_RULE_ID) kNumRules };
#undef FO_RULE_ID
template <class D> struct RuleIdOf;
#define FO_RULE_ID_OF(D) \
  template <> struct RuleIdOf<D> { static constexpr RuleId value = kRule##D; };
FO_RULES(FO_RULE_ID_OF)
#undef FO_RULE_ID_OF

enum DType : int { kF32 = 0, kF64 = 1, kNumDTypes = 2 };

using KernelFn = void (*)(const Batch&, int64_t begin, int64_t end, const void* args, unsigned mask);

// 16-bit storage formats (vec.h, Note [storage formats]).
enum Format : int { kBf16 = 0, kF16 = 1, kNumFormats = 2 };
// Converts n elements: fp32 -> format, or format -> fp32 (a test hook of the conversions).
using ConvertFn = void (*)(const void* src, void* dst, int64_t n);

struct KernelTable {
  const char* isa = nullptr;
  KernelFn fn[kNumRules][kNumDTypes] = {};
  ConvertFn convert[kNumFormats][2] = {};  // [format][widen]
};

// One per compiled ISA (isa_<name>.cpp).
void fill_table_scalar(KernelTable*);
void fill_table_avx2(KernelTable*);
void fill_table_avx512(KernelTable*);

}  // namespace fastoptim
