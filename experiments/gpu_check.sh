#!/usr/bin/env bash
# The GPU check: ResNet-50 at 224 on synthetic data, on whatever accelerator JAX sees.
#
#   bash experiments/gpu_check.sh            # 3 processes, the trainer's ResNet-50 step
#   SMOKE=1 bash experiments/gpu_check.sh    # a tiny run of the same path, e.g. on a CPU
#
# Prints tables (benchmarks.throughput, benchmarks.finetune) and appends their JSON lines to
# $OUT (default runs/gpu_check.jsonl): train images/s and `train_vs_ceiling`, the step's achieved
# FLOP/s over a 4096x4096 matmul's in the same dtype (the chip's practical matrix rate), for
# bf16 and float32; then the bf16 step at every freeze depth 0-5, interleaved, with its time
# relative to depth 0. It times the trainer's own step (cnn_arch.train.parallel_steps), so it
# needs the packages of requirements.txt; the data are synthetic (the offline digits view only
# supplies the class count).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check.jsonl}
if [ -n "${SMOKE:-}" ]; then
  SIZE=32 BATCH=8 STEPS=2 WIDTH=0.125
else
  SIZE=224 BATCH=256 STEPS=20 WIDTH=1.0
fi
FLAGS=(--config=base --model=resnet50 --image_size=$SIZE --batch=$BATCH --width=$WIDTH
       --num_classes=1000 --out="$OUT")
"$PY" -c 'import jax; print({"devices": [str(d) for d in jax.devices()], "jax": jax.__version__})'
"$PY" -m benchmarks.throughput "${FLAGS[@]}" --no_infer --dtype=bfloat16 --steps=$STEPS
"$PY" -m benchmarks.throughput "${FLAGS[@]}" --no_infer --dtype=float32 --steps=$STEPS
"$PY" -m benchmarks.finetune "${FLAGS[@]}" --dtype=bfloat16 --plans=0,1,2,3,4,5 \
  --steps=$((STEPS / 2)) --warmup=2 --rounds=3
