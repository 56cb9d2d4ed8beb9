// plan_hooks.h: test hooks of the CUDA launch plan and of the launcher's host-side decisions,
// compiled by the host compiler into every build of _core (with or without CUDA).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "../cpp/launch_plan.h"

namespace fastoptim {
namespace cuda {

// Defines _core._plan_coverage (tests/test_launch_plan.py) and _core._cuda_capture_problem,
// _core._cuda_device_switch (tests/test_cuda_host_logic.py). _core._emulate_kernel, where
// CUDA is built, is defined by bindings.cpp (it validates like any call) over cuda::emulate.
void def_plan_hooks(pybind11::module_& m);

// ValueError unless chunk, block, grid and group are >= 0 (0: the launcher's choice) and in range.
void check_geometry(int64_t chunk, int64_t block, int64_t grid, int64_t group);

// A launch's plan (plan::fill_group) with block and grid overridden where > 0.
plan::LaunchPlan override_geometry(plan::LaunchPlan p, int64_t block, int64_t grid);

}  // namespace cuda
}  // namespace fastoptim
