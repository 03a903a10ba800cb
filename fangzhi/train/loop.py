"""`fangzhi train`: the LoRA training loop, short enough to read in one sitting.

Per optimizer step: encode images to latents, add noise at random timesteps, predict the noise (or
velocity) with the LoRA-adapted UNet conditioned on the LoRA-adapted text encoder, and step the
optimizer on the LoRA weights only. accelerate supplies devices, mixed precision and multi-process.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, parse_flag_from_env, set_seed
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from tqdm.auto import tqdm

from fangzhi.config import save_config
from fangzhi.data import CaptionedImageDataset, load_training_entries
from fangzhi.errors import FangzhiError
from fangzhi.models import allow_tf32, load_pipeline
from fangzhi.train.checkpoint import (
    ProcessNoiseGenerator,
    TrainingPosition,
    check_same_lora,
    find_checkpoint,
    register_lora_state_hooks,
    save_checkpoint,
)
from fangzhi.train.config import TrainConfig
from fangzhi.train.lora import LORA_WEIGHT_NAME, attach_lora, export_kohya, kohya_export_path, save_lora

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _make_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)


def _plot_loss(loss_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(loss_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    window = max(1, len(losses) // 20)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smoothed, label=f"moving mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss (MSE)")
    ax.set_title("LoRA training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


@torch.no_grad()
def _render_validation(pipe, cfg: TrainConfig, epoch: int, out_dir: Path) -> None:
    folder = out_dir / "validation" / f"epoch-{epoch + 1:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    trigger = cfg.data.trigger.strip()
    for p_index, prompt in enumerate(cfg.validation.prompts):
        text = f"{trigger}, {prompt}" if trigger else prompt
        for seed in cfg.validation.seeds:
            image = pipe(
                text,
                height=cfg.data.resolution,
                width=cfg.data.resolution,
                num_inference_steps=cfg.validation.steps,
                guidance_scale=cfg.validation.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            image.save(folder / f"prompt{p_index:02d}-seed{seed}.png")
    pipe.scheduler = scheduler


class TokenizingCollate:
    """Batches dataset items and tokenises their captions, in the DataLoader workers rather than in the step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(items)
        batch["input_ids"] = self.tokenizer(
            list(batch["caption"]), padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return batch


@torch.no_grad()
def _encode_every_image(vae, entries: list, cfg: TrainConfig, workers: int, device: torch.device) -> torch.Tensor:
    """The VAE's Gaussian parameters of every training image, [image, facing, 8, h, w]: facing 0 as it is, and with
    data.random_flip also facing 1, the mirror image (the crop is fixed, so these are all the views training sees)."""
    images = CaptionedImageDataset(entries, resolution=cfg.data.resolution, trigger="", center_crop=True)
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size, num_workers=workers)
    encoded = []
    for batch in loader:
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        views = [pixels, pixels.flip(-1)] if cfg.data.random_flip else [pixels]
        encoded.append(torch.stack([vae.encode(view).latent_dist.parameters for view in views], dim=1))
    return torch.cat(encoded)


def train(cfg: TrainConfig) -> Path:
    """Train a style LoRA as `cfg` says; returns the path of pytorch_lora_weights.safetensors."""
    entries = load_training_entries(cfg.data)  # refuses bad data before any model is loaded
    checkpoint = find_checkpoint(cfg.resume, Path(cfg.output_dir) / "checkpoints") if cfg.resume else None
    if checkpoint is not None:
        check_same_lora(cfg.lora.model_dump(mode="json"), checkpoint)
    try:
        return _train(cfg, entries, checkpoint)
    finally:
        # accelerate keeps one process-wide state and refuses a second Accelerator with other settings
        # (e.g. another mixed precision), so a second train() in the same process must start clean.
        # The process group (PartialState) is kept: it belongs to the launcher, not to this run.
        AcceleratorState._reset_state(reset_partial_state=False)
        # The run's models sit in reference cycles (accelerator <-> its state hooks); collect them now, so
        # their GPU memory is free for whatever runs next in this process rather than when gc gets round to it.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _train(cfg: TrainConfig, entries: list, checkpoint: Path | None) -> Path:
    out_dir = Path(cfg.output_dir)
    log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(
        # Without a GPU, several processes (torchrun via `accelerate launch --multi_gpu`) need cpu=True to form a gloo group.
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        log_with=log_with,
        project_dir=str(out_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    on_gpu = accelerator.device.type == "cuda"
    # A compiled step is specialised to one batch size: a short last batch would compile the models again.
    drop_last = cfg.compile
    samples_per_round = cfg.batch_size * accelerator.num_processes
    if drop_last and len(entries) * cfg.data.repeats < samples_per_round:
        raise FangzhiError(
            f"compile: true needs at least batch_size x processes = {samples_per_round} images per epoch (it skips each epoch's short "
            f"last batch), and {cfg.data.path} gives {len(entries) * cfg.data.repeats} (images x data.repeats). "
            "Lower batch_size, raise data.repeats, or set compile: false."
        )
    if on_gpu:
        allow_tf32()
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    pipe = load_pipeline(cfg.base, torch_dtype=weight_dtype, base_config=cfg.base_config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type

    vae.requires_grad_(False)
    for model in (unet, text_encoder, vae):
        model.to(accelerator.device)
    trained = attach_lora(unet, text_encoder, cfg.lora)
    # LoRA weights train in fp32 even when the frozen weights are fp16/bf16: tiny updates would round away.
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        # transformers 5.23 renamed it (the old name warns); 5.0, the floor, has only the old one.
        getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    if cfg.compile:
        # In place (nn.Module.compile): module names, LoRA saving and checkpoints are unchanged.
        for model in trained.values():
            model.compile()
    lrs = {"unet": cfg.learning_rate, "text_encoder": cfg.text_encoder_learning_rate or cfg.learning_rate / 2}
    param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lrs[name]} for name, model in trained.items()]
    lora_parameters = [p for group in param_groups for p in group["params"]]  # listed once: a UNet has ~700 tensors to walk
    optimizer = _make_optimizer(cfg, param_groups)

    dataset = CaptionedImageDataset(
        entries,
        resolution=cfg.data.resolution,
        trigger=cfg.data.trigger,
        repeats=cfg.data.repeats,
        caption_dropout=cfg.data.caption_dropout,
        center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip,
        seed=cfg.seed,
        pixels=not cfg.cache_latents,
    )
    workers = cfg.dataloader_workers if cfg.dataloader_workers is not None else (4 if on_gpu else 0)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=on_gpu,
        collate_fn=TokenizingCollate(tokenizer),
    )

    micro_batches_per_epoch = (len(dataset) // samples_per_round) if drop_last else math.ceil(len(dataset) / samples_per_round)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation)
    total_steps = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained) :]
    unet_step = trained.get("unet", unet)
    text_encoder_step = trained.get("text_encoder", text_encoder)
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in trained.items()}

    position = TrainingPosition()
    process_noise = ProcessNoiseGenerator(cfg.seed, accelerator)
    register_lora_state_hooks(accelerator, unwrapped)
    accelerator.register_for_checkpointing(position, process_noise)
    noise_generator = process_noise.generator
    checkpoints_dir = out_dir / "checkpoints"
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {position.global_step}")
    if accelerator.is_main_process:
        # Only now: a checkpoint that does not fit this config must leave its run's config as it was.
        save_config(cfg, out_dir / "config.yaml")
    start_epoch, start_skip = position.epoch, position.batches_done_in_epoch
    if accelerator.num_processes > 1:
        print(f"[process {accelerator.process_index}] training on {accelerator.device}, {accelerator.num_processes} processes", flush=True)

    # With cache_latents, every image is encoded once here and the steps read no image at all.
    latent_cache = _encode_every_image(vae, entries, cfg, workers, accelerator.device) if cfg.cache_latents else None

    def encode_latents(batch: dict) -> torch.Tensor:
        # The cache holds the VAE's Gaussian parameters, so cached and uncached runs sample the same latents.
        if latent_cache is not None:
            distribution = DiagonalGaussianDistribution(latent_cache[batch["index"] % len(entries), batch["flip"].long()])
        else:
            with torch.no_grad():
                distribution = vae.encode(batch["pixel_values"].to(accelerator.device, dtype=vae.dtype, non_blocking=True)).latent_dist
        return distribution.sample(generator=noise_generator) * vae.config.scaling_factor

    loss_csv = out_dir / "loss.csv"
    if accelerator.is_main_process:
        # On resume, keep the log up to the checkpoint: steps after it are about to be redone.
        kept = loss_csv.read_text().splitlines()[1 : position.global_step + 1] if cfg.resume and loss_csv.exists() else []
        loss_csv.write_text("".join(f"{line}\n" for line in ["step,epoch,loss,lr,seconds", *kept]))
    if log_with:
        accelerator.init_trackers("fangzhi-train")
    progress = tqdm(total=total_steps, initial=position.global_step, disable=not accelerator.is_local_main_process, desc="train", unit="step")
    started = time.perf_counter()
    micro_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on the device
    pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, lr, loss) not yet logged

    def flush_losses() -> None:
        """One gather and one host sync for all steps since the last flush; stops on a non-finite loss."""
        if not pending:
            return
        losses = accelerator.gather(torch.stack([loss for *_, loss in pending])[None]).mean(dim=0).tolist()
        seconds = time.perf_counter() - started
        rows = [(step, epoch, loss, lr) for (step, epoch, lr, _), loss in zip(pending, losses)]
        pending.clear()
        bad = next((index for index, row in enumerate(rows) if not math.isfinite(row[2])), None)
        good = rows[:bad]
        if accelerator.is_main_process and good:
            with open(loss_csv, "a") as handle:
                handle.writelines(f"{step},{epoch},{loss:.6f},{lr:.6e},{seconds:.3f}\n" for step, epoch, loss, lr in good)
        if log_with:
            for step, _, loss, lr in good:
                accelerator.log({"loss": loss, "lr": lr}, step=step)
        if bad is not None:
            step, epoch, loss, _ = rows[bad]
            kept = sorted(checkpoints_dir.glob("step-*"))
            raise FangzhiError(
                f"training loss became {loss} at step {step} (epoch {epoch}); stopped without saving. "
                + (f"The last good checkpoint is {kept[-1]}. " if kept else "No checkpoint was written yet. ")
                + "Lower learning_rate, or use bf16 instead of fp16."
            )
        progress.set_postfix(loss=f"{rows[-1][2]:.4f}", lr=f"{rows[-1][3]:.2e}")

    for epoch in range(start_epoch, cfg.epochs):
        if position.global_step >= total_steps:
            break
        dataset.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        skip = start_skip if epoch == start_epoch else 0
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for model in trained.values():
            model.train()
        micro_batch = skip
        for batch in batches:
            micro_batch += 1
            with accelerator.accumulate(*trained.values()):
                latents = encode_latents(batch)
                noise = torch.randn(latents.shape, generator=noise_generator, device=latents.device, dtype=latents.dtype)
                if cfg.noise_offset:
                    noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=noise_generator, device=latents.device, dtype=latents.dtype)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_generator, device=latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder_step(batch["input_ids"].to(accelerator.device, non_blocking=True), return_dict=False)[0]
                prediction = unet_step(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                if cfg.snr_gamma is None:
                    loss = F.mse_loss(prediction.float(), target.float())
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
                    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    loss = (per_sample * weights).mean()
                micro_losses.append(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(lora_parameters, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            position.global_step += 1
            at_end_of_epoch = micro_batch >= micro_batches_per_epoch
            position.epoch, position.batches_done_in_epoch = (epoch + 1, 0) if at_end_of_epoch else (epoch, micro_batch)
            pending.append((position.global_step, epoch + 1, lr_scheduler.get_last_lr()[0], torch.stack(micro_losses).mean()))
            micro_losses.clear()
            progress.update(1)
            at_checkpoint = position.global_step % cfg.checkpoint_every == 0
            if at_checkpoint or position.global_step % cfg.log_every == 0 or position.global_step >= total_steps:
                flush_losses()  # before a checkpoint, so that a non-finite loss is never saved
            if at_checkpoint:
                save_checkpoint(accelerator, checkpoints_dir, position.global_step, cfg.keep_checkpoints)
            if position.global_step >= total_steps:
                break
        flush_losses()
        if cfg.validation.prompts and (epoch + 1) % cfg.validation.every_epochs == 0 and accelerator.is_main_process:
            for model in trained.values():
                model.eval()
            _render_validation(pipe, cfg, epoch, out_dir)
    progress.close()

    accelerator.wait_for_everyone()
    lora_file = out_dir / LORA_WEIGHT_NAME
    if accelerator.is_main_process:
        lora_file = save_lora(out_dir, unwrapped.get("unet"), unwrapped.get("text_encoder"))
        kohya_file = export_kohya(lora_file, kohya_export_path(lora_file))
        _plot_loss(loss_csv, out_dir / "loss.png")
        accelerator.print(
            f"saved {lora_file} after {position.global_step} steps in {time.perf_counter() - started:.1f} s (diffusers format: "
            f"`pipe.load_lora_weights`, fangzhi generate).\nFor A1111, ComfyUI and civitai use the kohya export {kohya_file} "
            "(ComfyUI does not read the diffusers format)."
        )
    accelerator.end_training()
    return lora_file
