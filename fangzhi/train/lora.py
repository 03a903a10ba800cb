"""LoRA adapters: attach them with peft, save them as diffusers reads them, export them as A1111/ComfyUI read them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fangzhi.errors import FangzhiError
from fangzhi.generate.manifest import file_sha256

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Metadata key of a kohya export naming the sha256 of the diffusers file it was made from.
KOHYA_SOURCE_KEY = "fangzhi_source_sha256"


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets)


def attach_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, settings) -> dict[str, torch.nn.Module]:
    """Freeze both models, add LoRA adapters where `settings` (LoraSettings) asks; return the models that now train."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    trained = {}
    if settings.unet:
        unet.add_adapter(lora_config(settings.rank, settings.alpha, settings.dropout, settings.unet_targets))
        trained["unet"] = unet
    if settings.text_encoder:
        text_encoder.add_adapter(lora_config(settings.rank, settings.alpha, settings.dropout, settings.text_encoder_targets))
        trained["text_encoder"] = text_encoder
    for name, model in trained.items():
        if not any(p.requires_grad for p in model.parameters()):
            raise FangzhiError(f"lora.{name}_targets matched no module in the {name}; check the target names")
    return trained


def _adapter_metadata(config: LoraConfig) -> dict:
    """The LoraConfig fields diffusers reads back, so rank and alpha (hence strength) survive the file."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "target_modules": sorted(config.target_modules)}


def save_lora(out_dir: str | Path, unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None) -> Path:
    """Write `pytorch_lora_weights.safetensors` that stock diffusers loads with `pipe.load_lora_weights(out_dir)`."""
    kwargs = {}
    if unet is not None:
        kwargs["unet_lora_layers"] = get_peft_model_state_dict(unet)
        kwargs["unet_lora_adapter_metadata"] = _adapter_metadata(unet.peft_config["default"])
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = _adapter_metadata(text_encoder.peft_config["default"])
    StableDiffusionPipeline.save_lora_weights(out_dir, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    return Path(out_dir) / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA given as the .safetensors file or as the folder holding pytorch_lora_weights.safetensors."""
    path = Path(path)
    candidate = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise FangzhiError(f"LoRA file not found: {candidate} (give the .safetensors file or the training output folder)")
    return candidate


def autov3_hash(path: str | Path) -> str:
    """A1111's and civitai's LoRA hash (AutoV3): sha256 of a .safetensors file's bytes after its header.

    A1111 shows its first 12 hex characters in `Lora hashes`; the header (metadata) does not count,
    so editing a file's metadata keeps its hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _lora_alphas(lora_file: Path) -> dict[str, float]:
    """Per component ('unet', 'text_encoder') LoRA alpha from the file's diffusers metadata, {} when it has none."""
    adapter = json.loads(_metadata(lora_file).get("lora_adapter_metadata", "{}"))
    return {key.split(".", 1)[0]: float(value) for key, value in adapter.items() if key.endswith(".lora_alpha")}


def kohya_export_path(lora_file: str | Path) -> Path:
    """Where training puts the kohya export: beside the LoRA, named after the training folder (A1111 shows the file name)."""
    lora_file = Path(lora_file)
    return lora_file.with_name(f"{lora_file.parent.resolve().name}_kohya.safetensors")


def find_kohya_export(lora_file: str | Path, lora_sha256: str) -> Path | None:
    """The kohya export beside `lora_file` that was made from it (its metadata names the source's sha256), if any."""
    lora_file = Path(lora_file)
    for candidate in sorted(lora_file.parent.glob("*.safetensors")):
        if candidate != lora_file and _metadata(candidate).get(KOHYA_SOURCE_KEY) == lora_sha256:
            return candidate
    return None


def export_kohya(src: str | Path, dst: str | Path, alpha: float | None = None) -> Path:
    """Convert a fangzhi/diffusers LoRA file to the kohya key format (lora_unet_* / lora_te_*, with .alpha).

    diffusers' converter names the SD v1 text encoder `lora_te1` (SDXL's habit), writes alpha = rank, and
    follows transformers 5's CLIPTextModel, which dropped the `text_model.` level. A1111 and ComfyUI expect
    `lora_te_text_model_encoder_*` for SD v1 and the training alpha, so all three are set here. The alpha
    comes from the file's `lora_adapter_metadata`; a file without it (e.g. from another trainer) needs
    `alpha`, since guessing alpha = rank can make the LoRA several times too strong.
    """
    src_file = resolve_lora_file(src)
    state_dict = load_file(str(src_file))
    components = {key.split(".", 1)[0] for key in state_dict}
    alphas = dict.fromkeys(components, alpha) if alpha is not None else _lora_alphas(src_file)
    if not components <= alphas.keys():
        raise FangzhiError(
            f"{src_file}: no lora_adapter_metadata, so its LoRA alpha is unknown (assuming alpha = rank would change its strength "
            "by alpha/rank); give the alpha it was trained with, e.g. --alpha 8"
        )
    kohya = {}
    for key, tensor in convert_state_dict_to_kohya(state_dict).items():
        key = key.replace("lora_te1_", "lora_te_", 1).replace("lora_te_encoder_", "lora_te_text_model_encoder_", 1)
        if key.endswith(".alpha"):
            component = "text_encoder" if key.startswith("lora_te_") else "unet"
            tensor = torch.tensor(alphas[component])
        kohya[key] = tensor.contiguous()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(dst), metadata={"ss_network_module": "networks.lora", "format": "pt", KOHYA_SOURCE_KEY: file_sha256(src_file)})
    return dst
