"""Copy a reproducible random subset of a dataset folder (e.g. 246 of 2,192 paintings) into a new folder."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from fangzhi.data.check import IMAGE_EXTENSIONS, METADATA_FILE
from fangzhi.errors import FangzhiError


def _metadata_records(src: Path) -> dict[str, dict]:
    """The source's metadata.jsonl records by file name; unreadable lines are skipped (`check_dataset` reports them)."""
    path = src / METADATA_FILE
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file_name"), str):
            records.setdefault(record["file_name"], record)
    return records


def select_subset(src: str | Path, n: int, out: str | Path, seed: int = 0) -> list[Path]:
    """Copy `n` images chosen at random from `src` into the new folder `out`, with their captions.

    The choice depends only on the sorted image file names and `seed` (`random.Random(seed).sample`),
    so the same inputs always select the same files. Sidecar `.txt` captions are copied as they are,
    and `out/metadata.jsonl` gets one line per selected image: the source's metadata line (all its
    keys) with `text` set to the caption training will use (the sidecar's when there is one).
    Returns the copied image paths in `out`, sorted. Refuses to write into a non-empty `out`.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FangzhiError(f"source dataset folder not found: {src}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FangzhiError(f"{out} already exists and is not an empty folder; choose a new --out folder (nothing was copied)")
    image_names = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if n < 1:
        raise FangzhiError(f"--n must be at least 1, got {n}")
    if n > len(image_names):
        raise FangzhiError(f"asked for {n} images but {src} has only {len(image_names)}; lower --n")

    chosen = sorted(random.Random(seed).sample(image_names, n))
    metadata = _metadata_records(src)
    out.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    metadata_lines: list[str] = []
    for name in chosen:
        copied.append(Path(shutil.copy2(src / name, out / name)))
        record = {"file_name": name, **metadata.get(name, {})}
        sidecar = (src / name).with_suffix(".txt")
        if sidecar.is_file():
            shutil.copy2(sidecar, out / sidecar.name)
            # Keep metadata.jsonl in agreement with the sidecar, which is what training reads (sidecar wins).
            record["text"] = sidecar.read_text(encoding="utf-8-sig", errors="replace").strip()
        metadata_lines.append(json.dumps(record, ensure_ascii=False))
    (out / METADATA_FILE).write_text("\n".join(metadata_lines) + "\n", encoding="utf-8")
    return copied
