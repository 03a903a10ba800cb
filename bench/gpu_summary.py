"""Merge the benchmark JSONs into results/bench/gpu.json and gpu.md, with FLOP counts and model FLOP utilisation.

FLOPs are counted, not guessed: torch's FlopCounterMode runs one SD v1.5-size UNet forward at 512 px
(64×64 latents, batch 1). A training step at batch 2 is counted as forward + activation backward
(about 2 forwards: the frozen weights need no weight gradients) for 2 images; an image at N DDIM
steps with classifier-free guidance is 2N UNet forwards (70 at the paper's 35 steps).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path("results/bench")
# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def unet_forward_tflops() -> float:
    from fangzhi.models.sd import sd15_unet_config  # before diffusers: fangzhi quiets a bitsandbytes import warning

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
        latents, hidden = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(latents, torch.tensor([500]), hidden)
    return counter.get_total_flops() / 1e12


def main() -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in device), None)
    forward = unet_forward_tflops()
    parts = {name: json.loads((BENCH / f"{name}.json").read_text()) for name in ("train", "train_extras", "generate_bench", "generate_compiled", "peer", "clip_bench") if (BENCH / f"{name}.json").exists()}
    summary = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
               "unet_forward_tflops_512": round(forward, 3), "peak_bf16_tflops": peak, "parts": parts, "mfu": {}}
    lines = [f"# GPU benchmark: {device}", "", f"torch {torch.__version__}; SD v1.5 UNet forward at 512 px = {forward:.3f} TFLOPs (counted)", ""]
    train_cases = parts.get("train", {}).get("cases", []) + parts.get("train_extras", {}).get("cases", [])
    eager_step = {case["case"]: case["seconds_per_step"] for case in train_cases if "seconds_per_step" in case}
    for case in train_cases:
        if case["case"].endswith("-profile"):
            line = (f"- train {case['case']}: {case['kernels_per_step']} kernels and {case['top_level_operators_per_step']} operators "
                    f"per step, GPU busy {case['gpu_busy_ms_per_step']} ms per step")
            wall = eager_step.get(case["case"].removesuffix("-profile"))
            if wall and case["gpu_busy_ms_per_step"]:
                line += f" of {wall * 1000:.0f} ms ({case['gpu_busy_ms_per_step'] / (wall * 1000):.0%}; the rest is launch and host time)"
            lines.append(line)
            continue
        line = f"- train {case['case']}: {case['seconds_per_step']:.4f} s/step ({case['steps_per_second']} steps/s)"
        if "peak_gpu_memory_gib" in case:
            line += f", peak {case['peak_gpu_memory_gib']} GiB"
        if peak and case["case"].startswith("sd15"):
            achieved = 2 * forward * case["batch_size"] / case["seconds_per_step"]
            summary["mfu"][case["case"]] = round(achieved / peak, 4)
            line += f", MFU {achieved / peak:.1%}"
        lines.append(line)
    for run in parts.get("generate_bench", {}).get("runs", []) + parts.get("generate_compiled", {}).get("runs", []):
        for mode, by_batch in run["results"].items():
            for result in by_batch:
                name = f"{run['base']} {run['size']}px {mode}{' compiled' if run.get('compile') else ''} batch {result['batch_size']}"
                line = f"- generate {name}: {1 / result['images_per_s']:.4f} s/image ({run['steps']} {run['scheduler']} steps, CFG {run['cfg']}, {run['dtype']})"
                if peak and run["base"] != "tiny":
                    achieved = 2 * run["steps"] * forward * result["images_per_s"]
                    summary["mfu"][f"generate {name}"] = round(achieved / peak, 4)
                    line += f", MFU {achieved / peak:.1%}"
                lines.append(line)
    peer = parts.get("peer")
    if peer:
        train, gen = peer["train"], peer["generate"]
        memory = f", peak memory ×{train['peak_memory_ratio_fangzhi_over_peer']}" if "peak_memory_ratio_fangzhi_over_peer" in train else ""
        lines.append(f"- peer train ({peer['setting']['base']}, {peer['setting']['resolution']} px): fangzhi {train['fangzhi']['steps_per_second']} steps/s, "
                     f"diffusers-script loop {train['peer']['steps_per_second']} steps/s (×{train['steps_per_second_ratio_fangzhi_over_peer']}){memory}")
        lines.append(f"- peer generate end to end: fangzhi {gen['fangzhi']['images_per_second']} images/s, plain diffusers "
                     f"{gen['peer']['images_per_second']} images/s (×{gen['images_per_second_ratio_fangzhi_over_peer']})")
    for result in parts.get("clip_bench", {}).get("results", []):
        lines.append(f"- CLIP {result['model']} on {result['device']}: {result['end_to_end_images_per_s']:.1f} images/s end to end")
    (BENCH / "gpu.json").write_text(json.dumps(summary, indent=2))
    (BENCH / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
