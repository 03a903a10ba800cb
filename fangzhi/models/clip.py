"""CLIP models for scoring: load any open_clip model offline-friendly, or write a tiny random one for tests.

`load_clip` accepts what open_clip accepts, with one rule for where the weights come from:

- `pretrained="openai"` (or any open_clip tag): open_clip's cache, downloading on first use;
- `pretrained="/path/to/file.safetensors|.bin|.pt"`: a local checkpoint for the architecture `model_name`
  (OpenAI's weights need the QuickGELU name, e.g. `ViT-L-14-quickgelu`; with the tag that is automatic);
- `pretrained="/path/to/folder"`: a folder holding `open_clip_config.json` plus weights (the layout of an
  open_clip Hugging Face repository); open_clip's `local-dir:` schema reads it, and `model_name` is unused.

`build_tiny_clip` writes such a folder with a tiny random model (a few MB, deterministic per seed), so tests
and the CPU benchmark never download anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fangzhi.errors import FangzhiError

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"

# A tiny ViT CLIP. The text tower keeps CLIP's real vocabulary and context length so that the real BPE
# tokenizer (open_clip's SimpleTokenizer) drives it exactly as it drives ViT-L-14.
TINY_CLIP_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def clip_model_identity(model_name: str, pretrained: str) -> str:
    """The architecture name recorded beside scores: for a folder the folder defines it, not `model_name`."""
    if Path(pretrained).is_dir():
        return f"local-dir:{Path(pretrained).name}"
    return model_name


def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED, device: str | torch.device = "cpu"):
    """Return (model, preprocess, tokenizer) in eval mode on `device`; every failure is a FangzhiError saying what was tried."""
    import open_clip

    device = resolve_device(device) if isinstance(device, str) else device
    if not pretrained.strip():
        raise FangzhiError("no CLIP weights given: set pretrained to an open_clip tag (e.g. 'openai'), a checkpoint file or a folder")
    pretrained_path = Path(pretrained)
    if pretrained_path.is_dir():
        if not (pretrained_path / "open_clip_config.json").is_file():
            raise FangzhiError(
                f"CLIP folder {pretrained_path} has no open_clip_config.json; a folder must hold open_clip_config.json "
                "and the weights (open_clip_model.safetensors), as written by fangzhi.models.clip.build_tiny_clip "
                "or downloaded from an open_clip Hugging Face repository"
            )
        source = f"local-dir:{pretrained_path}"
        create_args = {"model_name": source}
    else:
        looks_like_path = any(sep in pretrained for sep in ("/", "\\")) or pretrained_path.suffix in (".pt", ".pth", ".bin", ".safetensors")
        if looks_like_path and not pretrained_path.is_file():
            raise FangzhiError(f"CLIP checkpoint not found: {pretrained} (give an existing file or folder, or an open_clip tag such as 'openai')")
        if model_name not in open_clip.list_models():
            raise FangzhiError(f"unknown CLIP model '{model_name}'; open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14 (see open_clip.list_models())")
        source = f"{model_name} with pretrained={pretrained}"
        create_args = {"model_name": model_name, "pretrained": pretrained}
        # OpenAI's weights were trained with QuickGELU; open_clip 3 only warns when the architecture's config
        # (plain ViT-L-14) says GELU, and the embeddings would then be subtly wrong.
        if open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu"):
            create_args["force_quick_gelu"] = True

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(**create_args, device=device)
        tokenizer = open_clip.get_tokenizer(create_args["model_name"])
    except (RuntimeError, OSError, ValueError) as exc:
        raise FangzhiError(_load_failure_message(model_name, pretrained, source, exc)) from None
    model.eval()
    if device.type == "cuda":
        from fangzhi.models.sd import allow_tf32

        allow_tf32()  # the fp32 ViT-L/14 image tower runs on tensor cores
    return model, preprocess, tokenizer


def _load_failure_message(model_name: str, pretrained: str, source: str, exc: Exception) -> str:
    import open_clip

    message = f"could not load CLIP model {source}: {exc}"
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if not Path(pretrained).exists() else {}
    if tag_cfg:
        # The tag names a download; offline, the user has to bring the file themselves.
        where = f"https://huggingface.co/{tag_cfg['hf_hub'].rstrip('/')}" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
        # A file carries no architecture flags, so QuickGELU weights need the -quickgelu architecture name.
        file_model = f"{model_name}-quickgelu" if tag_cfg.get("quick_gelu") and f"{model_name}-quickgelu" in open_clip.list_models() else model_name
        message += (
            f"\nTo work offline, download the checkpoint for {model_name}/{pretrained} on a machine with internet "
            f"(from {where}) and pass its path: --model {file_model} --pretrained /path/to/open_clip_pytorch_model.bin, "
            "or pass a folder holding open_clip_config.json + weights as --pretrained."
        )
    elif not Path(pretrained).exists():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        message += f"\n'{pretrained}' is neither an existing file/folder nor a tag of {model_name} (tags: {', '.join(tags) or 'none'})."
    return message


def clip_weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes): the identity of the weights
    actually loaded, the same whether they came from a .bin, a .safetensors or a folder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_clip_folder(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write `model` as an open_clip local folder (open_clip_config.json + open_clip_model.safetensors),
    with open_clip's default (OpenAI) image preprocessing."""
    from dataclasses import asdict

    import open_clip
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = asdict(open_clip.transform.PreprocessCfg())
    preprocess_cfg = {key: defaults[key] for key in ("mean", "std", "interpolation", "resize_mode")}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state_dict = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state_dict, str(out_dir / TINY_CLIP_WEIGHTS_NAME))
    return out_dir


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random open_clip model (about 13 MB) to `out_dir`; the same seed gives the same bytes.

    Load it with `load_clip(pretrained=str(out_dir))`.
    """
    import open_clip

    torch.manual_seed(seed)
    # Built from the dict directly (no registry entry needed); open_clip's own CLIP class and init.
    model = open_clip.CLIP(**TINY_CLIP_MODEL_CFG)
    return save_clip_folder(model, TINY_CLIP_MODEL_CFG, out_dir)
