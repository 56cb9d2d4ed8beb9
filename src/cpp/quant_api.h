// quant_api.h: block-wise quantized optimizer states, the part the bindings and the kernels
// share (the driver is quant.h). Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization", with a small-float map instead of the paper's dynamic tree map.
//
// Note [quantized states]
// A quantized state of a tensor of n elements is n codes plus one fp32 absmax per block of
// kBlock elements (block b covers elements [b*kBlock, (b+1)*kBlock) of ITS tensor; the last
// block of a tensor may be shorter). The format decides the bits (kF32Q8 and kBF16Q8: 8;
// kF32Q4 and kBF16Q4: 4; the params and grads are float32 or bfloat16, as the format says):
//   8 bits: blocks of 256, one code per byte;
//   4 bits: blocks of 128, two codes per byte, element 2j in the low nibble of byte j and
//           element 2j+1 in the high nibble (an odd tensor's last high nibble is 0).
// The map (both kinds of state) is a small float of a = |x| / absmax in [0, 1]: F mantissa bits
// (F = 3 at 8 bits, 0 at 4 bits), and the exponent in the code's remaining bits, offset so that
// the top code is 1.0. Encoding rounds a's fp32 bit pattern to F mantissa bits, ties away from
// zero (an integer add and shift; Note [quantized rounding ties]), and subtracts the offset;
// decoding shifts it back and multiplies by absmax (one fp32 rounding). Each state of a rule is
// declared signed or non-negative (rules.h, StateSpec::non_negative):
//   non-negative: every code is a value, 2^-32 * 1.125 .. 1 at 8 bits (steps of 1/8 of a
//                 power of two), 2^-15 .. 1 at 4 bits (powers of two); smaller values take
//                 the lowest code,
//                 so a second moment never reads back as 0 (an Adam denominator of eps alone);
//   signed:       a sign bit and a magnitude code, 0 = zero, else 2^-16 * 1.25 .. 1 at 8 bits,
//                 2^-6 .. 1 at 4 bits; smaller magnitudes flush to 0.
// (a = |x| * (1 / absmax), the reciprocal rounded once per block.) No square root, no table
// search: integer adds and shifts, one multiplication each way. Why this map and not the
// paper's dynamic map or a square-root companding map: docs/quantized_states.md (measured).
// All-zero codes with absmax 0 are the zero state of either kind.
//
// Note [quantized rounding ties]
// A value exactly halfway between two adjacent codes (in a's bit pattern: the dropped mantissa
// bits are exactly 100...0) takes the code of larger magnitude: the encode adds half an ulp of
// the kept mantissa and shifts. Until 3bff2e8 ties went to the even code, which took three more
// integer ops per encoded vector (the kept mantissa's low bit shifted out, masked and added), a
// tenth of the int8 AdamW loop's vector ops: in cache (bench/bench_quant.py --in-cache, 2^16
// elements, 1 thread) AVX-512 int8 AdamW 0.60-0.61 -> 0.54-0.55 ns/element, int4 0.75-0.76 ->
// 0.69-0.70, AVX2 int8 0.93-0.95 -> 0.85-0.89; at 2^26 (bench/ab_builds.py, both builds on the
// same arrays) int8 new/old 0.93-0.95 at 1 thread and 0.96-1.02 at 2, int4 0.91-0.95 and
// 0.93-0.98. Only the encoder changed: every code decodes to the value it did, so states saved
// before load unchanged. Ties are rare in an optimizer's states (1 in 2^20 at 8 bits for values
// spread over a block), so the upward bias this adds is negligible next to the map's own step
// (1/16 of a value at 8 bits).
//
// The update of one block: dequantize the block's states into fp32, run the rule, find the
// block's new absmax (max |x|; NaN when the block holds a NaN or an Inf, and then every code
// of the block is 0 and the whole block reads back as NaN), requantize. Every op is an IEEE
// fp32 op with one rounding, so scalar, AVX2 and AVX-512 agree bitwise; a block is processed
// by exactly one thread (the chunk holding its first element, quant.h), so thread counts do too.
#pragma once

#include <cstdint>

namespace fastoptim {

// What a state slot of a quantized format points to (Batch::slots[s][t]).
struct QuantStream {
  uint8_t* codes;
  float* absmax;
};

constexpr int64_t quant_block(int bits) { return bits == 8 ? 256 : 128; }
constexpr int64_t quant_code_bytes(int bits, int64_t n) { return bits == 8 ? n : (n + 1) / 2; }
constexpr int64_t quant_blocks(int bits, int64_t n) {
  return (n + quant_block(bits) - 1) / quant_block(bits);
}

}  // namespace fastoptim
