# src/cuda/cuda.cmake: the CUDA backend of _core, included by the top CMakeLists.txt.
#
#   -DFASTOPTIM_CUDA=AUTO  (default) build it when check_language(CUDA) finds a working nvcc
#   -DFASTOPTIM_CUDA=ON    build it or fail the configure step
#   -DFASTOPTIM_CUDA=OFF   never build it (device arrays then raise TypeError)
#   -DCMAKE_CUDA_ARCHITECTURES=...   default "75-real;80-real;90": SASS for sm_75 (T4),
#                                    sm_80 (A100) and sm_90 (H100), plus compute_90 PTX that
#                                    newer GPUs (Blackwell, ...) JIT-compile at first use
#
# Either way the module gets the host-only pieces: cuda_api.h's functions (the real ones from
# cuda_backend.cu, or cuda_stub.cpp) and the launch-plan test hooks (plan_hooks.cpp).
#
# Note [runtime policy]
# The CUDA runtime is linked statically, so the module imports on a machine without a GPU
# driver, and the driver it needs is the one of the toolkit it was built with: CUDA 13.x needs
# a driver of branch r580 or newer (CUDA minor version compatibility covers all of 13.x), a
# CUDA 12.x build r525 or newer; the kernels' parameter blocks of up to 32,764 bytes (Note
# [launch groups] in src/cpp/launch_plan.h) need CUDA 12.1 and sm_70, hence nvcc >= 12.1 and no
# architecture below sm_70. A wheel for older drivers is a build with a 12.x toolkit (nothing
# in the sources depends on 13); docs/cuda.md says which driver each needs.

set(FASTOPTIM_CUDA "AUTO" CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set_property(CACHE FASTOPTIM_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${FASTOPTIM_CUDA}" _fo_cuda_mode)
if(NOT _fo_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FASTOPTIM_CUDA must be AUTO, ON or OFF (got '${FASTOPTIM_CUDA}')")
endif()

target_sources(_core PRIVATE src/cuda/plan_hooks.cpp)

set(_fo_cuda_build OFF)
if(NOT _fo_cuda_mode STREQUAL "OFF")
  # nvcc's host compiler: its default (g++ on PATH) unless CUDAHOSTCXX or
  # CMAKE_CUDA_HOST_COMPILER names one; check_language() would clear the latter, so keep it.
  if(CMAKE_CUDA_HOST_COMPILER)
    set(_fo_user_host_compiler "${CMAKE_CUDA_HOST_COMPILER}")
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES "75-real;80-real;90" CACHE STRING
        "CUDA architectures of the fastoptim kernels")
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(_fo_user_host_compiler)
    set(CMAKE_CUDA_HOST_COMPILER "${_fo_user_host_compiler}" CACHE FILEPATH "CUDA host compiler" FORCE)
    set(CMAKE_CUDA_HOST_COMPILER "${_fo_user_host_compiler}")
  endif()
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.1)
      set(_fo_cuda_why "nvcc ${CMAKE_CUDA_COMPILER_VERSION} is older than 12.1 (kernel parameters "
                       "of 32,764 bytes, Note [runtime policy])")
    else()
      set(_fo_cuda_build ON)
    endif()
  else()
    set(_fo_cuda_why "no CUDA compiler found by check_language(CUDA) "
                     "(put nvcc on PATH or set CMAKE_CUDA_COMPILER)")
  endif()
  if(NOT _fo_cuda_build)
    if(_fo_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "FASTOPTIM_CUDA=ON but the CUDA backend cannot be built: ${_fo_cuda_why}")
    endif()
    message(STATUS "fastoptim: CUDA backend not built: ${_fo_cuda_why}")
  endif()
endif()

if(_fo_cuda_mode STREQUAL "OFF")
  message(STATUS "fastoptim: CUDA backend not built (FASTOPTIM_CUDA=OFF)")
endif()
if(NOT _fo_cuda_build)
  target_sources(_core PRIVATE src/cuda/cuda_stub.cpp)
  return()
endif()

message(STATUS "fastoptim: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, host compiler "
               "${CMAKE_CUDA_HOST_COMPILER_ID} ${CMAKE_CUDA_HOST_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES})")

# The top-level options (-Wall -Wextra -ffp-contract=off ...) are gcc's: keep them for C++ only.
get_target_property(_fo_opts _core COMPILE_OPTIONS)
if(_fo_opts)
  set(_fo_cxx_opts "")
  foreach(_fo_opt IN LISTS _fo_opts)
    if(_fo_opt MATCHES "^\\$<")
      list(APPEND _fo_cxx_opts "${_fo_opt}")
    else()
      list(APPEND _fo_cxx_opts "$<$<COMPILE_LANGUAGE:CXX>:${_fo_opt}>")
    endif()
  endforeach()
  set_property(TARGET _core PROPERTY COMPILE_OPTIONS "${_fo_cxx_opts}")
endif()

# emulate.cpp: the kernel body on the CPU, a test hook compiled for every variant of every rule
# (97 of them, twice); -O0 compiles it in ~6 s instead of ~40 s at -O1, and cannot change a
# result (IEEE arithmetic, -ffp-contract=off); the emulation tests use small arrays.
target_sources(_core PRIVATE src/cuda/emulate.cpp)
set_source_files_properties(src/cuda/emulate.cpp PROPERTIES COMPILE_OPTIONS "-O0")
target_sources(_core PRIVATE src/cuda/cuda_backend.cu)
# The rules' kernels, in kShards (kernels.cuh) translation units compiled in parallel: one small
# generated file per shard that includes rules_shard.cu with FO_SHARD set. The list of rules is
# FO_RULES (src/cpp/rules.h); nothing here names one.
foreach(_fo_shard RANGE 3)
  set(_fo_shard_src "${CMAKE_CURRENT_BINARY_DIR}/fastoptim_rules_shard${_fo_shard}.cu")
  file(CONFIGURE OUTPUT "${_fo_shard_src}"
       CONTENT "#define FO_SHARD ${_fo_shard}\n#include \"${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/rules_shard.cu\"\n")
  target_sources(_core PRIVATE "${_fo_shard_src}")
endforeach()
set_target_properties(_core PROPERTIES
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_SEPARABLE_COMPILATION OFF
  CUDA_VISIBILITY_PRESET hidden)
string(REPLACE ";" "," _fo_archs "${CMAKE_CUDA_ARCHITECTURES}")
target_compile_definitions(_core PRIVATE FASTOPTIM_HAVE_CUDA=1)
# Only the file that reports it: a change of architectures must not recompile the CPU kernels.
set_source_files_properties(src/cuda/cuda_backend.cu PROPERTIES
  COMPILE_DEFINITIONS "FASTOPTIM_CUDA_ARCHS=\"${_fo_archs}\"")
# Note [bitwise identical paths] (src/cpp/vec.h): nvcc contracts a*b+c into fma by default;
# --fmad=false keeps the rules' explicit vfma the only fused operations, so a GPU thread
# rounds exactly like the scalar C++ path. Division and sqrt stay IEEE (no fast math).
# -Xfatbin=-compress-all: each kernel with the large parameter block (Note [launch groups])
# carries its ~32-39 KB constant bank image, zeros, in the cubin; compressed, the module's
# .nv_fatbin shrinks about 12x (35 MB -> ~3 MB measured); the driver decompresses once at load.
target_compile_options(_core PRIVATE
  "$<$<COMPILE_LANGUAGE:CUDA>:--fmad=false;-Xfatbin=-compress-all;-Xcompiler=-ffp-contract=off,-fno-math-errno,-Wall,-Wextra>")
