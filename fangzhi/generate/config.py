"""`fangzhi generate` settings: one GenerateConfig, from a YAML/TOML file and/or CLI flags.

The defaults are the paper's: DDIM, 35 steps, CFG 7, 512×512, text "[U], prompt" with
[U] = "shuntianfuzhi style" in both arms, so the arms differ only in the adapter weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fangzhi.config import StrictModel
from fangzhi.errors import FangzhiError
from fangzhi.generate.prompts import ID_PATTERN, SHUNTIAN_PROMPT_SET
from fangzhi.models import DEFAULT_BASE

BASE_ARM = "base"
DEFAULT_TRIGGER = "shuntianfuzhi style"


def parse_seeds(text: str) -> list[int]:
    """'0-3' → [0, 1, 2, 3]; '0,2,5' → [0, 2, 5]; ranges and single seeds can be mixed: '0-2,7'."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                first, last = (int(v) for v in part.split("-", 1))
                if last < first:
                    raise FangzhiError(f"seed range '{part}' runs backwards; write it as {last}-{first}")
                seeds.extend(range(first, last + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise FangzhiError(f"seeds: '{part}' is not a seed or a range; use e.g. 0-3 or 0,2,5") from None
    if not seeds:
        raise FangzhiError(f"seeds: '{text}' lists no seed; use e.g. 0-3 or 0,2,5")
    return seeds


class LoraArm(StrictModel):
    """One LoRA arm: an adapter file at one strength. The same file at two scales is two arms."""

    path: str = Field(description="pytorch_lora_weights.safetensors, or the training output folder holding it")
    scale: float = Field(1.0, allow_inf_nan=False, description="LoRA strength, applied to the UNet and the text encoder alike")
    label: str | None = Field(None, pattern=ID_PATTERN, description="arm name in the manifest; default 'lora' or 'lora@SCALE'")


class GenerateConfig(StrictModel):
    base: str = Field(DEFAULT_BASE, description="Hub id, diffusers folder or .safetensors/.ckpt checkpoint")
    base_config: str | None = Field(None, description="for a single-file base: the diffusers folder or Hub id whose configs describe it (default SD v1.5's)")
    loras: list[LoraArm] = Field(default_factory=list, description="one extra arm per entry; empty = base arm only")
    prompts: str = Field(str(SHUNTIAN_PROMPT_SET), description="prompt set (.yaml/.jsonl, docs/formats.md)")
    limit_prompts: int | None = Field(None, ge=1, description="use only the first N prompts of the set")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], description="'0-3', '0,2,5' or a list")
    out: str = Field("results/images", description="output folder: images/, manifest.jsonl, contact_sheets/")
    trigger: str = Field(DEFAULT_TRIGGER, description="trigger phrase [U]; the text is '[U], prompt_en'")
    trigger_arms: Literal["both", "lora"] = Field("both", description="arms whose text gets the trigger phrase")
    steps: int = Field(35, ge=1)
    guidance_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=8, multiple_of=8)
    height: int = Field(512, ge=8, multiple_of=8)
    negative: str = Field("", description="negative prompt for entries that have none")
    batch_size: int = Field(4, ge=1, description="images per UNet call; does not change any image")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: bf16 on CUDA GPUs that support it (else fp16), fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the UNet (pays off for long runs on a GPU)")
    fuse_lora: bool = Field(True, description="merge each LoRA into the weights for its arm; false only to compare speed or outputs")
    long_prompts: Literal["chunk", "truncate"] = Field("chunk", description="prompts over 75 CLIP tokens: encode in chunks, or cut")
    contact_sheets: bool = True

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_from_text(cls, value):
        if isinstance(value, (str, int)):
            try:
                return parse_seeds(str(value))
            except FangzhiError as exc:  # pydantic reports ValueErrors with the key and the file
                raise ValueError(str(exc)) from None
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        repeated = sorted({seed for seed in value if value.count(seed) > 1})
        if repeated:
            raise ValueError(f"seed(s) {repeated} listed twice; each (prompt, seed) is one image per arm")
        if any(seed < 0 for seed in value):
            raise ValueError("seeds must be 0 or larger")
        return value

    @model_validator(mode="after")
    def _distinct_arm_labels(self) -> GenerateConfig:
        labels = arm_labels(self.loras)
        for label, count in ((label, labels.count(label)) for label in set(labels)):
            if count > 1:
                raise ValueError(
                    f"two LoRA arms would both be called '{label}'; give each a distinct label "
                    "(config: loras[i].label; CLI: --lora PATH:SCALE:LABEL)"
                )
        if BASE_ARM in labels:
            raise ValueError(f"'{BASE_ARM}' is the base arm's label; choose another LoRA label")
        return self


def arm_labels(loras: list[LoraArm]) -> list[str]:
    """'lora' for a single unlabelled LoRA; 'lora@SCALE' when there are several; a given label always wins."""
    if len(loras) == 1:
        return [loras[0].label or "lora"]
    return [lora.label or f"lora@{lora.scale:g}" for lora in loras]


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def lora_arms_from_specs(specs: list[str], default_scales: list[float] | None = None) -> list[dict]:
    """`--lora PATH[:SCALE[:LABEL]]` flags as `loras` entries. A spec without a scale gets one arm per
    `default_scales` value (`--lora-scale 0.5,1`), or scale 1.

    A suffix counts as the scale only when it is a finite number, so a path with ':' in it stays whole;
    but when the part before it names an existing file or folder and the whole spec does not, the suffix
    is a mistyped scale, refused here rather than reported later as a missing file (or NaN images).
    """
    arms = []
    for spec in specs:
        parts = spec.rsplit(":", 2)
        if len(parts) == 3 and _finite_float(parts[1]) is not None:
            arms.append({"path": parts[0], "scale": float(parts[1]), "label": parts[2]})
            continue
        parts = spec.rsplit(":", 1)
        if len(parts) == 2 and _finite_float(parts[1]) is not None:
            arms.append({"path": parts[0], "scale": float(parts[1])})
            continue
        if ":" in spec and not Path(spec).exists():
            for path, scale in (spec.rsplit(":", 1), spec.rsplit(":", 2)[:2]):
                if Path(path).exists():
                    raise FangzhiError(
                        f"--lora {spec}: the scale '{scale}' is not a finite number; write --lora {path}:SCALE "
                        f"or {path}:SCALE:LABEL, e.g. {path}:0.5"
                    )
        arms.extend({"path": spec, "scale": scale} for scale in (default_scales or [1.0]))
    return arms
