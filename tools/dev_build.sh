#!/usr/bin/env bash
# Developer build: compiles the _core extension into python/fastoptim/ so that
# `PYTHONPATH=python python3 -m pytest tests` works without installing.
# Serialised with flock so parallel callers never share a half-written build dir.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/build"
exec 9>"$root/build/.dev_build.lock"
flock 9
pybind11_dir=$(python3 -m pybind11 --cmakedir)
cmake -S "$root" -B "$root/build/dev" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$pybind11_dir" -DPython_EXECUTABLE="$(command -v python3)" \
  -DFASTOPTIM_DEV_OUTPUT_DIR="$root/python/fastoptim" ${FASTOPTIM_CMAKE_ARGS:-} >/dev/null
cmake --build "$root/build/dev" -j2
