// cuda_stub.cpp: cuda_api.h for a build without the CUDA backend (FASTOPTIM_CUDA=OFF, or no
// CUDA compiler found). The bindings check built() first and reject device arrays with a
// TypeError; the other functions are never reached, and say why if they are.
#include <stdexcept>

#include "cuda_api.h"

namespace fastoptim {
namespace cuda {
namespace {
[[noreturn]] void not_built() { throw std::runtime_error("fastoptim was built without CUDA"); }
}  // namespace

bool built() { return false; }

RuntimeInfo runtime_info() {
  RuntimeInfo r;
  r.error = "fastoptim was built without CUDA";
  return r;
}

void require_device() { not_built(); }
PointerInfo pointer_info(const void*) { not_built(); }
void launch(const Launch&) { not_built(); }

}  // namespace cuda
}  // namespace fastoptim
