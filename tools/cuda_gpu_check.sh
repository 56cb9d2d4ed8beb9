#!/usr/bin/env bash
# The GPU verification of the CUDA backend (issue 12), as one prepared run: device time is
# short, so every step is here, each with its own time limit, each logged, none stopping the
# next. Usage (repository root, on a machine with a GPU, CuPy and optionally torch):
#   bash tools/cuda_gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT or ./gpu_check
# Writes OUTDIR/{env,build,tests,memcheck,memcheck_formats,racecheck,bench,bench_formats}.log,
# bench_cuda.json, bench_cuda_formats.json and summary.txt. FASTOPTIM_PREBUILT=PATH uses a _core
# module built elsewhere for this Python instead of building (pip); FASTOPTIM_CHECK_WORKERS
# sets pytest-xdist's workers (4), FASTOPTIM_BENCH_ARGS bench_cuda.py's arguments.
# Seen on an H200 machine (16 cores, 2026-12-04): the CUDA test files take ~80 s with
# pytest-xdist's -n 4 (used when installed), memcheck ~50 s, the benchmark ~40 s with
# --max-log2 28 --tensors 2000 --repeats 5 --iters 10. To save device time, CUDAARCHS=90-real
# builds the H100/H200 code only (CMake reads it); a build with every ISA takes minutes there.
set -uo pipefail
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
step() {  # step NAME SECONDS CMD...: run with a time limit, log, record the status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}
: >"$out/summary.txt"
step env 60 bash -c 'nvidia-smi; nvcc --version; python -c "import cupy; print(cupy.__version__)"; python -c "import torch; print(torch.__version__, torch.version.cuda)"'
if [ -n "${FASTOPTIM_PREBUILT:-}" ]; then
  # a module built elsewhere for this Python (FASTOPTIM_PREBUILT: its path; see docs/cuda.md,
  # "Running the check"), used from the source tree
  cp "$FASTOPTIM_PREBUILT" python/fastoptim/ && export PYTHONPATH=$PWD/python
  echo "build: prebuilt $(basename "$FASTOPTIM_PREBUILT")" | tee -a "$out/summary.txt"
else
  step build 420 pip install --no-build-isolation -v .
fi
step info 60 python -c 'import fastoptim, json; print(json.dumps(fastoptim._core.info()["cuda"], indent=1))'
xdist=""
python -c "import xdist" 2>/dev/null && xdist="-n ${FASTOPTIM_CHECK_WORKERS:-4}"
step tests 300 python -m pytest -ra -q -p no:cacheprovider $xdist tests/test_cuda.py tests/test_cuda_dlpack.py \
  tests/test_cuda_host_logic.py tests/test_cuda_build.py tests/test_launch_plan.py tests/test_torch_cuda.py \
  tests/test_cuda_formats.py
step bench_formats 240 python bench/bench_cuda_formats.py --json "$out/bench_cuda_formats.json"
if command -v compute-sanitizer >/dev/null; then
  step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 99 python -m pytest -x -q \
    -p no:cacheprovider tests/test_cuda.py -k "one_step_each_case or many_arrays or slices or graph or streams"
  step memcheck_formats 150 compute-sanitizer --tool memcheck --error-exitcode 99 python -m pytest -x -q \
    -p no:cacheprovider tests/test_cuda_formats.py -k "(gpu_options and adam-) or cupy or bad_combination"
fi
step bench 240 python bench/bench_cuda.py ${FASTOPTIM_BENCH_ARGS:-} --json "$out/bench_cuda.json"
if command -v compute-sanitizer >/dev/null; then
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 99 python -m pytest -x -q \
    -p no:cacheprovider tests/test_cuda.py -k "many_arrays_odd_sizes and adam"
else
  echo "compute-sanitizer: not installed" | tee -a "$out/summary.txt"
fi
cat "$out/summary.txt"
