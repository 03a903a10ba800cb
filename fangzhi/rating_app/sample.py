"""A small generation manifest with synthetic painting-like images, for the rating app's tests and benchmark.

It follows docs/formats.md exactly, and like a real generator's PNGs every file carries a
'parameters' text chunk naming the arm, seed and model, so tests can check none of that leaks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin

SAMPLE_BASE_MODEL = "sample-base-model-7f3a"
SAMPLE_LORA_FILE = "loras/sample-lora-c9d1.safetensors"


def _painting(rng: np.random.Generator, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 240, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.integers(0, size, 2)
        radius = int(rng.integers(size // 40, size // 6))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        else:
            draw.line([(x, y), tuple(int(v) for v in rng.integers(0, size, 2))], fill=colour, width=int(rng.integers(1, 8)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=float) + grain, 0, 255).astype(np.uint8))


def write_sample_manifest(
    folder: str | Path,
    n_prompts: int = 3,
    seeds: tuple[int, ...] = (918273645, 918273646),
    arms: tuple[str, ...] = ("base", "lora"),
    size: int = 512,
) -> Path:
    """Write folder/manifest.jsonl and folder/images/*.png; returns the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt_index in range(n_prompts):
        prompt_id = f"p{prompt_index:03d}"
        prompt_en = f"A quiet river village at dusk, scene {prompt_index}, ink and colour on silk"
        narrative_zh = f"黄昏时分宁静的水乡，第{prompt_index}景，绢本设色"
        for seed in seeds:
            for arm in arms:
                image_id = hashlib.sha256(f"{prompt_id}/{seed}/{arm}".encode()).hexdigest()[:16]
                file = f"images/{image_id}.png"
                text = prompt_en + (", fangzhi style" if arm != "base" else "")
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", f"{text}\narm: {arm}, seed: {seed}, model: {SAMPLE_BASE_MODEL}")
                arm_key = int.from_bytes(hashlib.sha256(arm.encode()).digest()[:4], "big")  # each arm its own pixels
                pixels = _painting(np.random.default_rng([seed, prompt_index, arm_key]), size)
                pixels.save(folder / file, pnginfo=info)
                is_lora = arm != "base"
                lines.append(
                    {
                        "image_id": image_id, "file": file, "arm": arm, "prompt_id": prompt_id, "seed": seed,
                        "prompt": text, "prompt_en": prompt_en, "narrative_zh": narrative_zh,
                        "source": "sample", "negative": "", "chunked": False,
                        "scheduler": "DPMSolverMultistepScheduler", "steps": 20, "cfg": 7.5,
                        "width": size, "height": size, "lora_scale": 1.0 if is_lora else None,
                        "base": SAMPLE_BASE_MODEL, "base_sha256": "0" * 64,
                        "lora": SAMPLE_LORA_FILE if is_lora else None, "lora_sha256": "1" * 64 if is_lora else None,
                        "image_sha256": hashlib.sha256((folder / file).read_bytes()).hexdigest(),
                        "seconds": 1.0,
                    }
                )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return manifest


def write_sample_references(folder: str | Path, count: int = 2, size: int = 512) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        _painting(np.random.default_rng([7, index]), size).save(folder / f"reference_painting_{index}.png")
    return folder
