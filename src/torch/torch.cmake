# src/torch/torch.cmake: fastoptim._torch_ext, included by the top CMakeLists.txt.
#
#   -DFASTOPTIM_TORCH=AUTO  (default) build it when the Python that builds fastoptim has torch
#   -DFASTOPTIM_TORCH=ON    build it or fail the configure step
#   -DFASTOPTIM_TORCH=OFF   never build it
#   -DFASTOPTIM_TORCH_PYTHON=/path/to/python   ask this interpreter for torch (default: the
#                                              Python that builds fastoptim)
#
# The extension reads torch tensors' metadata in C++ for fastoptim.torch's step (Note [torch
# extension] in python/fastoptim/torch.py). It is compiled against the headers of the torch it
# finds and linked to that torch's libraries, so it is only usable with that torch version:
# fastoptim.torch loads it only when torch.__version__ equals the version it was built for,
# and otherwise (or without it) reads the same metadata through torch's Python bindings.
#
# Note [finding torch from an isolated build]
# pip builds in an isolated environment that hides the site-packages of the interpreter it
# runs (PYTHONPATH points at an overlay whose sitecustomize removes them), so torch, which is
# not a build requirement (it is optional, and a multi-GB download on a plain machine), cannot
# be imported there. The probe below runs the same interpreter without pip's PYTHONPATH and
# PYTHONNOUSERSITE, so it sees the environment fastoptim is being installed into: the torch the
# extension will run with. `pip install --no-build-isolation` finds it directly.

set(FASTOPTIM_TORCH "AUTO" CACHE STRING "Build fastoptim._torch_ext: AUTO, ON or OFF")
set_property(CACHE FASTOPTIM_TORCH PROPERTY STRINGS AUTO ON OFF)
# (Empty by default, so that a build folder reused by another environment asks that one.)
set(FASTOPTIM_TORCH_PYTHON "" CACHE FILEPATH
    "The Python whose torch fastoptim._torch_ext is built against (default: the build's)")
set(_fo_torch_python "${FASTOPTIM_TORCH_PYTHON}")
if(NOT _fo_torch_python)
  set(_fo_torch_python "${Python_EXECUTABLE}")
endif()
string(TOUPPER "${FASTOPTIM_TORCH}" _fo_torch_mode)
if(NOT _fo_torch_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FASTOPTIM_TORCH must be AUTO, ON or OFF (got '${FASTOPTIM_TORCH}')")
endif()

if(NOT _fo_torch_mode STREQUAL "OFF")
  # One line, after a marker (anything else importing torch prints stays out of it):
  # version|git version|ABI|library folder|include folders (;-separated).
  set(_fo_probe [=[
import torch, torch.utils.cpp_extension as ext
print("FASTOPTIM_TORCH_PROBE:" + "|".join([torch.__version__, str(torch.version.git_version),
      str(int(torch._C._GLIBCXX_USE_CXX11_ABI)), ext.library_paths()[0],
      ";".join(ext.include_paths())]))
]=])
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE
            "${_fo_torch_python}" -c "${_fo_probe}"
    RESULT_VARIABLE _fo_torch_rc OUTPUT_VARIABLE _fo_torch_out ERROR_VARIABLE _fo_torch_err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_fo_torch_rc EQUAL 0)
    if(_fo_torch_out MATCHES "FASTOPTIM_TORCH_PROBE:([^|\n]*)\\|([^|\n]*)\\|([01])\\|([^|\n]*)\\|([^|\n]*)")
      set(_fo_torch_version "${CMAKE_MATCH_1}")
      set(_fo_torch_git "${CMAKE_MATCH_2}")
      set(_fo_torch_abi "${CMAKE_MATCH_3}")
      set(_fo_torch_libdir "${CMAKE_MATCH_4}")
      set(_fo_torch_includes "${CMAKE_MATCH_5}")
    else()
      set(_fo_torch_rc 1)
      set(_fo_torch_err "unexpected probe output '${_fo_torch_out}'")
    endif()
  endif()
  if(_fo_torch_rc EQUAL 0)
    set(_fo_torch_libs)
    foreach(_lib torch_python torch_cpu c10)
      # (Not cached: a build folder reused by another environment looks again.)
      unset(_fo_lib_${_lib} CACHE)
      find_library(_fo_lib_${_lib} NAMES ${_lib} PATHS "${_fo_torch_libdir}" NO_DEFAULT_PATH)
      if(NOT _fo_lib_${_lib})
        set(_fo_torch_rc 1)
        set(_fo_torch_err "lib${_lib}.so not found in ${_fo_torch_libdir}")
      endif()
      list(APPEND _fo_torch_libs "${_fo_lib_${_lib}}")
      unset(_fo_lib_${_lib} CACHE)
    endforeach()
  endif()
  if(_fo_torch_rc EQUAL 0 AND _fo_torch_mode STREQUAL "AUTO")
    # AUTO must never fail the install: check first that this compiler takes torch's headers
    # (they need C++20). Compiled only, as a static library: an executable would also need
    # libpython, which an extension module does not link.
    include(CheckCXXSourceCompiles)
    set(_fo_try_type "${CMAKE_TRY_COMPILE_TARGET_TYPE}")
    set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
    set(CMAKE_REQUIRED_FLAGS "-std=c++20 -D_GLIBCXX_USE_CXX11_ABI=${_fo_torch_abi}")
    set(CMAKE_REQUIRED_INCLUDES ${_fo_torch_includes} ${Python_INCLUDE_DIRS})
    set(CMAKE_REQUIRED_QUIET ON)
    unset(_fo_torch_compiles CACHE)
    check_cxx_source_compiles([=[
#include <torch/csrc/autograd/python_variable.h>
int probe() { return THPVariableClass == nullptr; }
]=] _fo_torch_compiles)
    if(NOT _fo_torch_compiles)
      set(_fo_torch_rc 1)
      set(_fo_torch_err "this compiler does not build against its headers (C++20 needed)")
    endif()
    unset(_fo_torch_compiles CACHE)
    set(CMAKE_TRY_COMPILE_TARGET_TYPE "${_fo_try_type}")
    unset(CMAKE_REQUIRED_FLAGS)
    unset(CMAKE_REQUIRED_INCLUDES)
    unset(CMAKE_REQUIRED_QUIET)
  endif()
  if(NOT _fo_torch_rc EQUAL 0)
    if(NOT _fo_torch_err)
      set(_fo_torch_err "the probe exited with '${_fo_torch_rc}'")
    endif()
    string(STRIP "${_fo_torch_err}" _fo_torch_err)
    string(REGEX REPLACE ".*\n" "" _fo_torch_err "${_fo_torch_err}")
    if(_fo_torch_mode STREQUAL "ON")
      message(FATAL_ERROR "FASTOPTIM_TORCH=ON but ${_fo_torch_python} gives no torch: "
                          "${_fo_torch_err}")
    endif()
    message(STATUS "fastoptim: fastoptim._torch_ext not built (${_fo_torch_python} has "
                   "no usable torch: ${_fo_torch_err})")
  else()
    message(STATUS "fastoptim: fastoptim._torch_ext against torch ${_fo_torch_version}")
    Python_add_library(_torch_ext MODULE WITH_SOABI src/torch/torch_ext.cpp)
    # torch's headers need C++20 (bit-field initialisers); -isystem keeps their warnings out.
    set_target_properties(_torch_ext PROPERTIES CXX_STANDARD 20
                          BUILD_RPATH "${_fo_torch_libdir}" INSTALL_RPATH "${_fo_torch_libdir}")
    target_include_directories(_torch_ext SYSTEM PRIVATE ${_fo_torch_includes})
    target_compile_definitions(_torch_ext PRIVATE _GLIBCXX_USE_CXX11_ABI=${_fo_torch_abi}
                               FASTOPTIM_TORCH_VERSION="${_fo_torch_version}"
                               FASTOPTIM_TORCH_GIT_VERSION="${_fo_torch_git}")
    target_compile_options(_torch_ext PRIVATE -O2 -Wall -Wextra)
    target_link_libraries(_torch_ext PRIVATE ${_fo_torch_libs})
    # Note [outside runner] (src/cpp/runner.h): the extension runs fastoptim's chunks on
    # torch's OpenMP threads, through the OpenMP runtime torch ships (the same SONAME, so the
    # process keeps one runtime). A torch without libgomp beside its libraries gets no runner.
    if(EXISTS "${_fo_torch_libdir}/libgomp.so.1")
      target_compile_options(_torch_ext PRIVATE -fopenmp)
      target_compile_definitions(_torch_ext PRIVATE FASTOPTIM_TORCH_OPENMP=1)
      target_link_libraries(_torch_ext PRIVATE "${_fo_torch_libdir}/libgomp.so.1")
      message(STATUS "fastoptim: fastoptim._torch_ext runs updates on torch's OpenMP threads")
    endif()
    if(FASTOPTIM_DEV_OUTPUT_DIR)
      set_target_properties(_torch_ext PROPERTIES
                            LIBRARY_OUTPUT_DIRECTORY "${FASTOPTIM_DEV_OUTPUT_DIR}")
    else()
      install(TARGETS _torch_ext LIBRARY DESTINATION fastoptim)
    endif()
  endif()
endif()
