"""How fast one DataLoader worker turns a full-size painting into a training crop.

Training without `cache_latents` reads every image every step: a worker's time per image bounds the steps/s any
GPU can reach (4 workers at t seconds per image feed at most 4 / (t × batch) steps/s). Real paintings are scans
of thousands of pixels, not the 282-px demo images, so this times `CaptionedImageDataset[i]` (decode, EXIF,
RGB, resize to the training resolution, crop, tensor) on a 2400×3600 painting saved as JPEG and as PNG, on one
thread; and `check_dataset`, which decodes every image fully before training starts, over a folder of eight
such scans (JPEG), with the machine's cores. Writes results/bench/data.json.

    python bench/data_bench.py [--resolution 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fangzhi.data import DEMO_DATASET, CaptionedImageDataset, Entry, check_dataset

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench"
SIZE = (2400, 3600)
BATCH = 2
WORKERS = 4


CHECKED_SCANS = 8


def scan(index: int) -> Image.Image:
    """A demo painting enlarged to SIZE with film-grain noise (so the files compress like a scan)."""
    image = Image.open(sorted(DEMO_DATASET.glob("*.png"))[index % 8]).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(index).integers(-12, 12, (SIZE[1], SIZE[0], 1))
    return Image.fromarray(np.clip(np.asarray(image).astype(np.int16) + grain, 0, 255).astype(np.uint8))


def painting(folder: Path) -> dict[str, Path]:
    """One scan as JPEG q92 and as PNG."""
    image = scan(0)
    paths = {"jpeg": folder / "painting.jpg", "png": folder / "painting.png"}
    image.save(paths["jpeg"], quality=92)
    image.save(paths["png"])
    return paths


def check_seconds(folder: Path) -> float:
    """`check_dataset` over CHECKED_SCANS captioned JPEG scans, the fastest of two runs."""
    folder.mkdir()
    for index in range(CHECKED_SCANS):
        scan(index).save(folder / f"scan_{index}.jpg", quality=92)
        (folder / f"scan_{index}.txt").write_text("a landscape")
    times = []
    for _ in range(2):
        started = time.perf_counter()
        report = check_dataset(folder, resolution=512)
        times.append(time.perf_counter() - started)
    assert len(report.entries) == CHECKED_SCANS, report.problems
    return min(times)


def seconds_per_image(path: Path, resolution: int, repeats: int) -> float:
    dataset = CaptionedImageDataset([Entry(path, "a landscape")], resolution=resolution)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dataset[0]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7, help="reads per format; the fastest counts")
    parser.add_argument("--out", default=str(RESULTS / "data.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        check = check_seconds(Path(scratch) / "dataset")
        torch.set_num_threads(1)  # a DataLoader worker's share
        paths = painting(Path(scratch))
        runs = {}
        for kind, path in paths.items():
            seconds = seconds_per_image(path, args.resolution, args.repeats)
            runs[kind] = {
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "seconds_per_image": round(seconds, 4),
                f"steps_per_second_ceiling_{WORKERS}_workers_batch_{BATCH}": round(WORKERS / (seconds * BATCH), 1),
            }
    report = {
        "benchmark": "data", "painting_px": list(SIZE), "resolution": args.resolution, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": runs,  # one thread
        "check_dataset": {"scans": CHECKED_SCANS, "seconds": round(check, 3), "seconds_per_scan": round(check / CHECKED_SCANS, 4)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
