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
  void* const* copies = nullptr;            // copies[t]: the low-precision copy of param t that
                                            // the copy formats write (Note [storage formats]),
                                            // or its Kahan compensation (kBF16Kahan)
  // Note [load/store options]: per-call options of the loads and stores, never of a rule.
  //   grad_scale_inv  every grad is multiplied by it as it is loaded (torch.amp's unscaling,
  //                   fused); 1.0 changes no bit. Held in fp32 and fp64, per compute type.
  //   sr, sr_key      stochastic rounding of the bfloat16 param store, keyed by the call's
  //   sr_index0       (seed, counter) mixed into sr_key and the element's index: sr_index0
  //                   plus its index in the call (vec.h, Note [stochastic rounding]); off:
  //                   round to nearest even.
  float grad_scale_inv_f = 1.0f;
  double grad_scale_inv_d = 1.0;
  bool sr = false;
  uint32_t sr_key = 0;
  uint64_t sr_index0 = 0;
  // Note [software prefetch] (kernels.h): how far ahead, in elements, the vector body
  // prefetches each stream it reads; 0: no software prefetch. execute() sets it from the
  // process-wide setting (prefetch_ahead_setting, dispatch.h).
  int64_t prefetch_ahead = 0;
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

// Note [storage formats]
// A format says how each stream of a call is stored: params, grads, states (all states of a
// call share one storage type) and, for the copy formats, a low-precision copy of the params
// written in the same pass. The math runs in fp32 registers (fp64 for kF64); loads widen and
// stores round to nearest even (vec.h's vload_from / vstore_to). The rules never see a format.
//                        params    grads     states    copy
//   kF32                 float32   float32   float32   -
//   kF64                 float64   float64   float64   -
//   kBF16                bfloat16  bfloat16  bfloat16  -         torch fused's all-bf16
//   kF16                 float16   float16   float16   -
//   kBF16F32States       bfloat16  bfloat16  float32   -
//   kF16F32States        float16   float16   float32   -
//   kF32BF16Grads        float32   bfloat16  float32   -         fp32 master weights
//   kF32F16Grads         float32   float16   float32   -
//   kF32BF16GradsCopy    float32   bfloat16  float32   bfloat16  + the model's bf16 copy
//   kF32F16GradsCopy     float32   float16   float32   float16
//   kBF16Kahan           bfloat16  bfloat16  bfloat16  (bfloat16 compensation, read and written)
//   kF32Q8               float32   float32   int8      -         block-wise quantized states:
//   kF32Q4               float32   float32   int4      -         quant_api.h, Note [quantized states]
//   kF32BF16States       float32   float32   bfloat16  -         half the state bytes, no quantizer
//   kBF16Q8              bfloat16  bfloat16  int8      -         bf16 params with quantized states
//   kBF16Q4              bfloat16  bfloat16  int4      -         (10 and 8 bytes per element, Adam)
// kBF16Kahan keeps, per param, the bf16 rounding error of its last store ("compensation", in
// the copies stream): the rule sees p + compensation, and the store writes p' = bf16(x) and
// compensation' = bf16(x - p') (Kahan-compensated bf16 params without an fp32 master).
// CUDA runs every format but the quantized ones (src/cuda/rule_visitor.h, Note [16-bit ...]).
enum Format : int {
  kF32 = 0, kF64 = 1, kBF16, kF16, kBF16F32States, kF16F32States, kF32BF16Grads, kF32F16Grads,
  kF32BF16GradsCopy, kF32F16GradsCopy, kBF16Kahan,
  kF32Q8, kF32Q4,  // quantized states (quant_api.h); their state slots point to QuantStreams
  kF32BF16States,
  kBF16Q8, kBF16Q4,  // bfloat16 params and grads, quantized states
  kNumFormats
};

using KernelFn = void (*)(const Batch&, int64_t begin, int64_t end, const void* args, unsigned mask);

// The 16-bit element types (vec.h, Note [storage formats] there).
enum Storage : int { kStorageBF16 = 0, kStorageF16 = 1, kNumStorage = 2 };
// Converts n elements: fp32 -> storage, or storage -> fp32 (a test hook of the conversions).
using ConvertFn = void (*)(const void* src, void* dst, int64_t n);
// Stores n fp32 elements as bfloat16 rounded stochastically, element i with element index
// index0 + i (a test hook of vstore_sr, vec.h, Note [stochastic rounding]).
using ConvertSrFn = void (*)(const float* src, void* dst, int64_t n, uint32_t key, uint64_t index0);

// Element types of a reduction's input (global_norm, unscale): f32, f64, bf16, f16.
enum GradType : int { kGradF32 = 0, kGradF64, kGradBF16, kGradF16, kNumGradTypes };
// Sum of squares of global elements [begin, end) of slot 0 of a batch, which are whole blocks
// of kNormBlock elements of their tensors (Note [deterministic norm], kernels.h): partial[k]
// receives block k's sum, blocks numbered over the whole batch in order.
constexpr int64_t kNormBlock = 1 << 14;
using NormFn = void (*)(const Batch&, const int64_t* block_offsets, int64_t first_block,
                        int64_t end_block, double* partial);
// Multiplies elements [begin, end) of slot 0 in place by `scale`; returns true if any element
// was not finite BEFORE the multiplication (torch's _amp_foreach_non_finite_check_and_unscale_).
using UnscaleFn = bool (*)(const Batch&, int64_t begin, int64_t end, double scale);

// Note [byte ceiling]
// The benchmarks' in-place bandwidth ceiling for any mix of streams (_core.stream_bytes): up
// to kMaxByteStreams raw byte streams walked together in blocks of kByteBlock elements, stream
// j taking block_bytes[j] bytes per block (a multiple of 64: f32 512, bf16 256, int8 codes
// 128, int4 codes 64), each read, written, or both. A read-and-written stream gets `zero` (0,
// from the caller: the compiler cannot know it) added to every 32-bit word, so its bits stay
// as they were; a write-only stream is stored zeros; the read-only streams are ORed together
// and the result, ANDed with `zero`, goes to `sink`, so that their loads stay. Integer work
// only, so that no conversion or rounding stands between the loop and the memory: what it
// reaches is the memory's limit for exactly that traffic, on those arrays, in the loop's
// shape (kernels.h). Blocks are split between threads as execute() splits elements (kChunk
// elements a chunk, threads_for of the element count).
constexpr int kMaxByteStreams = 8;
constexpr int64_t kByteBlock = 128;  // elements
constexpr int64_t kMaxByteRun = 1024;  // blocks (a thread's chunk of 256 blocks caps a run anyway)
struct ByteStreams {
  int n = 0;
  uint8_t* base[kMaxByteStreams] = {};
  int64_t block_bytes[kMaxByteStreams] = {};
  bool read[kMaxByteStreams] = {}, write[kMaxByteStreams] = {};
  uint32_t zero = 0;
  uint32_t* sink = nullptr;     // receives the read-only streams' bits ANDed with zero
  int64_t prefetch_ahead = 0;   // elements (0: no software prefetch)
  int64_t run = 1;              // blocks of a stream walked before the next stream's
};
// Blocks [begin, end) of the streams.
using BytesFn = void (*)(const ByteStreams&, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa = nullptr;
  BytesFn stream_bytes = nullptr;
  KernelFn fn[kNumRules][kNumFormats] = {};
  ConvertFn convert[kNumStorage][2] = {};  // [storage][widen]
  ConvertSrFn convert_sr = nullptr;
  NormFn sumsq[kNumGradTypes] = {};
  UnscaleFn unscale[kNumGradTypes] = {};
};

// Each compiled ISA's table is filled by kIsaShards functions, one per translation unit, each
// for its share of the formats (kernels.h, Note [ISA shards]). kIsaShards must equal
// FASTOPTIM_ISA_SHARDS (CMakeLists.txt).
constexpr int kIsaShards = 4;
using FillFn = void (*)(KernelTable*);
// Only declared here: dispatch.cpp names an ISA's fillers (FO_ISA_FILL_LIST) where that ISA is
// compiled in. A constexpr table of them in this header was emitted by units built at -O0
// (emulate.cpp), an undefined symbol in a build without that ISA (FASTOPTIM_NO_AVX2=ON with
// CUDA: seen on the H200 machine).
#define FO_ISA_FILLS(name)                       \
  void fill_table_##name##_shard0(KernelTable*); \
  void fill_table_##name##_shard1(KernelTable*); \
  void fill_table_##name##_shard2(KernelTable*); \
  void fill_table_##name##_shard3(KernelTable*);
#define FO_ISA_FILL_LIST(name) \
  {fill_table_##name##_shard0, fill_table_##name##_shard1, fill_table_##name##_shard2, fill_table_##name##_shard3}
FO_ISA_FILLS(scalar)
FO_ISA_FILLS(avx2)
FO_ISA_FILLS(avx512)
FO_ISA_FILLS(avx512bf16)  // the bfloat16-storing formats only
#undef FO_ISA_FILLS

}  // namespace fastoptim
