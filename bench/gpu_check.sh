#!/usr/bin/env bash
# One-shot GPU check, for a session that is lent a GPU machine: training images/s of DDPM++ at the paper's
# basic setup in fp32 / channels-last / tf32 / bf16 / torch.compile, and the time of one memorization
# evaluation (10k samples against 50k images), each variant's FLOP/s against the GPU's matmul FLOP/s; then
# the images/s of K = 1..16 digits trainings packed in one process against one alone (diffmem/packed.py).
# About 6 minutes on one H100/H200, most of it the two torch.compile variants and the sampling. Needs only torch, numpy, pyyaml, pillow and scikit-learn
# (no Ray), from .venv when there is one, else python3. Arguments go to bench/train_step.py, e.g.
#   bash bench/gpu_check.sh --batch 512 --variants fp32,bf16+cl
# With $OUT set (the device tool), the figures are also written to $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
json=() packed_json=() smoke=()
if [ -n "${OUT:-}" ]; then json=(--json "$OUT/gpu_check.json"); packed_json=(--json "$OUT/gpu_check_packed.json"); fi
for arg in "$@"; do if [ "$arg" = --smoke ]; then smoke=(--smoke); fi; done
"$PYTHON" bench/train_step.py "${json[@]}" "$@"
"$PYTHON" bench/train_step.py --packed "${smoke[@]}" "${packed_json[@]}"
