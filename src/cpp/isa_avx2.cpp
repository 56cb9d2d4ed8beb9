// AVX2 + FMA instantiation of every rule (8 x fp32, 4 x fp64). Compiled with -mavx2 -mfma
// (CMakeLists.txt, this file's shards only); selected at run time only when CPUID reports both.
#define FO_VEC_F32 F32x8
#define FO_VEC_F64 F64x4
#define FO_FILL_TABLE fill_table_avx2
#include "kernels.h"
