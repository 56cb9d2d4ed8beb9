// packed.h: the packed form of Note [packed pointers] (src/cpp/bindings.cpp), shared by
// fastoptim._core (which reads it) and fastoptim._torch_ext (which reads and writes it): n
// native 64-bit values in a bytes object, 8 bytes each, value i at byte 8 * i.
#pragma once

#include <Python.h>

#include <cstdint>
#include <cstring>

namespace fastoptim {

static_assert(sizeof(void*) == 8 && sizeof(uintptr_t) == 8, "packed pointers are 64-bit");

// Value i of the bytes object `bytes` (unaligned; the caller has checked the size).
inline uint64_t packed_at(PyObject* bytes, Py_ssize_t i) {
  uint64_t v;
  std::memcpy(&v, PyBytes_AS_STRING(bytes) + 8 * i, 8);
  return v;
}

}  // namespace fastoptim
