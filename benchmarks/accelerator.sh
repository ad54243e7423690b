#!/usr/bin/env bash
# One prepared command for a machine with a GPU (or TPU): installs what it needs into .venv-accel, then prints
#   1. the bf16 train-step throughput, MFU and peak memory of iresnet18, iresnet50, resnet56 and mobilefacenet
#      at batch 256-512 (benchmarks/train_step.py; PyTorch's same step beside it where torch is installed),
#   2. a short real training run on LFW (../shared/data/lfw) with its pairsDevTest accuracy.
# Budget: about 8 minutes on one H200 (each part is capped with `timeout`). Usage: bash benchmarks/accelerator.sh
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-accel}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e . "jax[cuda12]>=0.10,<0.11" 2>&1 | tail -2
fi
PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PY" -c "import jax; print('devices:', jax.devices())"
TORCH=""
"$PY" -c "import torch" 2>/dev/null && TORCH="--torch"

for spec in "iresnet18 512" "iresnet50 256" "resnet56 512" "mobilefacenet 512"; do
  set -- $spec
  echo "== $1, batch $2, bf16 =="
  timeout 120 "$PY" benchmarks/train_step.py --model="$1" --batch="$2" --dtype=bfloat16 --steps=20 --warmup=3 \
    --embedding-size=512 --classes=10572 $TORCH 2>&1 | grep -v "^I0000\|^WARNING: All log" | tail -12
done

LFW=../shared/data/lfw
if [ -f "$LFW/pairs.txt" ]; then
  echo "== short LFW run: mobilefacenet, 112x112, 1500 steps of 256, pairsDevTest =="
  rm -rf runs/accel_lfw
  timeout 240 "$PY" -m facekd_jax.main --config=configs/baseline_resnet56.py --workdir=runs/accel_lfw \
    --config.model=mobilefacenet --config.embedding_size=128 --config.dtype=bfloat16 \
    --config.data.train="lfw:$LFW" --config.data.val_targets="('lfw:$LFW',)" --config.data.image_size=112 \
    --config.batch_size=256 --config.num_train_steps=1500 --config.optimizer.warmup_steps=100 \
    --config.eval_every_steps=-1 --config.checkpoint_every_steps=1500 --config.log_every_steps=250 \
    --config.best_metric="" --config.scale=32.0 2>&1 | grep -E "img/s|Accuracy-Flip|EER" | tail -10
else
  echo "no LFW at $LFW: skipping the training run"
fi
