// AVX-512F with AVX512_BF16: the avx512 path, except that bfloat16 is stored with
// vcvtneps2bf16 (kernels.h, Note [native bf16 stores]); bitwise the same results. Only the
// formats that store bfloat16 are compiled here; dispatch.cpp takes every other entry from
// the avx512 table. Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512bf16 (CMakeLists.txt,
// this file's shards only).
#define FO_VEC_F32 F32x16
#define FO_VEC_F64 F64x8
#define FO_FILL_TABLE fill_table_avx512bf16
#define FO_FORMAT_FILTER(F) stores_bf16<F>()
#include "kernels.h"
