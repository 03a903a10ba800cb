"""CLIP scoring throughput (images/s): the tiny random model on CPU, and ViT-L-14-sized random weights on GPU.

Two numbers per model: end to end through `score_manifest` (PNG decode, sha256 check, preprocessing,
encoding, text encoding), and the image encoder alone on preprocessed batches. Images are 512×512 PNGs
written to a temporary generation manifest, the size Stable Diffusion v1.5 produces.

    .venv/bin/python bench/clip_bench.py                     # writes results/bench/clip_bench.json
    .venv/bin/python bench/clip_bench.py --large-device cpu  # ViT-L-14 on CPU as well (slow)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fangzhi.evaluate.clip_score import score_manifest  # noqa: E402
from fangzhi.models.clip import build_tiny_clip, load_clip  # noqa: E402
from fangzhi.rating_app.sample import write_sample_manifest  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, clip, manifest: Path, n_images: int, batch_size: int) -> dict:
    model, preprocess, _ = clip
    device = next(model.parameters()).device
    score_manifest(manifest, clip, batch_size=batch_size)  # warm-up: allocator, kernels, file cache
    synchronize(device)
    start = time.perf_counter()
    score_manifest(manifest, clip, batch_size=batch_size)
    synchronize(device)
    end_to_end = time.perf_counter() - start

    pixels = torch.stack([preprocess(Image.new("RGB", (512, 512), (i, 100, 200))) for i in range(batch_size)]).to(device)
    batches = max(1, n_images // batch_size)
    with torch.no_grad():
        model.encode_image(pixels)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            model.encode_image(pixels)
        synchronize(device)
    encoder_only = time.perf_counter() - start
    result = {
        "model": name, "device": str(device), "parameters": sum(p.numel() for p in model.parameters()),
        "images": n_images, "batch_size": batch_size,
        "end_to_end_images_per_s": n_images / end_to_end, "end_to_end_seconds": end_to_end,
        "image_encoder_images_per_s": batches * batch_size / encoder_only,
    }
    print(f"{name} on {device}: {result['end_to_end_images_per_s']:.1f} images/s end to end, "
          f"{result['image_encoder_images_per_s']:.1f} images/s image encoder only")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in the benchmark manifest (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--large-device", choices=["auto", "cpu", "cuda", "none"], default="auto",
                        help="where to run ViT-L-14 (auto: CUDA when present, else skipped)")
    parser.add_argument("--out", default="results/bench/clip_bench.json")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Two arms × two seeds per prompt, 512 px painting-like PNGs: a complete generation manifest.
        n_prompts = max(1, args.images // 4)
        manifest = write_sample_manifest(tmp / "run", n_prompts=n_prompts, seeds=(0, 1), size=512)
        n_images = 4 * n_prompts
        tiny = load_clip(pretrained=str(build_tiny_clip(tmp / "tiny-clip")), device="cpu")
        results.append(measure("tiny (fangzhi.models.clip.build_tiny_clip)", tiny, manifest, n_images, args.batch_size))

        large_device = args.large_device
        if large_device == "auto":
            large_device = "cuda" if torch.cuda.is_available() else "none"
        if large_device != "none":
            import open_clip

            # ViT-L-14's architecture with random weights: the speed of the real scorer without the download.
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None, device=large_device)
            large = (model.eval(), preprocess, open_clip.get_tokenizer("ViT-L-14"))
            results.append(measure("ViT-L-14 (random weights)", large, manifest, n_images, args.batch_size))

    record = {
        "benchmark": "clip_bench",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
