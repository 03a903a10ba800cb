#!/usr/bin/env bash
# GPU benchmark, one command on a machine with one NVIDIA GPU and no network (about 6 minutes on an H100):
# training s/step and peak memory (SD v1.5-size, 512 px, batch 2, bf16, AdamW8bit, with and without
# gradient checkpointing), generation s/image (512 px, 35 DDIM steps, CFG 7, batch 1 and 8; base,
# fused LoRA, unfused LoRA), CLIP scoring images/s, then one JSON + Markdown summary with the device,
# versions and model FLOP utilisation. Everything it needs is built on the spot (random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p results/bench
"$PY" bench/train_bench.py --steps 10 --gpu-steps 30
"$PY" bench/generate_bench.py --repeats 5
"$PY" bench/clip_bench.py
"$PY" bench/gpu_summary.py
