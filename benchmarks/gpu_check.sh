#!/usr/bin/env bash
# One GPU run of relkd, every log under OUTDIR:
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]
#
# Stages (default: all, in this order):
#   info        nvidia-smi, the commit, torch / CUDA versions      -> nvidia-smi.txt, commit.txt, env.txt
#   build       MAX_JOBS=16 build of relkd._C with its CUDA kernels -> build.log, relkd-info.txt
#   test        pytest -v of the CUDA tests (tests/test_cuda.py)  -> pytest-cuda.log
#   test-all    pytest of the whole suite (CPU, emulated, CUDA; ~15 minutes on 2 cores,
#               so a call of its own)                              -> pytest-all.log
#   sanitize    compute-sanitizer memcheck and racecheck on benchmarks/cuda_smoke.py
#                                                                  -> memcheck.log, racecheck.log
#   bench-fp32  bench.py --device cuda, losses at N=1024..65536, D=512, float32, and
#               similarity_topk 8192 x 1,000,000, D=512, k=100   -> bench-fp32.json/.md, .log
#   bench-bf16  the same losses in bfloat16                         -> bench-bf16.json/.md, .log
#   bench-tc    RELKD_TENSOR_CORES=auto, matmul precision medium (the bf16 mma kernels,
#               opt-in until validated): CCKD, EKD, RKD, RAD fused (float32) beside the
#               GEMM floor, and similarity_topk
#               8192 x 1,000,000, D=512, k=100         -> bench-tc.json/.md, bench-tc-topk.*, .log
#   bench-tc-bf16  RELKD_TENSOR_CORES=auto, bfloat16 inputs (the CUDA-speed issue's targets):
#               CCKD, EKD, RKD, RAD at N=8192 and 32768, D=512: fused, eager, GEMM floor
#                                                          -> bench-tc-bf16.json/.md, .log
#   bench-tc-fp16  the same with float16 inputs (fp16 mma)  -> bench-tc-fp16.json/.md, .log
#   bench-tc-tf32  RELKD_TENSOR_CORES=auto, float32 at matmul precision high (TF32 mma)
#               and highest (3xTF32): CCKD, EKD, RKD, RAD fused beside the GEMM floor
#                                             -> bench-tc-tf32.*, bench-tc-3xtf32.* (.json/.md/.log)
#   tune        the tensor-core kernels' constants: per RELKD_MMA_DEPTH x
#               RELKD_MMA_STAGES variant (RELKD_TUNE_VARIANTS, default "64x2 64x2-tall
#               64x2-square"; "-square": RELKD_MMA_WIDE=0, 64 x 64 sub-tiles with 16 x 32
#               warps everywhere; "-tall": RELKD_SELECT_ROWS=128, EKD's selection in
#               128 x 128 sub-tiles with 32 x 64 warps; about 2 minutes each, so that one
#               call stays within 10 minutes: "64x3 32x4" in a second call adds to
#               tune.md) a build and
#               CCKD, EKD, RKD, RAD at N=8192,
#               D=512, bf16, and similarity_topk 8192 x 1,000,000 bf16, then the
#               default build again     -> tune-*.json/.log, tune.md (benchmarks/tune_table.py)
#   plot        benchmarks/plot.py: time vs N, log-log, of each bench-*.json present
#               (needs matplotlib; plot.py can also run later, on any machine) -> bench-*.png
#
# Every stage builds first if needed (incremental), so a stage can run on a
# fresh machine. The device tool limits one command to 10 minutes and a
# session to 30: run the stages in a few calls, most needed first ("info
# build test", "sanitize", "bench-tc-bf16", "bench-fp32 bench-bf16", the
# other bench stages, "tune", "test-all", "plot"), and copy OUTDIR to
# benchmarks/results/<date>-<gpu>/. The machine has no .git: pass the
# commit as RELKD_COMMIT=$(git rev-parse HEAD).
# A stage's failure is recorded in OUTDIR/summary.txt and the next stages run.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [info build test test-all sanitize bench-fp32 bench-bf16 bench-tc bench-tc-bf16 bench-tc-fp16 bench-tc-tf32 tune plot]}
shift
stages=${*:-info build test sanitize bench-fp32 bench-bf16 bench-tc bench-tc-bf16 bench-tc-fp16 bench-tc-tf32 test-all plot}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Logs written as they come: a call the device tool stops at its time limit
# still brings back what ran before.
export PYTHONUNBUFFERED=1

record() {  # record NAME STATUS
  echo "$(date -u +%FT%TZ) $1 exit $2" | tee -a "$out/summary.txt"
}

run_logged() {  # run_logged NAME LOGFILE COMMAND...: the command's output to the log
  local name=$1 log=$2
  shift 2
  echo "== $name: $*" | tee "$out/$log"
  "$@" >> "$out/$log" 2>&1
  local status=$?
  record "$name" "$status"
  return "$status"
}

build() {
  if [ -f "$out/.built" ] && $PYTHON -c "import relkd, sys; sys.exit('cuda' not in relkd.ops.fused_devices())" 2>/dev/null; then
    return 0
  fi
  # Editable: the extension lands in the source tree, which the tests import.
  run_logged build build.log env MAX_JOBS=${MAX_JOBS:-16} RELKD_FORCE_CUDA=1 RELKD_PTXAS_VERBOSE=1 \
    $PYTHON -m pip install --no-build-isolation --no-deps -v -e . && touch "$out/.built"
  $PYTHON -m relkd > "$out/relkd-info.txt" 2>&1
}

for stage in $stages; do
  case $stage in
    info)
      nvidia-smi > "$out/nvidia-smi.txt" 2>&1; record nvidia-smi $?
      { echo "${RELKD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
        git status --short 2>/dev/null; } > "$out/commit.txt"
      $PYTHON -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version()); print(torch.cuda.get_device_name())" > "$out/env.txt" 2>&1
      (command -v nvcc && nvcc --version; command -v compute-sanitizer) >> "$out/env.txt" 2>&1
      ;;
    build)
      build
      ;;
    test)
      build
      # A test still running after 4 minutes prints every thread's stack into the
      # log (a hung kernel shows which test and call it is).
      run_logged pytest-cuda pytest-cuda.log $PYTHON -m pytest -v -p no:cacheprovider \
        -o faulthandler_timeout=240 tests/test_cuda.py
      ;;
    test-all)
      build
      run_logged pytest-all pytest-all.log $PYTHON -m pytest -q -p no:cacheprovider tests
      ;;
    sanitize)
      build
      # Without torch's caching allocator every tensor is its own allocation,
      # so memcheck sees accesses past a tile buffer's end; only relkd's
      # kernels are instrumented (kns: a substring of the kernel name).
      run_logged memcheck memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 1 --kernel-name kns=relkd \
        $PYTHON benchmarks/cuda_smoke.py
      run_logged racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
        --kernel-name kns=relkd $PYTHON benchmarks/cuda_smoke.py
      ;;
    bench-fp32|bench-bf16)
      build
      dtype=float32
      extra=(--only all --topk-shape 8192,1000000 --topk-k 100 --chunks 65536,262144)
      if [ "$stage" = bench-bf16 ]; then dtype=bfloat16; extra=(--only losses); fi
      run_logged "$stage" "$stage.log" $PYTHON benchmarks/bench.py --device cuda --dtype "$dtype" \
        --sizes 1024,8192,32768,65536 --dim 512 "${extra[@]}" --json "$out/$stage.json"
      # bench.py prints its Markdown tables on stdout, progress on stderr (both in the log).
      sed -n '/^relkd .* benchmark:/,$p' "$out/$stage.log" > "$out/$stage.md"
      ;;
    bench-tc)
      build
      # auto + medium: relkd's bf16 mma kernels, and torch.mm (the gradient
      # products of the tile path, the floor) on tensor cores too.
      run_logged bench-tc bench-tc.log env RELKD_TENSOR_CORES=auto $PYTHON benchmarks/bench.py \
        --device cuda --dtype float32 --matmul-precision medium --only losses \
        --losses cckd,ekd,rkd,rad --sizes 8192,32768 --dim 512 --backends fused,gemm \
        --no-compile --json "$out/bench-tc.json"
      sed -n '/^relkd .* benchmark:/,$p' "$out/bench-tc.log" > "$out/bench-tc.md"
      run_logged bench-tc-topk bench-tc-topk.log env RELKD_TENSOR_CORES=auto $PYTHON \
        benchmarks/bench.py --device cuda --dtype float32 --matmul-precision medium \
        --only topk --topk-shape 8192,1000000 \
        --topk-k 100 --dim 512 --backends fused,gemm --json "$out/bench-tc-topk.json"
      sed -n '/^relkd .* benchmark:/,$p' "$out/bench-tc-topk.log" > "$out/bench-tc-topk.md"
      ;;
    bench-tc-bf16|bench-tc-fp16)
      build
      dtype=bfloat16
      [ "$stage" = bench-tc-fp16 ] && dtype=float16
      run_logged "$stage" "$stage.log" env RELKD_TENSOR_CORES=auto $PYTHON \
        benchmarks/bench.py --device cuda --dtype "$dtype" --only losses \
        --losses cckd,ekd,rkd,rad --sizes 8192,32768 --dim 512 --backends fused,reference,gemm \
        --no-compile --json "$out/$stage.json"
      sed -n '/^relkd .* benchmark:/,$p' "$out/$stage.log" > "$out/$stage.md"
      ;;
    bench-tc-tf32)
      build
      for precision in high highest; do  # TF32, 3xTF32
        name=bench-tc-tf32
        [ "$precision" = highest ] && name=bench-tc-3xtf32
        run_logged "$name" "$name.log" env RELKD_TENSOR_CORES=auto $PYTHON benchmarks/bench.py \
          --device cuda --dtype float32 --matmul-precision "$precision" --only losses \
          --losses cckd,ekd,rkd,rad --sizes 8192,32768 --dim 512 --backends fused,gemm \
          --no-compile --json "$out/$name.json"
        sed -n '/^relkd .* benchmark:/,$p' "$out/$name.log" > "$out/$name.md"
      done
      ;;
    tune)
      for variant in ${RELKD_TUNE_VARIANTS:-64x2 64x2-tall 64x2-square}; do
        pair=${variant%-*} wide=1 select_rows=64
        case $variant in
          *-square) wide=0 ;;
          *-tall) select_rows=128 ;;
          *-*) echo "unknown tune variant $variant" >&2; continue ;;
        esac
        depth=${pair%x*} steps=${pair#*x}
        rm -f "$out/.built"  # whatever this builds, later stages rebuild the default
        run_logged "tune-build-$variant" "tune-build-$variant.log" env MAX_JOBS=${MAX_JOBS:-16} \
          RELKD_FORCE_CUDA=1 RELKD_PTXAS_VERBOSE=1 RELKD_MMA_DEPTH="$depth" \
          RELKD_MMA_STAGES="$steps" RELKD_MMA_WIDE="$wide" RELKD_SELECT_ROWS="$select_rows" \
          $PYTHON -m pip install --no-build-isolation --no-deps -v -e . \
          || continue
        $PYTHON -m relkd >> "$out/tune-build-$variant.log" 2>&1
        run_logged "tune-$variant" "tune-$variant.log" env RELKD_TENSOR_CORES=auto $PYTHON \
          benchmarks/bench.py --device cuda --dtype bfloat16 --only losses \
          --losses cckd,ekd,rkd,rad --sizes 8192 --dim 512 --backends fused,gemm --no-compile \
          --json "$out/tune-$variant.json"
        run_logged "tune-topk-$variant" "tune-topk-$variant.log" env RELKD_TENSOR_CORES=auto \
          $PYTHON benchmarks/bench.py --device cuda --dtype bfloat16 --only topk \
          --topk-shape 8192,1000000 --topk-k 100 --dim 512 --backends fused,gemm \
          --json "$out/tune-topk-$variant.json"
      done
      runs=$(ls "$out"/tune-*x*.json 2>/dev/null)
      [ -n "$runs" ] && run_logged tune-table tune-table.log sh -c \
        "$PYTHON benchmarks/tune_table.py $runs > '$out/tune.md'"
      build
      ;;
    plot)
      for run in "$out"/bench-fp32.json "$out"/bench-bf16.json "$out"/bench-tc.json \
                 "$out"/bench-tc-bf16.json "$out"/bench-tc-fp16.json "$out"/bench-tc-tf32.json \
                 "$out"/bench-tc-3xtf32.json; do
        [ -f "$run" ] || continue
        name=$(basename "$run" .json)
        run_logged "plot-$name" "plot-$name.log" $PYTHON benchmarks/plot.py "$run" \
          --out "$out/$name.png"
      done
      ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2
      ;;
  esac
done
