#!/usr/bin/env bash
# The one script for a lent GPU: prints the machine and versions, builds sparsecode with its
# CUDA kernels, runs the tests marked gpu, runs the GPU benchmarks, and ends with the results
# table and a one-line summary of the stages.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh [build|tests|bench|profile|ncu]
#
# With a stage name it runs only that stage (for a rerun on a machine that already built).
# Files written to $OUT: gpu_tests.log, gpu_bench.log, gpu_results.md, gpu_profile.log, and
# logs.tar.gz holding env.txt, build.log, build_system_gxx.log (only if a rebuild was needed)
# and gpu_errors.log (the device tool brings back at most 8 files).
# The ncu stage, last in the full run (about 40 s on an H200), profiles one launch of each hot
# kernel with Nsight Compute (benchmarks/gpu_ncu.py): gpu_ncu.log (its sections, per kernel),
# gpu_ncu_raw.csv (every metric collected, warp stall reasons among them) and
# gpu_ncu_source.csv (the CUDA-core per-latent sums' SASS, line by line, with the warp stall
# samples of each instruction).
# A failing stage does not stop the later ones. Each stage has a time limit (BUILD_TIMEOUT,
# TESTS_TIMEOUT, BENCH_TIMEOUT, PROFILE_TIMEOUT, NCU_TIMEOUT seconds), and no stage runs past
# TOTAL_TIMEOUT seconds from the start, so that the whole script ends inside one 10-minute call.

set -u
cd "$(dirname "$0")/.." || exit 1

STAGE="${1:-all}"
case "$STAGE" in
  all | build | tests | bench | profile | ncu) ;;
  *) echo "usage: OUT=folder bash benchmarks/gpu_check.sh [build|tests|bench|profile|ncu]" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-240}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-200}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-90}"
NCU_TIMEOUT="${NCU_TIMEOUT:-180}"
TOTAL_TIMEOUT="${TOTAL_TIMEOUT:-570}"
export PYTHONUNBUFFERED=1
SUMMARY=()

# run_stage NAME LIMIT LOG COMMAND...: runs COMMAND with its output in LOG, stopped with SIGINT
# (so pytest still prints its summary) after LIMIT seconds or when the total budget runs out.
run_stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((TOTAL_TIMEOUT - SECONDS - 15))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 20)); then
    echo "== $name: skipped, out of time"
    SUMMARY+=("$name: skipped (out of time)")
    return 1
  fi
  echo "== $name (limit ${limit}s, log $log): $*"
  local start=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - start)) verdict
  if ((rc == 0)); then
    verdict="ok"
  elif ((rc == 124)); then
    verdict="TIMED OUT"
  else
    verdict="FAILED (exit $rc)"
  fi
  echo "== $name: $verdict in ${took}s"
  SUMMARY+=("$name: $verdict, ${took}s")
  return $rc
}

{
  echo "== nvidia-smi"
  nvidia-smi
  echo "== versions"
  "$PYTHON" --version
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, '(CUDA', torch.version.cuda, ') triton', triton.__version__, '| device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible')"
  if command -v nvcc >/dev/null; then nvcc --version | grep -i release; else echo "nvcc: not on PATH"; fi
  cmake --version | head -n 1
  echo "ninja $(ninja --version)"
} 2>&1 | tee "$OUT/env.txt"

BUILD=("$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . -Ccmake.define.SPARSECODE_CUDA=ON)

# extension_ok LOG: whether the built extension links the shared libstdc++ and raises (rather
# than crashing) on an argument check whose message formats a number; output appended to LOG.
extension_ok() {
  "$PYTHON" -m pytest tests/test_extension_build.py -q -rfE -p no:cacheprovider >>"$1" 2>&1
}

# link_report LOG: how the compiler driver links a shared object, and what the extension needs.
link_report() {
  {
    echo "== CXX=${CXX:-unset} CC=${CC:-unset} CUDAHOSTCXX=${CUDAHOSTCXX:-unset}"
    local cxx=${CXX:-g++}
    file "$(command -v "$cxx")" 2>&1
    if file "$(command -v "$cxx")" | grep -q text; then head -c 3000 "$(command -v "$cxx")"; fi
    echo "== $cxx -### -shared"
    "$cxx" -### -shared -x c++ /dev/null -o /tmp/probe.so 2>&1 | tail -n 3
    local so
    so=$("$PYTHON" -c "import sparsecode._C as m; print(m.__file__)" 2>&1)
    echo "== $so"
    readelf -d "$so" | grep -E "NEEDED|RUNPATH|RPATH"
    echo "locale symbols defined in it: $(nm -C --defined-only "$so" 2>/dev/null | grep -c 'std::locale')"
    ls -l /usr/bin/g++* /usr/bin/gcc* 2>&1
  } >>"$1" 2>&1
}

if [[ "$STAGE" == all || "$STAGE" == build ]]; then
  run_stage build "$BUILD_TIMEOUT" "$OUT/build.log" "${BUILD[@]}" || tail -n 40 "$OUT/build.log"
  if ! extension_ok "$OUT/build.log"; then
    # The image's CXX once put a private libstdc++ into the extension, which crashed every error
    # message that formatted a number (see tests/test_extension_build.py). Report how it links,
    # then rebuild with the system's own g++.
    echo "== the extension fails tests/test_extension_build.py; link report in $OUT/build.log"
    link_report "$OUT/build.log"
    if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then
      rm -rf build
      CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++ \
        run_stage "build (system g++)" "$BUILD_TIMEOUT" "$OUT/build_system_gxx.log" "${BUILD[@]}" \
        || tail -n 40 "$OUT/build_system_gxx.log"
      CXX=/usr/bin/g++ link_report "$OUT/build_system_gxx.log"
      if extension_ok "$OUT/build_system_gxx.log"; then
        echo "== rebuilt with /usr/bin/g++: the extension passes tests/test_extension_build.py"
      else
        echo "== still failing with /usr/bin/g++"
      fi
      tail -n 25 "$OUT/build_system_gxx.log"
    fi
  fi
  tail -n 25 "$OUT/build.log"
fi

echo "== sparsecode.backends()"
"$PYTHON" -c "import sparsecode; print(sparsecode.backends())" 2>&1 | tee -a "$OUT/env.txt"

if [[ "$STAGE" == all || "$STAGE" == tests ]]; then
  # tests/test_lm.py needs transformer_lens, which the GPU image lacks; the gpu tests do not.
  collection=(--continue-on-collection-errors)
  "$PYTHON" -c "import transformer_lens" 2>/dev/null || collection+=(--ignore=tests/test_lm.py)
  run_stage tests "$TESTS_TIMEOUT" "$OUT/gpu_tests.log" \
    "$PYTHON" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --durations=15 "${collection[@]}" \
    --ignore=tests/test_cuda_errors.py
  tail -n 45 "$OUT/gpu_tests.log"
  # The argument checks run in a process of their own: a crash there (seen when the extension
  # carried its own static libstdc++, see tests/test_extension_build.py) must not take the
  # other tests down.
  run_stage "tests (argument checks)" 90 "$OUT/gpu_errors.log" \
    "$PYTHON" -m pytest tests/test_cuda_errors.py tests/test_extension_build.py -q -rfEs \
    -p no:cacheprovider
  tail -n 5 "$OUT/gpu_errors.log"
fi

if [[ "$STAGE" == all || "$STAGE" == bench ]]; then
  rm -f "$OUT/gpu_results.md"
  export SPARSECODE_GPU_RESULTS="$OUT/gpu_results.md"
  run_stage bench "$BENCH_TIMEOUT" "$OUT/gpu_bench.log" \
    "$PYTHON" -m pytest benchmarks/test_gpu.py -q -s -rfE -p no:cacheprovider
  grep -E "^(FAILED|ERROR)| (passed|failed|skipped|errors?) " "$OUT/gpu_bench.log" | tail -n 15
  echo
  if [[ -f "$OUT/gpu_results.md" ]]; then
    cat "$OUT/gpu_results.md"
  else
    echo "no results table was written; the end of $OUT/gpu_bench.log:"
    tail -n 40 "$OUT/gpu_bench.log"
  fi
fi

if [[ "$STAGE" == all || "$STAGE" == profile ]]; then
  run_stage profile "$PROFILE_TIMEOUT" "$OUT/gpu_profile.log" "$PYTHON" benchmarks/gpu_profile.py
fi

if [[ "$STAGE" == all || "$STAGE" == ncu ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
  KERNELS='regex:_encode_kernel|_decode_kernel|latent_rows_sum_kernel|latent_rows_sum_mma_kernel|nested_prefix_mma_kernel|_forward_kernel|_suffix_kernel|topk_fold_kernel'
  SECTIONS=()
  for s in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats \
    ComputeWorkloadAnalysis MemoryWorkloadAnalysis InstructionStats SourceCounters; do
    SECTIONS+=(--section "$s")
  done
  run_stage ncu "$NCU_TIMEOUT" "$OUT/gpu_ncu.log" "$NCU" --clock-control none \
    --kernel-name "$KERNELS" "${SECTIONS[@]}" -o "$OUT/kernels" -f "$PYTHON" benchmarks/gpu_ncu.py
  if [[ -f "$OUT/kernels.ncu-rep" ]]; then
    "$NCU" --import "$OUT/kernels.ncu-rep" --page details >>"$OUT/gpu_ncu.log" 2>&1
    "$NCU" --import "$OUT/kernels.ncu-rep" --page raw --csv >"$OUT/gpu_ncu_raw.csv" 2>&1
    # Which instructions of the per-latent sums wait, and on what: the transposed sum took
    # twice the plain one's time in run 4. Every kernel's if the filter is refused on import;
    # capped below the 16 MiB a file that comes back.
    source_tmp=$(mktemp)
    SOURCE=(--page source --print-source sass --csv)
    "$NCU" --import "$OUT/kernels.ncu-rep" --kernel-name regex:latent_rows_sum_kernel \
      "${SOURCE[@]}" >"$source_tmp" 2>&1 \
      || "$NCU" --import "$OUT/kernels.ncu-rep" "${SOURCE[@]}" >"$source_tmp" 2>&1
    head -c 15000000 "$source_tmp" >"$OUT/gpu_ncu_source.csv"
    rm -f "$source_tmp"
    rm -f "$OUT/kernels.ncu-rep"
    grep -E "^  [a-z_]|Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Registers Per|Achieved Occupancy|Memory Throughput|L2 Hit" \
      "$OUT/gpu_ncu.log" | head -n 120
  fi
fi

# The smaller logs in one archive, so that every file fits the 8 that come back.
logs=()
for f in env.txt build.log build_system_gxx.log gpu_errors.log; do
  if [[ -f "$OUT/$f" ]]; then logs+=("$f"); fi
done
if ((${#logs[@]} > 0)) && tar -czf "$OUT/logs.tar.gz" -C "$OUT" "${logs[@]}"; then
  (cd "$OUT" && rm -f "${logs[@]}")
fi

echo
echo "== summary after ${SECONDS}s: $(printf '%s; ' "${SUMMARY[@]}")"
