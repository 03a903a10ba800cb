"""Generation throughput (images/s): base arm vs fused LoRA vs unfused LoRA, batch 1 and 8.

Runs `fangzhi.generate.run.render_batch` (text encoding, DDIM denoising with CFG, VAE decode) on:
- the tiny base on CPU (64×64, 35 DDIM steps, CFG 7), always;
- `sd15-random` (SD v1.5's architecture, random weights) at 512×512, 35 DDIM steps, CFG 7, fp16,
  only when a CUDA GPU is present.
Four pipelines per base: `base` (no LoRA loaded, what `fangzhi generate` uses for the base arm),
`base_lora_disabled` (LoRA loaded, then `disable_lora()`), `lora_fused` (what the LoRA arm uses) and
`lora_unfused` (LoRA layers active at every step). The LoRA is rank 8 on the UNet cross-attention and
text-encoder attention (the training default), with random nonzero lora_B so it really changes the
weights. Nothing is downloaded.

    .venv/bin/python bench/generate_bench.py        # writes results/bench/generate_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fangzhi.generate.config import GenerateConfig  # noqa: E402
from fangzhi.generate.prompts import load_prompt_set  # noqa: E402
from fangzhi.generate.run import _activate, _lora_sources, plan_work, prepare_pipeline, render_batch  # noqa: E402
from fangzhi.models import build_sd15_random_base, build_tiny_base, load_pipeline  # noqa: E402
from fangzhi.train.config import LoraSettings  # noqa: E402
from fangzhi.train.lora import attach_lora, save_lora  # noqa: E402

MODES = ("base", "base_lora_disabled", "lora_fused", "lora_unfused")


def make_random_lora(base: str, out: Path, seed: int = 0) -> Path:
    """A LoRA file as training writes it, with lora_B drawn at random instead of trained (nonzero, honest size)."""
    pipe = load_pipeline(base)
    attach_lora(pipe.unet, pipe.text_encoder, LoraSettings())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    save_lora(out, pipe.unet, pipe.text_encoder)
    return out


def time_batch(pipe, batch, config) -> float:
    start = time.perf_counter()
    render_batch(pipe, batch, config)  # returns the images in host memory, so the GPU has finished
    return time.perf_counter() - start


def bench_base(name: str, base: str, lora_dir: Path, size: int, dtype: str, repeats: int, batch_sizes: list[int],
               modes: tuple[str, ...] = MODES, compile: bool = False) -> dict:
    config = GenerateConfig(base=base, loras=[{"path": str(lora_dir)}], steps=35, guidance_scale=7.0, width=size, height=size,
                            dtype=dtype, seeds=list(range(max(batch_sizes))), limit_prompts=1, out="unused", compile=compile,
                            batch_size=max(batch_sizes))
    device = torch.device("cuda" if torch.cuda.is_available() and dtype != "fp32" else "cpu")
    entries = load_prompt_set(config.prompts)[:1]  # 'xishan': a single 77-token chunk
    loras = _lora_sources(config)
    items = plan_work(config, entries, loras, "bench", "", dtype)
    work = {mode: [item for item in items if (item.lora is None) == mode.startswith("base")] for mode in modes}
    pipes = {}
    for mode in modes:
        pipe = prepare_pipeline(config, device, dtype)
        if mode == "base_lora_disabled":
            pipe.load_lora_weights(str(loras[0].file), adapter_name=loras[0].adapter_name)
            pipe.disable_lora()
        elif mode in ("lora_fused", "lora_unfused"):
            _activate(pipe, loras[0], fuse=mode == "lora_fused")
        pipes[mode] = pipe
    results = {mode: [] for mode in modes}
    for batch_size in batch_sizes:
        for mode in modes:  # warm-up: allocations, kernel selection (and with compile, compiling)
            time_batch(pipes[mode], work[mode][:batch_size], config)
        # Round-robin over the modes, so load from other processes on a shared machine hits them alike.
        seconds = {mode: [] for mode in modes}
        for _ in range(repeats):
            for mode in modes:
                seconds[mode].append(time_batch(pipes[mode], work[mode][:batch_size], config))
        for mode in modes:
            best = min(seconds[mode])
            results[mode].append({"batch_size": batch_size, "seconds_per_batch_min": best,
                                  "seconds_per_batch_all": seconds[mode], "images_per_s": batch_size / best})
            print(f"{name} {mode} batch {batch_size}: {batch_size / best:.3f} images/s", flush=True)
    ratios = {}
    for index, batch_size in enumerate(batch_sizes):
        base_time = 1 / results["base"][index]["images_per_s"]
        ratios[f"batch_{batch_size}"] = {
            mode: (1 / results[mode][index]["images_per_s"]) / base_time for mode in modes if mode != "base"
        }
    return {"base": name, "compile": compile, "size": size, "steps": 35, "cfg": 7.0, "scheduler": "DDIM", "dtype": dtype,
            "device": str(device), "results": results, "time_relative_to_base": ratios,
            "target": "lora_fused within 1.03 of the base arm's time"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default results/bench/generate_bench.json, or generate_compiled.json with --compile")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per mode and batch size; the fastest counts (shared machines are noisy)")
    parser.add_argument("--skip-sd15", action="store_true", help="only the tiny base, even on a GPU")
    parser.add_argument("--sd15-base", help="an sd15-random base folder to reuse (bench/gpu.sh builds one for all benchmarks)")
    parser.add_argument("--compile", action="store_true", help="instead: the base and fused-LoRA arms at batch 8 with a compiled UNet (`compile: true`)")
    args = parser.parse_args()
    modes, batch_sizes = (("base", "lora_fused"), [8]) if args.compile else (MODES, [1, 8])
    runs = {"modes": modes, "batch_sizes": batch_sizes, "compile": args.compile}

    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tiny = str(build_tiny_base(scratch / "tiny"))
        report["runs"].append(bench_base("tiny", tiny, make_random_lora(tiny, scratch / "tiny-lora"), 64, "fp32", args.repeats, **runs))
        if torch.cuda.is_available() and not args.skip_sd15:
            sd15 = args.sd15_base or str(build_sd15_random_base(scratch / "sd15-random"))
            lora = make_random_lora(sd15, scratch / "sd15-lora")
            report["runs"].append(bench_base("sd15-random", sd15, lora, 512, "fp16", args.repeats, **runs))
    out = Path(args.out or f"results/bench/generate_{'compiled' if args.compile else 'bench'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    for run in report["runs"]:
        print(run["base"], json.dumps(run["time_relative_to_base"]))


if __name__ == "__main__":
    main()
