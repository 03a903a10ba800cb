"""Read a training folder (images + captions) and report every problem before training starts.

A dataset is one folder of images with captions given in either (or both) of two conventions:

* kohya sidecars: `painting_01.png` is captioned by `painting_01.txt` beside it;
* Hugging Face imagefolder: a `metadata.jsonl` with lines `{"file_name": "painting_01.png", "text": "..."}`.

When both give a caption for the same image, **the sidecar wins** (it is the file people edit by
hand, next to the image) and a note reports the disagreement. Only images at the top level of the
folder are used; subfolders are reported and ignored.

`check_dataset` decodes every image fully, so a truncated download fails here, with its file
name, rather than in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fangzhi.errors import FangzhiError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class Entry:
    """One usable training example: an image file and its caption (without the trigger phrase)."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Problem:
    """One finding about one file. 'error' stops training; 'note' is informational."""

    path: Path
    severity: Literal["error", "note"]
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.severity}: {self.message}"


@dataclass
class DatasetReport:
    """What `check_dataset` found: the usable entries and every problem, in file order."""

    folder: Path
    resolution: int
    image_count: int
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "note"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return (
            f"{self.folder}: {self.image_count} images, {len(self.entries)} usable at resolution {self.resolution}, "
            f"{len(self.errors)} errors, {len(self.notes)} notes"
        )


def read_rgb(path: str | Path, min_side: int | None = None) -> tuple[Image.Image, str]:
    """Decode an image fully and return it as 8-bit RGB, with the mode it had on disk.

    Raises whatever PIL raises for unreadable files (OSError, SyntaxError, ValueError, ...).
    Transparent pixels are put on white (paintings sit on paper; black would invent ink), and
    16-bit greyscale is scaled to 8 bits (PIL's own conversion clips everything above 255 to white).
    With `min_side`, a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that keeps both
    sides at least `min_side` pixels: about 4× faster for a scan that is then shrunk to that size anyway.
    """
    with Image.open(path) as opened:
        if min_side:
            opened.draft(None, (min_side, min_side))
        opened.load()
        ImageOps.exif_transpose(opened, in_place=True)  # a copy of a large scan costs tens of ms
        image = opened
    original_mode = image.mode
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        # "I" has no fixed depth: values above 255 mean it holds 16-bit data (old PIL opened 16-bit PNGs as "I").
        if image.mode != "I" or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    # convert() copies even an RGB image: tens of ms for a large scan.
    return (image if image.mode == "RGB" else image.convert("RGB")), original_mode


@dataclass(frozen=True)
class _Decoded:
    """What the check keeps of a decoded image (not its pixels)."""

    mode: str  # as stored on disk
    size: tuple[int, int]
    pixel_hash: str  # sha256 of the size and the RGB pixels: equal for the same picture in another file


def _decode(path: Path) -> _Decoded | Exception:
    """Decode one image fully (on a worker thread); the error instead when it cannot be read."""
    try:
        image, mode = read_rgb(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Truncated or corrupt data surfaces as OSError or SyntaxError, only once the pixels are decoded.
        return exc
    width, height = image.size
    return _Decoded(mode, image.size, hashlib.sha256(f"{width}x{height}".encode() + image.tobytes()).hexdigest())


def _conversion_note(mode: str) -> str:
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return f"mode {mode}: converted to RGB (any transparent areas are put on white)"
    if mode in _SIXTEEN_BIT_MODES:
        return f"mode {mode} (16-bit): scaled to 8 bits and converted to RGB"
    return f"mode {mode}: converted to RGB"


def _normalise_caption(text: str) -> str:
    # Line breaks and runs of spaces mean nothing to the text encoder; one space keeps captions comparable.
    return " ".join(text.split())


def _read_metadata(folder: Path, image_names: set[str], problems: list[Problem]) -> dict[str, tuple[str, str]]:
    """Captions from metadata.jsonl: file name -> (caption, 'metadata.jsonl line N')."""
    metadata_path = folder / METADATA_FILE
    captions: dict[str, tuple[str, str]] = {}
    if not metadata_path.is_file():
        return captions
    try:
        lines = metadata_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        problems.append(Problem(metadata_path, "error", f"not UTF-8 text ({exc}); save it as UTF-8"))
        return captions
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def report(message: str) -> None:
            problems.append(Problem(metadata_path, "error", f"line {number}: {message}"))

        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report(f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            report('must be a JSON object like {"file_name": "x.png", "text": "..."}')
            continue
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            report('missing "file_name" (the image file name, relative to the folder)')
            continue
        if file_name not in image_names:
            if (folder / file_name).exists():
                report(f"file_name {file_name!r} is not an image at the top level of the folder")
            else:
                report(f"file_name {file_name!r}: file not found in {folder}")
            continue
        if file_name in first_line_of:
            report(f"file_name {file_name!r} already appears on line {first_line_of[file_name]}; keep one line per image")
            continue
        first_line_of[file_name] = number
        if "text" not in record:
            continue
        if not isinstance(record["text"], str):
            report(f'"text" for {file_name!r} must be a string, got {json.dumps(record["text"])}')
            continue
        captions[file_name] = (_normalise_caption(record["text"]), f"{METADATA_FILE} line {number}")
    return captions


def check_dataset(folder: str | Path, resolution: int = 512, allow_upscale: bool = False) -> DatasetReport:
    """Check every image and caption in `folder` for training at `resolution` pixels.

    Errors (the image cannot be trained on as it is): unreadable or truncated files, files with an
    image extension that are not images, a short side below `resolution` (upscaling blurs the very
    brushwork the LoRA should learn; `allow_upscale=True` turns this into a note), missing or empty
    captions, an image whose pixels are identical to an earlier file's, bad metadata.jsonl lines,
    and a folder with no images. Notes: non-RGB modes (converted at load), sidecar/metadata caption
    disagreements, caption files without an image, ignored subfolders.

    Raises FangzhiError only when `folder` is missing or not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FangzhiError(f"dataset folder not found: {folder}")
    if not folder.is_dir():
        raise FangzhiError(f"{folder} is a file; give the folder that holds the images")
    if resolution < 1:
        raise FangzhiError(f"resolution must be a positive number of pixels, got {resolution}")

    children = sorted(folder.iterdir())
    image_paths = [p for p in children if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    report = DatasetReport(folder=folder, resolution=resolution, image_count=len(image_paths))
    problems = report.problems

    if not image_paths:
        problems.append(Problem(folder, "error", f"no images here (looked for {' '.join(IMAGE_EXTENSIONS)} at the top level)"))
    for child in children:
        if child.is_dir() and not child.name.startswith("."):
            problems.append(Problem(child, "note", "subfolder ignored: only images at the top level of the dataset folder are used"))
    image_stems = {p.stem for p in image_paths}
    for child in children:
        if child.is_file() and child.suffix == ".txt" and child.stem not in image_stems:
            problems.append(Problem(child, "note", "caption file without an image of the same name; ignored"))

    metadata_captions = _read_metadata(folder, {p.name for p in image_paths}, problems)

    # Decoding is most of the check's time (a 2400x3600 scan: ~0.2 s), and PIL and hashlib release the GIL.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(_decode, image_paths))
    first_file_with_pixels: dict[str, Path] = {}
    for path, result in zip(image_paths, decoded):
        file_ok = True
        sidecar = path.with_suffix(".txt")
        sidecar_caption = None
        if sidecar.is_file():
            try:
                sidecar_caption = (_normalise_caption(sidecar.read_text(encoding="utf-8-sig")), sidecar.name)
            except UnicodeDecodeError as exc:
                problems.append(Problem(sidecar, "error", f"caption is not UTF-8 text ({exc}); save it as UTF-8"))
                file_ok = False
        metadata_caption = metadata_captions.get(path.name)
        if sidecar_caption and metadata_caption and sidecar_caption[0] != metadata_caption[0]:
            problems.append(Problem(path, "note", f"{sidecar_caption[1]} and {metadata_caption[1]} give different captions; using {sidecar_caption[1]}"))
        caption = sidecar_caption or metadata_caption
        if caption is None:
            if file_ok:
                problems.append(Problem(path, "error", f"no caption: write {sidecar.name} beside it or add it to {METADATA_FILE}"))
            file_ok = False
        elif not caption[0]:
            problems.append(Problem(path, "error", f"caption is empty ({caption[1]})"))
            file_ok = False

        if isinstance(result, UnidentifiedImageError):
            problems.append(Problem(path, "error", f"not an image: PIL does not recognise its contents despite the {path.suffix} name; remove it or re-export it"))
            continue
        if isinstance(result, Exception):
            problems.append(Problem(path, "error", f"cannot be read as an image, truncated or corrupt ({type(result).__name__}: {result}); re-export or remove it"))
            continue
        if result.mode != "RGB":
            problems.append(Problem(path, "note", _conversion_note(result.mode)))
        width, height = result.size
        if min(width, height) < resolution:
            message = f"{width}x{height} is smaller than the training resolution {resolution} on the short side"
            if allow_upscale:
                problems.append(Problem(path, "note", message + "; it will be upscaled"))
            else:
                problems.append(Problem(path, "error", message + "; upscaling blurs the brushwork: remove it, lower the resolution, or allow upscaling (--allow-upscale)"))
                file_ok = False
        if result.pixel_hash in first_file_with_pixels:
            problems.append(Problem(path, "error", f"duplicate: same pixels as {first_file_with_pixels[result.pixel_hash]}; remove one of the two"))
            file_ok = False
        else:
            first_file_with_pixels[result.pixel_hash] = path
        if file_ok:
            report.entries.append(Entry(path=path, caption=caption[0]))
    return report
