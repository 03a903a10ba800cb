"""LoRA adapters: attach them with peft, save them as diffusers reads them, export them as A1111/ComfyUI read them."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fangzhi.errors import FangzhiError
from fangzhi.files import replacing
from fangzhi.generate.manifest import file_sha256

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Metadata key of a kohya export naming the sha256 of the diffusers file it was made from.
KOHYA_SOURCE_KEY = "fangzhi_source_sha256"
# The key prefixes by which diffusers' lora_state_dict tells a kohya file (it converts such a file on load).
KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")


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


def _read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """A .safetensors file's tensor names and metadata, read from its header alone (no weights)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), handle.metadata() or {}
    except SafetensorError as exc:
        raise FangzhiError(
            f"{path}: not a safetensors file ({exc}); give a LoRA .safetensors file, e.g. a training folder's {LORA_WEIGHT_NAME}"
        ) from None


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA given as the .safetensors file or as the folder holding pytorch_lora_weights.safetensors.

    The file is checked from its header only, so a wrong file is refused before anything is generated
    or written; the rule is diffusers' own (load_lora_weights refuses a file with a tensor name lacking 'lora').
    """
    path = Path(path)
    candidate = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise FangzhiError(f"LoRA file not found: {candidate} (give the .safetensors file or the training output folder)")
    keys, _ = _read_header(candidate)
    others = [key for key in keys if "lora" not in key]
    if not keys or others:
        found = f"tensor '{others[0]}' is not a LoRA weight" if others else "it holds no tensors"
        holds = "holds other weights than a LoRA's" if len(others) < len(keys) else "holds no LoRA weights"
        raise FangzhiError(
            f"{candidate}: {holds} ({found}: LoRA tensor names contain 'lora'); give a LoRA file, "
            f"e.g. a training folder's {LORA_WEIGHT_NAME} or its kohya export"
        )
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


def _lora_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """Per component ('unet', 'text_encoder') LoRA alpha from a file's diffusers metadata, {} when it has none."""
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    return {key.split(".", 1)[0]: float(value) for key, value in adapter.items() if key.endswith(".lora_alpha")}


def kohya_export_path(lora_file: str | Path) -> Path:
    """Where training puts the kohya export: beside the LoRA, named after the training folder (A1111 shows the file name)."""
    lora_file = Path(lora_file)
    return lora_file.with_name(f"{lora_file.parent.resolve().name}_kohya.safetensors")


def find_kohya_export(lora_file: str | Path, lora_sha256: str) -> Path | None:
    """The kohya export beside `lora_file` that was made from it (its metadata names the source's sha256), if any."""
    lora_file = Path(lora_file)
    for candidate in sorted(lora_file.parent.glob("*.safetensors")):
        if candidate == lora_file:
            continue
        try:
            metadata = _read_header(candidate)[1]
        except FangzhiError:
            continue  # an unreadable file beside the LoRA is not its export, and must not stop the run
        if metadata.get(KOHYA_SOURCE_KEY) == lora_sha256:
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
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise FangzhiError(f"--alpha {alpha:g}: the LoRA alpha must be a number above 0, the one the LoRA was trained with (e.g. 8)")
    src_file = resolve_lora_file(src)
    keys, metadata = _read_header(src_file)
    if all(key.startswith(KOHYA_PREFIXES) for key in keys):
        raise FangzhiError(f"{src_file}: already in kohya format (lora_unet_*/lora_te_* keys); A1111 and ComfyUI load it as it is")
    dst = Path(dst)
    if dst.is_dir():
        raise FangzhiError(f"--out {dst}: is a folder; give the .safetensors file to write, e.g. {dst / kohya_export_path(src_file).name}")
    if dst.exists() and os.path.samefile(src_file, dst):
        raise FangzhiError(f"--out {dst} is the LoRA being exported ({src_file}); writing there would replace it. Give another --out file")
    try:
        converted = convert_state_dict_to_kohya(load_file(str(src_file)))
    except ValueError:  # diffusers converts only the peft layout (*.lora_A.weight) that diffusers and fangzhi save
        raise FangzhiError(
            f"{src_file}: its LoRA keys (e.g. '{keys[0]}') are not in the diffusers/peft layout (*.lora_A.weight) that "
            "fangzhi train and diffusers' training scripts write, the only layout that can be exported"
        ) from None
    components = {key.split(".", 1)[0] for key in keys}
    alphas = dict.fromkeys(components, alpha) if alpha is not None else _lora_alphas(metadata)
    if not components <= alphas.keys():
        raise FangzhiError(
            f"{src_file}: no lora_adapter_metadata, so its LoRA alpha is unknown (assuming alpha = rank would change its strength "
            "by alpha/rank); give the alpha it was trained with, e.g. --alpha 8"
        )
    kohya = {}
    for key, tensor in converted.items():
        key = key.replace("lora_te1_", "lora_te_", 1).replace("lora_te_encoder_", "lora_te_text_model_encoder_", 1)
        if key.endswith(".alpha"):
            component = "text_encoder" if key.startswith("lora_te_") else "unet"
            tensor = torch.tensor(alphas[component])
        kohya[key] = tensor.contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dst) as temporary:  # an interrupted export never leaves half a file under the name A1111 loads
        save_file(kohya, str(temporary), metadata={"ss_network_module": "networks.lora", "format": "pt", KOHYA_SOURCE_KEY: file_sha256(src_file)})
    return dst
