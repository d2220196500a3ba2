#!/bin/bash
# Throughput of a CKF step on the 1B shape (issue 17), in one device call of at most 8 minutes:
#
#   bash benchmarks/gpu_throughput.sh OUT          # on the GPU machine; carry .gpu/whl (ray, deepspeed, omegaconf)
#   bash benchmarks/gpu_throughput.sh OUT --cpu    # here, first: the same runs with the tiny model on CPU
#
# A random-init LLaMA of the 1B shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192; the tiny model's
# BPE vocabulary: no weights to carry) under the real pipeline (`python -m ckf_dist.profile`: Ray Data streaming,
# Ray Train, DeepSpeed bf16, mixed 4-task batches of the built-in data), one variant per run, each under its own
# time limit (GT_RUN_S=70 s), in this order: ZeRO-3 + Triton Multi-LoRA, ZeRO-3 + torch Multi-LoRA, ZeRO-2 +
# Triton, ZeRO-2 + Triton + packing, ZeRO-2 + Triton + eager attention; then benchmarks/bench_vs_peft.py (the CKF
# step vs HF transformers + peft, same shape and tokens; GT_PEFT_S=60 s). Writes to OUT: throughput.{json,md,png}
# (benchmarks/throughput_table.py), peft.json, profiles.tgz (each variant's profile.json) and summary.txt: 6 files,
# under the device's limit of 8 coming back.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_lib.sh
[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 2; }
OUT=$(realpath -m "$1"); MODE=${2:-gpu}
mkdir -p "$OUT"
START=$SECONDS
TOTAL=${GT_TOTAL_S:-465}
RUN_S=${GT_RUN_S:-70}
export PYTHONUNBUFFERED=1 CKF_LORA_AUTOTUNE=0  # heuristic kernel configs: autotuning would compile for minutes
: > "$OUT/summary.txt"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( TOTAL - (SECONDS - START) )); }

COMMON=(data.path=/tmp/ckf_gt/data cf.embeddings_path=/tmp/ckf_gt/cf checkpoint.storage_path=/tmp/ckf_gt/runs
        checkpoint.run_name=gt ray.num_workers=1 profile.warmup_steps=3 profile.steps=6 profile.trace_steps=0)
if [ "$MODE" = --cpu ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  COMMON+=(training.batch_size=8 ray.use_gpu=false)
  TRITON=torch  # the Triton kernels run on CPU only in the interpreter, far too slow for a model
  PEFT=(--tiny)
else
  use_wheels "${GT_WHEELS:-.gpu/whl}" "ray deepspeed omegaconf"
  COMMON+=(model.tiny.hidden_size=2048 model.tiny.num_layers=16 model.tiny.num_heads=32 model.tiny.num_kv_heads=8
           model.tiny.intermediate_size=8192 training.batch_size=32 ray.use_gpu=true)
  TRITON=triton
  PEFT=()
fi
summary "env: $({ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "no GPU"; python3 -c "import torch; print('torch', torch.__version__)"; date -u +%FT%TZ; } | tr '\n' ' ')"

VARIANTS=(zero3-triton zero3-torch zero2-triton zero2-triton-packed zero2-triton-eager)
declare -A ARGS=(
  [zero3-triton]="deepspeed.zero_stage=3 lora.impl=$TRITON"
  [zero3-torch]="deepspeed.zero_stage=3 lora.impl=torch"
  [zero2-triton]="deepspeed.zero_stage=2 lora.impl=$TRITON"
  [zero2-triton-packed]="deepspeed.zero_stage=2 lora.impl=$TRITON training.packing=true"
  [zero2-triton-eager]="deepspeed.zero_stage=2 lora.impl=$TRITON model.attn_implementation=eager"
)
for v in "${VARIANTS[@]}"; do
  limit=$(( $(left) < RUN_S ? $(left) : RUN_S ))
  # the first run also prepares the data and trains the CF embeddings: give it the time of two
  [ "$v" = "${VARIANTS[0]}" ] && limit=$(( $(left) < 2 * RUN_S ? $(left) : 2 * RUN_S ))
  (( limit > 15 )) || { summary "$v: skipped (no time left)"; continue; }
  mkdir -p "$OUT/$v"; t0=$SECONDS
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=15 "$limit" python3 -m ckf_dist.profile "${COMMON[@]}" ${ARGS[$v]} \
    profile.out="$OUT/$v" > "/tmp/ckf_gt_$v.log" 2>&1
  rc=$?
  rm -f "$OUT/$v/profile.png" "$OUT/$v/trace.json"
  summary "$v: exit $rc in $((SECONDS - t0)) s (limit $limit s): $(grep -h 'MFU' /tmp/ckf_gt_$v.log | tail -n 1)"
  [ $rc -eq 0 ] || tail -n 20 "/tmp/ckf_gt_$v.log"
done
limit=$(( $(left) < ${GT_PEFT_S:-60} ? $(left) : ${GT_PEFT_S:-60} ))
if (( limit > 15 )); then
  timeout --signal=INT --kill-after=15 "$limit" python3 benchmarks/bench_vs_peft.py "${PEFT[@]}" --json "$OUT/peft.json" \
    > /tmp/ckf_gt_peft.log 2>&1
  summary "peft: exit $? : $(grep -h 'HF + peft tokens/s' /tmp/ckf_gt_peft.log | tail -n 1)"
else
  summary "peft: skipped (no time left)"
fi
python3 benchmarks/throughput_table.py "$OUT" "${VARIANTS[@]}" peft
# 8 files at most come back from the device: the variants' full reports travel as one archive
tar -czf "$OUT/profiles.tgz" -C "$OUT" "${VARIANTS[@]}" 2>/dev/null && (cd "$OUT" && rm -rf "${VARIANTS[@]}")
summary "total $((SECONDS - START)) s"
cat "$OUT/summary.txt"
