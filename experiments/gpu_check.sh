#!/usr/bin/env bash
# The GPU check: ResNet-50 at 224 on synthetic data, on whatever accelerator JAX sees.
#
#   bash experiments/gpu_check.sh            # 8 processes, each compiling one ResNet-50 step
#   SMOKE=1 bash experiments/gpu_check.sh    # a tiny run of the same path, e.g. on a CPU
#
# Prints one JSON line per measurement (experiments/benchmark.py): train images/s and
# `train_vs_ceiling`, the step's achieved FLOP/s over a 4096x4096 matmul's in the same dtype
# (the chip's practical matrix rate), for bf16 and float32; then the bf16 step at every freeze
# depth 0-5 (`frozen`, `train_img_s`). Needs jax, flax, optax and numpy only: nothing on this
# path imports TensorFlow or ml_collections.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "${SMOKE:-}" ]; then
  SIZE=32 BATCH=8 STEPS=2 WIDTH=0.125
else
  SIZE=224 BATCH=256 STEPS=20 WIDTH=1.0
fi
BENCH=("$PY" experiments/benchmark.py --model=resnet50 --image_size=$SIZE --batch=$BATCH
       --width=$WIDTH --num_classes=1000 --no_infer)
"$PY" -c 'import jax; print({"devices": [str(d) for d in jax.devices()], "jax": jax.__version__})'
"${BENCH[@]}" --dtype=bfloat16 --steps=$STEPS
"${BENCH[@]}" --dtype=float32 --steps=$STEPS
for k in 0 1 2 3 4 5; do
  "${BENCH[@]}" --dtype=bfloat16 --steps=$((STEPS / 2)) --freeze_depth=$k
done
