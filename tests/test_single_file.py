"""Single-file SD v1.x checkpoints (A1111/ComfyUI layout, original LDM key names) load offline through `load_pipeline`.

The checkpoints are written from the project's own bases by `ldm_checkpoint.diffusers_to_ldm_state_dict`; loading one
back must give every weight of the original pipeline bit for bit, and the same image.
(A missing checkpoint file is covered in test_models.py.)
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from ldm_checkpoint import diffusers_to_ldm_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from fangzhi.models import DEFAULT_BASE, load_pipeline


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Fail every host lookup and connection as an offline machine does, recording them, so a test can tell whether the Hub was tried."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def write_single_file(pipe, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    checkpoint = out / "model.safetensors"
    save_file({key: tensor.to(dtype) for key, tensor in diffusers_to_ldm_state_dict(pipe).items()}, checkpoint)
    return checkpoint


def assert_same_weights_and_image(original, single) -> None:
    for component in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(original, component).state_dict(), getattr(single, component).state_dict()
        assert loaded.keys() == expected.keys(), component
        different = [key for key in expected if not torch.equal(loaded[key], expected[key])]
        assert not different, f"{component}: {len(different)} weights differ, e.g. {different[:3]}"
    images = [
        pipe("shuntianfuzhi style, the Western Hills", num_inference_steps=1, guidance_scale=7.0, height=64, width=64,
             generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        for pipe in (original, single)
    ]
    assert images[0].shape == (64, 64, 3) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[1], images[0])


def test_tiny_single_file_round_trip_offline(tiny_base: str, tmp_path: Path, network_attempts: list):
    original = load_pipeline(tiny_base)
    checkpoint = write_single_file(original, tmp_path)
    single = load_pipeline(str(checkpoint), base_config=tiny_base)
    assert network_attempts == []
    assert type(single.scheduler).__name__ == "DDIMScheduler" and single.tokenizer.model_max_length == 77
    assert_same_weights_and_image(original, single)


def test_single_file_without_config_uses_sd15_configs_from_the_hub_cache_offline(
    tiny_base: str, tmp_path: Path, network_attempts: list, monkeypatch
):
    # What `fangzhi train/generate --base model.safetensors` relies on: SD v1.5's configs and tokenizer in the
    # Hugging Face cache (laid out as huggingface_hub writes it), the Hub itself unreachable.
    cache = tmp_path / "hub"
    repo = cache / ("models--" + DEFAULT_BASE.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(tiny_base, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("*.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    original = load_pipeline(tiny_base)
    single = load_pipeline(str(write_single_file(original, tmp_path)))
    assert network_attempts, "diffusers asks the Hub first and falls back to the cache when it cannot be reached"
    assert list(single.unet.config.block_out_channels) == [32, 64]
    assert_same_weights_and_image(original, single)


@pytest.mark.slow
def test_sd15_single_file_with_ldm_key_names_loads_offline(sd15_random: str, tmp_path: Path, network_attempts: list):
    original = load_pipeline(sd15_random)
    # fp16 as the base folder is stored (so the weights still compare bit for bit): 2 GB, not 4, on CI's small disks.
    checkpoint = write_single_file(original, tmp_path, dtype=torch.float16)
    with safe_open(checkpoint, "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    # Names as in SD v1.5's original checkpoint; diffusers recognises the file as a v1 model by them.
    assert {
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    } <= shapes.keys()
    # LDM's decoder.up.0 is the full-resolution block (128 channels, entered with 256), and its mid-block attention uses 1x1 convs.
    assert shapes["first_stage_model.decoder.up.0.block.0.conv1.weight"] == (128, 256, 3, 3)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert infer_diffusers_model_type({key: torch.empty(shape, device="meta") for key, shape in shapes.items()}) == "v1"

    single = load_pipeline(str(checkpoint), base_config=sd15_random)
    checkpoint.unlink()  # every weight is in memory now
    assert network_attempts == []
    assert_same_weights_and_image(original, single)
