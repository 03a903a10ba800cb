#!/usr/bin/env bash
# GPU benchmark, one command on a machine with one NVIDIA GPU and no network (target: under 8 minutes on an
# H100-class GPU): training s/step and peak memory (SD v1.5-size, 512 px, batch 2, bf16, AdamW8bit, with and
# without gradient checkpointing), generation s/image (512 px, 35 DDIM steps, CFG 7, batch 1 and 8; base,
# fused LoRA, unfused LoRA), fangzhi against plain diffusers (training steps/s and memory, generation
# images/s end to end), CLIP scoring images/s, then one JSON + Markdown summary with the device, versions
# and model FLOP utilisation. Everything it needs is built on the spot (random weights), once.
# Then, in the time left before GPU_BENCH_LIMIT_S (default 440 s), the extras: training with `compile: true`,
# with `cache_latents: true`, and a profile of the eager step (kernels and GPU-busy time per step), generation with a compiled UNet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p results/bench
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
SD15=()
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  "$PY" -m fangzhi base sd15-random --out "$WORK/sd15-random"
  SD15=(--sd15-base "$WORK/sd15-random")
fi
"$PY" bench/train_bench.py --steps 10 --gpu-steps 30 "${SD15[@]}"
"$PY" bench/generate_bench.py --repeats 3 "${SD15[@]}"
"$PY" bench/peer_bench.py "${SD15[@]}"
"$PY" bench/clip_bench.py
"$PY" bench/gpu_summary.py
limit=${GPU_BENCH_LIMIT_S:-440}
extra() {
  local left=$(( limit - ($(date +%s) - started) ))
  if (( left < 60 )); then echo "bench/gpu.sh: skipped (${left} s left): $*"; return; fi
  timeout "$left" "$@" || echo "bench/gpu.sh: stopped or failed (exit $?): $*"
}
extra "$PY" bench/train_bench.py --extras --gpu-steps 30 "${SD15[@]}"
extra "$PY" bench/generate_bench.py --compile --repeats 3 "${SD15[@]}"
"$PY" bench/gpu_summary.py
echo "bench/gpu.sh: $(( $(date +%s) - started )) s"
