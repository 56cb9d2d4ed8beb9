#!/usr/bin/env bash
# Runs the pytest suite against a build of _core instrumented with AddressSanitizer and
# UndefinedBehaviorSanitizer, and fails on any sanitizer report.
#
#   tools/sanitize.sh                             # the whole suite (pyproject testpaths)
#   tools/sanitize.sh tests/test_threads.py -x    # any pytest arguments, passed through
#   tools/sanitize.sh -k "not misaligned"         # e.g. leave out a known finding
#
# What it runs: every test that a plain `pytest` runs, except the peak-RSS test (deselected
# always, see rss_test below). Measured on 2 cores shared with other builds, scalar and AVX-512
# paths only: the build 22 minutes, the suite 6 minutes (28 in all), when the suite was smaller;
# on a later 2-vCPU Zen 4 with the same paths plus avx512bf16, the build about 45 minutes and
# the suite 20 (13,868 tests passed).
#
# The build (CUDA off; -O1 -g1 and the sanitizers) goes to build/sanitize/cmake. Instrumented,
# the kernels' translation units compile 10-20x slower than a plain build (measured on one shard:
# 7 s plain, 139 s with ASan + UBSan at -O3, 50 s at -O1), so the first build takes tens of
# minutes on 2 cores. FASTOPTIM_SANITIZE_CMAKE_ARGS adds CMake arguments, e.g.
# "-DFASTOPTIM_NO_AVX2=ON -DFASTOPTIM_NO_AVX512BF16=ON" builds (and tests) only the scalar and
# AVX-512 paths, in about half the time; the tests of the left-out ISAs then skip.
# The module is written next to symlinks of python/fastoptim/*.py in build/sanitize/pkg/,
# which goes first on PYTHONPATH, so the normal dev build in python/fastoptim is not touched.
# Python is not instrumented: libasan (and libstdc++, see below) are LD_PRELOADed. Leak
# detection is off: CPython and the pool's never-destroyed singletons keep memory by design.
#
# How reports are caught: both sanitizers stop at the first error with abort() (halt_on_error,
# abort_on_error), so the process that hit it dies and pytest's faulthandler prints the Python
# stack, which names the test. ASan writes its reports to build/sanitize/reports/ (log_path),
# from every process, subprocesses and forked children included. UBSan's log_path is not
# honoured next to a preloaded libasan (GCC 12), so its reports go to fd 2; pytest runs with
# --capture=sys so that they are not swallowed with the aborted test's captured output, and
# the pytest output, kept in build/sanitize/pytest.log, is searched for sanitizer messages. A
# UBSan error in a subprocess that a test runs shows up there when that test fails and prints
# the child's stderr (the tests that run subprocesses assert on their exit status).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/sanitize"
pkg="$out/pkg/fastoptim"
mkdir -p "$out" "$pkg"
exec 9>"$out/.lock"
flock 9

# -g1 (line tables only): reports keep file:line; full -g made the assembler of the vector
# units need 12 GB.
sanitize="-fsanitize=address,undefined -fno-omit-frame-pointer -g1"
pybind11_dir=$(python3 -m pybind11 --cmakedir)
cmake -S "$root" -B "$out/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$pybind11_dir" -DPython_EXECUTABLE="$(command -v python3)" \
  -DFASTOPTIM_CUDA=OFF -DFASTOPTIM_DEV_OUTPUT_DIR="$pkg" -DFASTOPTIM_OPT=-O1 \
  -DCMAKE_CXX_FLAGS="$sanitize" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  ${FASTOPTIM_SANITIZE_CMAKE_ARGS:-} >/dev/null
cmake --build "$out/cmake" -j2

# The Python sources, as symlinks so that edits are picked up without a rebuild.
find "$pkg" -maxdepth 1 -name '*.py' -delete
for f in "$root"/python/fastoptim/*.py; do ln -s "$f" "$pkg/"; done

# The peak-RSS test measures allocator behaviour, which ASan's quarantine changes (freed memory
# is held back), so it cannot pass here; it is always deselected.
rss_test="tests/test_optim.py::test_peak_rss_does_not_grow_over_1000_steps"
markers='runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed|SUMMARY: [A-Za-z]+Sanitizer'
# libstdc++ is preloaded too: python3 does not link it, and without it ASan cannot find the
# real __cxa_throw when it starts ("CHECK failed: ... real___cxa_throw") at the first C++ throw.
libasan=$(gcc -print-file-name=libasan.so)
libstdcxx=$(gcc -print-file-name=libstdc++.so.6)
for lib in "$libasan" "$libstdcxx"; do
  [[ -f "$lib" ]] || { echo "sanitize.sh: $lib not found (gcc -print-file-name)" >&2; exit 2; }
done
logs="$out/reports"
rm -rf "$logs"
mkdir -p "$logs"

status=0
(
  cd "$root"
  export LD_PRELOAD="$libasan $libstdcxx"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$logs/asan"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:abort_on_error=1"
  export PYTHONPATH="$out/pkg${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c 'import fastoptim, sys; sys.exit("build/sanitize" not in fastoptim._core.__file__)'
  # --capture=sys: a report written to fd 2 must reach the log even when the process aborts.
  python3 -m pytest -p no:cacheprovider -q --capture=sys --deselect "$rss_test" "$@"
) 2>&1 | tee "$out/pytest.log" || status=$?

found=0
for r in "$logs"/*; do
  [[ -e "$r" ]] || continue
  echo "===== ASan report ${r#"$root"/}"
  cat "$r"
  found=1
done
if grep -qE "$markers" "$out/pytest.log"; then
  echo "===== sanitizer messages in ${out#"$root"/}/pytest.log:"
  grep -nE "$markers" "$out/pytest.log" | head -20
  found=1
fi
if (( found )); then
  echo "sanitize.sh: sanitizer report(s) above (status $status)" >&2
  exit 1
fi
exit "$status"
