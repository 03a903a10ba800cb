"""SD v1.5's full-size architecture (random weights): one training step and one denoising step on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fangzhi.models import load_pipeline
from fangzhi.train import TrainConfig, train


def test_components_have_sd15_sizes(sd15_random: str):
    pipe = load_pipeline(sd15_random)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    assert 855e6 < unet_params < 865e6
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.in_channels == 4
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder.config.num_hidden_layers == 12
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215) and pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == pytest.approx(0.012)


def test_one_training_step_and_one_denoising_step(sd15_random: str, tmp_path: Path):
    out = tmp_path / "lora"
    cfg = TrainConfig.model_validate(
        {"base": sd15_random, "output_dir": str(out), "data": {"resolution": 64}, "batch_size": 1, "max_steps": 1,
         "lora": {"rank": 4, "alpha": 4}, "optimizer": "adamw8bit"}
    )
    lora_file = train(cfg)
    assert lora_file.is_file()
    assert len((out / "loss.csv").read_text().splitlines()) == 2

    pipe = load_pipeline(sd15_random)
    pipe.load_lora_weights(str(out))
    image = pipe("shuntianfuzhi style, the Western Hills", num_inference_steps=1, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
