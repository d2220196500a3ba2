#!/bin/bash
# The Multi-LoRA kernels' first real run (issue 12), in one device call of at most 8 minutes:
#
#   bash kernels/gpu_check.sh OUT          # on the GPU machine (torch, triton, transformers, pytest there)
#   bash kernels/gpu_check.sh OUT --cpu    # here, first: the same stages under TRITON_INTERPRET=1, tiny shapes
#
# Stages, each under its own time limit so that the call ends in time and keeps what finished:
#   1. the gpu-marked kernel tests in bf16 and fp16 (GC_TESTS_S=270 s; fp32 compiles slowly: stage 4)
#   2. the kernel benchmark at its four shapes, --json (GC_BENCH_S=150 s): ceilings, GEMM parity, every variant
#   3. the 1B-shape training step, torch vs triton, dropout 0 and 0.1 (GC_STEP_S=60 s, if time remains)
#   4. the fp32 GPU tests (whatever time is left of GC_TOTAL_S=470 s)
# Writes to OUT: summary.txt (printed last), tests_bf16_fp16.txt, bench.json, bench.txt, step.json, step.txt,
# tests_fp32.txt, env.txt (8 files at most come back from the device). The GPU machine lacks omegaconf: carry
# a wheel folder (GC_WHEELS, default .gpu/whl, built by `bash benchmarks/gpu_quality.sh prepare`).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_lib.sh
[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 2; }
OUT=$1; MODE=${2:-gpu}
mkdir -p "$OUT"
START=$SECONDS
TOTAL=${GC_TOTAL_S:-470}
left() { echo $(( TOTAL - (SECONDS - START) )); }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1

if [ "$MODE" = --cpu ]; then
  export TRITON_INTERPRET=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  SELECT=(-m "not gpu" -k "fp16 or fp32 or float16 or float32 or dispatch or tile")
  BENCH=(--tiny); STEP=(--tiny); FP32=(); FIRST="interpreter tests (fp16/fp32)"
else
  use_wheels "${GC_WHEELS:-.gpu/whl}" "omegaconf"
  SELECT=(-m gpu -k "not float32")
  BENCH=(); STEP=(); FP32=(-m gpu -k "float32"); FIRST="tests bf16+fp16"
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%FT%TZ; } > "$OUT/env.txt"
summary "env: $(tr '\n' ' ' < "$OUT/env.txt")"

stage() {  # name, limit (s), output file, command...
  local name=$1 limit=$2 file=$3; shift 3
  (( limit > 10 )) || { summary "$name: skipped (no time left)"; return; }
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$file" 2>&1
  local rc=$?
  summary "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s) -> $file: $(tail -n 1 "$OUT/$file")"
}

stage "$FIRST" "$(( $(left) < ${GC_TESTS_S:-270} ? $(left) : ${GC_TESTS_S:-270} ))" tests_bf16_fp16.txt \
  python3 -m pytest kernels/tests -q -p no:cacheprovider "${SELECT[@]}"
stage "benchmark" "$(( $(left) < ${GC_BENCH_S:-150} ? $(left) : ${GC_BENCH_S:-150} ))" bench.txt \
  python3 kernels/bench_multi_lora.py "${BENCH[@]}" --json "$OUT/bench.json"
stage "train step" "$(( $(left) < ${GC_STEP_S:-60} ? $(left) : ${GC_STEP_S:-60} ))" step.txt \
  python3 kernels/bench_train_step.py "${STEP[@]}" --json "$OUT/step.json"
if [ ${#FP32[@]} -gt 0 ]; then
  stage "tests fp32" "$(left)" tests_fp32.txt python3 -m pytest kernels/tests -q -p no:cacheprovider "${FP32[@]}"
fi
summary "total $((SECONDS - START)) s"
grep -h -E "passed|failed|error" "$OUT"/tests_*.txt | tail -n 4
[ -f "$OUT/bench.txt" ] && tail -n 25 "$OUT/bench.txt"
cat "$OUT/summary.txt"
