#!/usr/bin/env bash
# GPU check (issue 5, item 5): FIP continual step vs fine-tune step for a timm ViT-B/16 at batch 128 on
# random 224x224 inputs, bf16 autocast, on one CUDA device. The paper reports ~1.4x on an RTX 2060;
# the goal is <= 1.25x. A few minutes on an H100; the output JSON records the device.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, venv at .venv (or python on PATH)
#
# Writes benchmarks/results/gpu_check-<host>-<date>.txt (and $OUT/gpu_check.txt when $OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
log="benchmarks/results/gpu_check-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).txt"
cmd=("$PY" benchmarks/bench_step.py --model timm:vit_base_patch16_224 --input-shape 3,224,224
     --batch 128 --memory 128 --device cuda --amp bf16 --steps 20 --threads 4)
{
  echo "# ${cmd[*]}"
  echo "# $(date -u +%FT%TZ) on $(hostname)"
  "${cmd[@]}"
} 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/gpu_check.txt"; fi
