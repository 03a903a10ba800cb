"""fangzhi against what a user would write instead, in one process on one device: the ratios that matter.

Training: a minimal loop equivalent to diffusers' examples/text_to_image/train_text_to_image_lora.py
(torchvision transforms, captions tokenised in the dataset, VAE encode, noise and timesteps, MSE on the
noise, `accelerator.gather(loss).item()` every step as the script logs it, AdamW8bit, gradient clipping)
with the same LoRA targets as fangzhi (UNet cross-attention and CLIP text-encoder attention, rank 8),
against `fangzhi train` with the same settings: steps/s and peak GPU memory each.

Generation: plain diffusers as a user writes it (StableDiffusionPipeline + DDIMScheduler, batch 8,
35 steps, CFG 7, base images, then `load_lora_weights` and the LoRA images, each saved as a PNG),
against `fangzhi generate` end to end (manifest, fsynced PNGs with metadata, both arms, fused LoRA):
images/s each, timed from loading the pipeline to the last file written.

On a CUDA GPU: SD v1.5-size random weights, 512 px, bf16 training, fp16 generation (both sides).
On CPU: the tiny base at 64 px in fp32, so the script and its JSON can be checked anywhere.

    .venv/bin/python bench/peer_bench.py     # writes results/bench/peer.json
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fangzhi.data import DataConfig, load_training_entries  # noqa: E402
from fangzhi.generate import GenerateConfig, generate  # noqa: E402
from fangzhi.generate.prompts import load_prompt_set  # noqa: E402
from fangzhi.models import build_sd15_random_base, build_tiny_base  # noqa: E402
from fangzhi.train import TrainConfig, train  # noqa: E402
from fangzhi.train.config import CLIP_ATTENTION, UNET_CROSS_ATTENTION  # noqa: E402

WARMUP_STEPS = 3
ON_GPU = torch.cuda.is_available()


def reset_peak() -> None:
    gc.collect()  # the other side's models, if a reference cycle still holds them, must not count in this side's peak
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if ON_GPU else None


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def peer_train(base: str, resolution: int, steps: int, mixed_precision: str, repeats: int) -> dict:
    """diffusers' train_text_to_image_lora.py, reduced to its training step (UNet + text-encoder LoRA)."""
    import bitsandbytes as bnb
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not ON_GPU)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_CROSS_ATTENTION))
    text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=CLIP_ATTENTION))
    cast_training_params([unet, text_encoder], dtype=torch.float32)
    params = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)

    entries = load_training_entries(DataConfig(resolution=resolution, allow_upscale=True)) * repeats
    train_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
    ])

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(entries)

        def __getitem__(self, index):
            entry = entries[index]
            ids = tokenizer(f"shuntianfuzhi style, {entry.caption}", max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": train_transforms(Image.open(entry.path).convert("RGB")), "input_ids": ids}

    dataloader = torch.utils.data.DataLoader(Dataset(), shuffle=True, batch_size=2, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, dataloader, lr_scheduler)

    reset_peak()
    stamps = []
    batches = iter(dataloader)
    for _ in range(steps):
        batch = next(batches)
        with accelerator.accumulate(unet, text_encoder):
            latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            avg_loss = accelerator.gather(loss.repeat(2)).mean()
            train_loss = avg_loss.item()  # the script logs this every step
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        stamps.append(time.perf_counter())
    sync()
    assert math.isfinite(train_loss)
    seconds_per_step = (stamps[-1] - stamps[WARMUP_STEPS - 1]) / (steps - WARMUP_STEPS)
    result = {"steps": steps, "seconds_per_step": round(seconds_per_step, 4), "steps_per_second": round(1 / seconds_per_step, 3),
              "peak_gpu_memory_gib": peak_gib()}
    accelerator.end_training()
    AcceleratorState._reset_state()  # this script's own Accelerator, before fangzhi's
    return result


def fangzhi_seconds_per_step(loss_csv: Path) -> float:
    """`seconds` in loss.csv is stamped when a logging window's losses reach the host; time between window ends after the first."""
    with open(loss_csv, newline="") as handle:
        rows = [(int(row["step"]), float(row["seconds"])) for row in csv.DictReader(handle)]
    ends = [row for index, row in enumerate(rows) if index + 1 == len(rows) or rows[index + 1][1] != row[1]]
    (first_step, first_seconds), (last_step, last_seconds) = ends[0], ends[-1]
    return (last_seconds - first_seconds) / (last_step - first_step)


def fangzhi_train(base: str, out: Path, resolution: int, steps: int, mixed_precision: str, repeats: int, log_every: int) -> dict:
    cfg = TrainConfig.model_validate({
        "base": base, "output_dir": str(out), "max_steps": steps, "checkpoint_every": 10**6, "batch_size": 2,
        "mixed_precision": mixed_precision, "optimizer": "adamw8bit", "lora": {"rank": 8, "alpha": 8}, "log_every": log_every,
        "data": {"resolution": resolution, "repeats": repeats, "random_flip": False, "allow_upscale": True},
    })
    reset_peak()
    train(cfg)
    seconds_per_step = fangzhi_seconds_per_step(out / "loss.csv")
    return {"steps": steps, "log_every": log_every, "seconds_per_step": round(seconds_per_step, 4),
            "steps_per_second": round(1 / seconds_per_step, 3), "peak_gpu_memory_gib": peak_gib()}


def peer_generate(base: str, lora_dir: Path, out: Path, prompts: list[str], seeds: list[int], size: int, dtype: torch.dtype) -> dict:
    """What a diffusers user writes: load, DDIM, batches of 8 (prompt, seed), save PNGs; then load the LoRA and do it again."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out.mkdir(parents=True)
    device = "cuda" if ON_GPU else "cpu"
    sync()
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    for arm in ("base", "lora"):
        if arm == "lora":
            pipe.load_lora_weights(str(lora_dir))
        for first in range(0, len(jobs), 8):
            batch = jobs[first : first + 8]
            images = pipe([prompt for prompt, _ in batch], num_inference_steps=35, guidance_scale=7.0, height=size, width=size,
                          generator=[torch.Generator(device).manual_seed(seed) for _, seed in batch]).images
            for (prompt, seed), image in zip(batch, images):
                image.save(out / f"{arm}-{prompts.index(prompt)}-{seed}.png")
    seconds = time.perf_counter() - start
    count = 2 * len(jobs)
    assert len(list(out.glob("*.png"))) == count
    return {"images": count, "seconds": round(seconds, 3), "images_per_second": round(count / seconds, 3)}


def fangzhi_generate(base: str, lora_dir: Path, out: Path, limit_prompts: int, seeds: list[int], size: int, dtype: str) -> dict:
    config = GenerateConfig(base=base, loras=[{"path": str(lora_dir)}], out=str(out), limit_prompts=limit_prompts, seeds=seeds,
                            steps=35, guidance_scale=7.0, width=size, height=size, batch_size=8, dtype=dtype, contact_sheets=False)
    sync()
    start = time.perf_counter()
    generate(config)
    seconds = time.perf_counter() - start
    count = 2 * limit_prompts * len(seeds)
    assert len(list((out / "images").glob("*.png"))) == count
    return {"images": count, "seconds": round(seconds, 3), "images_per_second": round(count / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench/peer.json")
    parser.add_argument("--steps", type=int, default=30 if ON_GPU else 12, help="training steps per side")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per arm; 8 seeds each")
    parser.add_argument("--repeats", type=int, default=1 if ON_GPU else 3,
                        help="runs per side, alternating peer and fangzhi; each side's fastest counts (a shared CPU is noisy)")
    parser.add_argument("--sd15-base", help="an sd15-random base folder to reuse on a GPU (bench/gpu.sh builds one for all benchmarks)")
    args = parser.parse_args()

    if ON_GPU:
        setting = {"base": "sd15-random", "resolution": 512, "train_precision": "bf16", "generate_dtype": "fp16", "log_every": 10}
    else:
        setting = {"base": "tiny", "resolution": 64, "train_precision": "no", "generate_dtype": "fp32", "log_every": 3}
    seeds = list(range(8))
    prompts = [entry.prompt_en for entry in load_prompt_set(GenerateConfig().prompts)[: args.prompts]]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        base = (args.sd15_base if ON_GPU else None) or str((build_sd15_random_base if ON_GPU else build_tiny_base)(work / "base"))
        size = setting["resolution"]
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[setting["generate_dtype"]]
        runs = {"train": {"peer": [], "fangzhi": []}, "generate": {"peer": [], "fangzhi": []}}
        for repeat in range(args.repeats):
            runs["train"]["peer"].append(peer_train(base, size, args.steps, setting["train_precision"], repeats=40))
            runs["train"]["fangzhi"].append(
                fangzhi_train(base, work / f"lora-{repeat}", size, args.steps, setting["train_precision"], 40, setting["log_every"]))
        lora = work / "lora-0"
        # Warm-up (CUDA context, kernels, page cache) on one image per arm each, then the timed runs, alternating.
        peer_generate(base, lora, work / "warm-peer", prompts[:1], seeds[:1], size, dtype)
        fangzhi_generate(base, lora, work / "warm-fangzhi", 1, seeds[:1], size, setting["generate_dtype"])
        for repeat in range(args.repeats):
            runs["generate"]["peer"].append(peer_generate(base, lora, work / f"peer-{repeat}", prompts, seeds, size, dtype))
            runs["generate"]["fangzhi"].append(fangzhi_generate(base, lora, work / f"fangzhi-{repeat}", len(prompts), seeds, size, setting["generate_dtype"]))
        training = {side: max(results, key=lambda r: r["steps_per_second"]) for side, results in runs["train"].items()}
        generation = {side: max(results, key=lambda r: r["images_per_second"]) for side, results in runs["generate"].items()}
        for side in ("peer", "fangzhi"):
            training[side]["all_steps_per_second"] = [r["steps_per_second"] for r in runs["train"][side]]
            generation[side]["all_images_per_second"] = [r["images_per_second"] for r in runs["generate"][side]]
    report = {
        "benchmark": "peer",
        "device": torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "setting": setting,
        "train": {**training, "steps_per_second_ratio_fangzhi_over_peer": round(training["fangzhi"]["steps_per_second"] / training["peer"]["steps_per_second"], 3)},
        "generate": {**generation, "images_per_second_ratio_fangzhi_over_peer": round(generation["fangzhi"]["images_per_second"] / generation["peer"]["images_per_second"], 3)},
        "target": "fangzhi within 5% of the plain-diffusers loop or faster (ratio >= 0.95)",
    }
    if ON_GPU:
        report["train"]["peak_memory_ratio_fangzhi_over_peer"] = round(training["fangzhi"]["peak_gpu_memory_gib"] / training["peer"]["peak_gpu_memory_gib"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("device", "train", "generate")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
