// Scalar C++ instantiation of every rule: the portable path and the reference for the
// vector paths (FASTOPTIM_ISA=scalar). Compiled without any -m flag.
#define FO_VEC_F32 float
#define FO_VEC_F64 double
#define FO_FILL_TABLE fill_table_scalar
#include "kernels.h"
