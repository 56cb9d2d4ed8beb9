// AVX-512F instantiation of every rule (16 x fp32, 8 x fp64). Compiled with -mavx512f
// (CMakeLists.txt, this file's shards only); the default when CPUID reports AVX-512F (README, "ISA
// paths", has the measured A/B against AVX2).
#define FO_VEC_F32 F32x16
#define FO_VEC_F64 F64x8
#define FO_FILL_TABLE fill_table_avx512
#include "kernels.h"
