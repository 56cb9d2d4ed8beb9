// quant_api.h: block-wise quantized optimizer states, the part the bindings and the kernels
// share (the driver is quant.h). Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization", with a closed-form companding map instead of the paper's dynamic tree map.
//
// Note [quantized states]
// A quantized state of a tensor of n elements is n codes plus one fp32 absmax per block of
// kBlock elements (block b covers elements [b*kBlock, (b+1)*kBlock) of ITS tensor; the last
// block of a tensor may be shorter). The format (kF32Q8, kF32Q4) decides the bits:
//   8 bits: blocks of 256, one code per byte;
//   4 bits: blocks of 128, two codes per byte, element 2j in the low nibble of byte j and
//           element 2j+1 in the high nibble (an odd tensor's last high nibble is 0).
// Each state of a rule is declared signed or non-negative (rules.h, StateSpec::non_negative):
//   signed, M = 127 (8 bits) or 7 (4 bits), code q in [-M, M] (two's complement):
//       x = (q * |q| * (1/M^2)) * absmax            q = sign(x) * rne(M * sqrt(|x| / absmax))
//   non-negative, L = 256 or 16, code q in [0, L-1]:
//       x = (((q+1)^2)^2 / L^4) * absmax             q = max(rne(L * sqrt(sqrt(x / absmax))) - 1, 0)
// (products in fp32, left to right, each rounded; |x| / absmax is |x| * (1 / absmax) with the
// reciprocal rounded once per block; rne: round half to even). The non-negative map has no
// zero: its smallest value is absmax / L^4 (2.3e-10 absmax at 8 bits), so a second moment
// never dequantizes to 0 (an Adam denominator of eps alone), and small values keep their
// relative precision down there. All-zero codes with absmax 0 are the zero state of either
// kind. Why this map and not the paper's: docs/quantized_states.md (measured).
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
