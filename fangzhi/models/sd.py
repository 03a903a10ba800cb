"""Stable Diffusion v1.x bases: loading (Hub id, diffusers folder, single checkpoint file) and the two offline bases.

Every stage (train, generate, evaluate) gets its model through `load_pipeline`; none of them knows
whether the weights are SD v1.5's, the tiny base's or random ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fangzhi.errors import FangzhiError
from fangzhi.generate.manifest import file_sha256
from fangzhi.models.tokenizer import clip_tokenizer_from_open_clip_bpe

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# SD v1.5's noise schedule (its scheduler_config.json), used with DDIM as in the paper.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
SD15_LATENT_SCALING = 0.18215


def _how_to_provide(base: str) -> str:
    return (
        f"Provide the weights offline as --base /path/to/folder (a diffusers folder with model_index.json, "
        f"e.g. from `huggingface-cli download {DEFAULT_BASE}` on a machine with network) or as "
        f"--base /path/to/model.safetensors (an A1111/ComfyUI checkpoint). "
        f"For an offline try-out, `fangzhi base tiny --out DIR` writes a small base."
    )


def _looks_like_hub_id(base: str) -> bool:
    return base.count("/") == 1 and not base.startswith((".", "/", "~"))


def _is_single_file(path: Path) -> bool:
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _on_hub(repo_id: str) -> bool:
    """True when the Hub id's pipeline is in the local Hugging Face cache, or the Hub can be reached to fetch it."""
    from huggingface_hub import file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
        return True
    try:
        return file_exists(repo_id, "model_index.json")
    except Exception:  # no network, or the Hub refused: either way it cannot be fetched now
        return False


def _single_file_config_problem(base_config: str | None) -> str | None:
    """Why the configs describing a single-file checkpoint cannot be had, or None."""
    config = base_config or DEFAULT_BASE
    path = Path(config).expanduser()
    if path.is_dir():
        return None if (path / "model_index.json").is_file() else f"base_config {path} is not a diffusers folder (no model_index.json)"
    if _looks_like_hub_id(config) and _on_hub(config):
        return None
    return (
        f"a single checkpoint file needs the configs of its architecture, and '{config}' is neither a local diffusers "
        f"folder nor in the Hugging Face cache, and the Hub cannot be reached. Run `huggingface-cli download {DEFAULT_BASE} --include '*.json' '*.txt'` "
        "once on a machine with network (the configs are a few KB), or set base_config (--base-config) to a local "
        "SD v1.5 diffusers folder"
    )


def load_pipeline(base: str, torch_dtype: torch.dtype = torch.float32, base_config: str | None = None) -> StableDiffusionPipeline:
    """Load an SD v1.x pipeline from a Hub id, a local diffusers folder or a single .safetensors/.ckpt file.

    The safety checker is left out: images are rated by people, and its weights are a separate download.
    `base_config` names the diffusers folder or Hub id whose configs describe a single-file checkpoint
    (default SD v1.5's Hub id, which must then be in the Hugging Face cache when offline).
    """
    path = Path(base).expanduser()
    kwargs = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    problem = base_available(base, base_config)
    if problem:
        raise FangzhiError(problem)
    try:
        if _is_single_file(path):
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=base_config or DEFAULT_BASE, **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(path) if path.is_dir() else base, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FangzhiError(f"could not load base '{base}': {first_line}. {_how_to_provide(base)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def allow_tf32() -> None:
    """Let fp32 matmuls and convolutions on Ampere+ GPUs use TF32 tensor cores (process-wide; ~10-bit mantissa products)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def base_available(base: str, base_config: str | None = None) -> str | None:
    """Why `base` cannot be loaded here, found without loading it (None when it looks loadable)."""
    path = Path(base).expanduser()
    if _is_single_file(path):
        if not path.is_file():
            return f"base checkpoint file not found: {path}. {_how_to_provide(base)}"
        problem = _single_file_config_problem(base_config)
        return f"could not load base '{base}': {problem}" if problem else None
    if path.is_dir():
        return None if (path / "model_index.json").is_file() else f"{path} is not a diffusers pipeline folder (no model_index.json). {_how_to_provide(base)}"
    if not _looks_like_hub_id(base):
        return f"base not found: '{base}' is neither an existing folder or checkpoint file nor a Hub id. {_how_to_provide(base)}"
    if _on_hub(base):
        return None
    return (
        f"could not load base '{base}': it is a Hub id, but it is not in the local Hugging Face cache "
        f"and the Hub cannot be reached. {_how_to_provide(base)}"
    )


def weights_sha256(base: str) -> str:
    """sha256 of a single checkpoint file (civitai's SHA256; its first 10 hex are A1111's AutoV2 `Model hash`),
    or over a diffusers folder's weight files with their paths (sorted); '' for a Hub id."""
    path = Path(base).expanduser()
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return ""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _sd_vae(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int) -> AutoencoderKL:
    """SD's VAE layout: one down/up block per width (three downsamples for four widths), 4 latent channels."""
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=SD15_LATENT_SCALING,
    )


def _clip_text_config(hidden_size: int, layers: int, heads: int) -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower layout (BPE vocabulary, 77 tokens, quick-GELU) at the given size."""
    return CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_attention_heads=heads, num_hidden_layers=layers,
        vocab_size=49408, max_position_embeddings=77, projection_dim=hidden_size, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


# Written into every base fangzhi builds: only such a folder is ever replaced by another build.
BUILT_MARKER = "fangzhi_base.json"


def check_base_destination(out: Path) -> None:
    """A base is built into a new or empty folder, or over one fangzhi built: never over someone's model or files."""
    if out.exists() and not out.is_dir():
        raise FangzhiError(f"--out {out}: is a file; give a folder for the base")
    if out.is_dir() and any(out.iterdir()) and not (out / BUILT_MARKER).is_file():
        raise FangzhiError(
            f"--out {out}: holds files fangzhi did not write (a model of yours?); give a new or empty folder, or move it away first"
        )


def _assemble(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_config: CLIPTextConfig, out: Path, seed: int, kind: str,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save the pipeline into a folder beside `out`, then put it in `out`'s place whole: an interrupted build leaves the
    old base (or none), never a mix of two."""
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.building-{os.getpid()}")
    replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = clip_tokenizer_from_open_clip_bpe(scratch)
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=DDIMScheduler(**SD15_SCHEDULE),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.to(dtype=dtype).save_pretrained(building, safe_serialization=True)
        (building / BUILT_MARKER).write_text(json.dumps({"kind": kind, "seed": seed}) + "\n", encoding="utf-8")
        if out.exists():
            out.rename(replaced)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return out


def build_tiny_base(out: str | Path, seed: int = 0) -> Path:
    """A few-MB SD-architecture base with random weights: same structure and data path as SD v1.5, tiny widths.

    Latents are 4 channels at 1/8 of the image size (three downsamples in the VAE), the text encoder is a
    2-layer CLIP with the real BPE tokenizer, and the schedule is SD v1.5's. Deterministic per seed.
    """
    out = Path(out)
    check_base_destination(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = _sd_vae((16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
    return _assemble(unet, vae, _clip_text_config(32, layers=2, heads=4), out, seed, "tiny")


def sd15_unet_config() -> dict:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def build_sd15_random_base(out: str | Path, seed: int = 0) -> Path:
    """SD v1.5's component configs (UNet ~860M, CLIP ViT-L/14 text encoder, 0.18215-scaled 4-channel latents), random weights.

    Stored in fp16, as SD v1.5's fp16 release is: 2 GB on disk instead of 4, and `load_pipeline` upcasts exactly.
    """
    out = Path(out)
    check_base_destination(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config())
    torch.manual_seed(seed + 1)
    vae = _sd_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
    return _assemble(unet, vae, _clip_text_config(768, layers=12, heads=12), out, seed, "sd15-random", dtype=torch.float16)
