// plan_hooks.h: test hooks of the CUDA launch plan, compiled by the host compiler into every
// build of _core (with or without CUDA).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "../cpp/launch_plan.h"

namespace fastoptim {
namespace cuda {

// Defines _core._plan_coverage (tests/test_launch_plan.py). _core._emulate_kernel, where CUDA
// is built, is defined by bindings.cpp (it validates like any call) over cuda::emulate.
void def_plan_hooks(pybind11::module_& m);

// The launcher's plan (plan::make_plan) with chunk, block and grid overridden where > 0.
plan::LaunchPlan geometry(int64_t total, int64_t n, unsigned slot_mask, int sm_count, int64_t chunk,
                          int64_t block, int64_t grid);

}  // namespace cuda
}  // namespace fastoptim
