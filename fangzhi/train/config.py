"""The one config object of `fangzhi train`: every default is the paper's where it gave one (section 4.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fangzhi.config import StrictModel
from fangzhi.data import DataConfig
from fangzhi.models import DEFAULT_BASE

UNET_CROSS_ATTENTION = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoraSettings(StrictModel):
    rank: int = Field(default=8, ge=1, description="LoRA rank r (the paper does not state it; 8 is a common style-LoRA choice)")
    alpha: float = Field(default=8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    unet: bool = Field(default=True, description="train LoRA on the UNet's cross-attention projections")
    text_encoder: bool = Field(default=True, description="train LoRA on the CLIP text encoder's attention projections")
    unet_targets: list[str] = Field(default=UNET_CROSS_ATTENTION, description="UNet module-name suffixes to adapt (peft target_modules)")
    text_encoder_targets: list[str] = Field(default=CLIP_ATTENTION, description="text-encoder module-name suffixes to adapt")

    @model_validator(mode="after")
    def _something_to_train(self) -> "LoraSettings":
        if not (self.unet or self.text_encoder):
            raise ValueError("lora.unet and lora.text_encoder are both false: set at least one to true")
        return self


class ValidationSettings(StrictModel):
    prompts: list[str] = Field(default=[], description="prompts rendered every `every_epochs` epochs (trigger phrase prepended); empty disables validation")
    seeds: list[int] = Field(default=[0], description="one image per prompt and seed, the same seeds every time")
    every_epochs: int = Field(default=1, ge=1)
    steps: int = Field(default=20, ge=1, description="DDIM steps for validation images")
    guidance_scale: float = Field(default=7.0, ge=1.0)


class TrainConfig(StrictModel):
    base: str = Field(default=DEFAULT_BASE, description="Hub id, local diffusers folder, or single .safetensors/.ckpt checkpoint")
    base_config: str | None = Field(default=None, description="for a single-file base: the diffusers folder or Hub id whose configs describe it (default SD v1.5's)")
    output_dir: str = Field(default="results/lora", description="where the LoRA file, logs, checkpoints and the resolved config go")
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)

    epochs: int = Field(default=15, ge=1, description="passes over the dataset (x repeats)")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps, even mid-epoch")
    batch_size: int = Field(default=2, ge=1, description="images per device per micro-batch")
    gradient_accumulation: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(default=1e-4, gt=0, description="UNet LoRA learning rate")
    text_encoder_learning_rate: float | None = Field(default=None, gt=0, description="text-encoder LoRA learning rate; default: learning_rate / 2, as kohya's scripts suggest")
    optimizer: Literal["adamw8bit", "adamw"] = Field(default="adamw8bit", description="adamw8bit (bitsandbytes, as in the paper) or torch's adamw")
    weight_decay: float = Field(default=1e-2, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="gradient clipping norm; null disables")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(default=0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="frozen weights in fp16/bf16 on GPU; LoRA weights stay fp32")
    gradient_checkpointing: bool = False
    compile: bool = Field(default=False, description="torch.compile the LoRA-adapted UNet and text encoder: fewer, fused kernels per step, after a one-off compile (minutes for SD v1.5). A compiled step has one batch size, so each epoch's short last batch is skipped (different images each epoch, as the order is shuffled)")
    cache_latents: bool = Field(default=False, description="encode each image (and, with data.random_flip, its mirror image) with the VAE once, before training: no image decoding or VAE encoding per step; needs data.center_crop")
    noise_offset: float = Field(default=0.0, ge=0, description="adds noise_offset x per-channel noise, helping very dark/bright images")
    snr_gamma: float | None = Field(default=None, gt=0, description="min-SNR loss weighting gamma (5.0 is the paper's value); null disables")
    seed: int = 0
    checkpoint_every: int = Field(default=500, ge=1, description="optimizer steps between resumable checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="how many checkpoints to keep on disk")
    resume: str | None = Field(default=None, description="'latest' or a checkpoint folder to continue from")
    log_every: int = Field(default=10, ge=1, description="optimizer steps between loss logging (one host sync and, with several processes, one gather each time)")
    dataloader_workers: int | None = Field(default=None, ge=0, description="DataLoader worker processes (decoding, augmentation, tokenising); default 4 on a GPU, 0 on CPU")

    @model_validator(mode="after")
    def _cache_needs_fixed_crops(self) -> "TrainConfig":
        if self.cache_latents and not self.data.center_crop:
            raise ValueError("cache_latents needs fixed crops: set data.center_crop: true, or cache_latents: false")
        return self
