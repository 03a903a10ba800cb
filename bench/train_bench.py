"""Training speed and peak memory: tiny base on CPU always; SD v1.5-size (random weights) at 512 on a CUDA GPU.

Writes results/bench/train.json. Seconds per step are read from the run's own loss.csv: its `seconds`
column is stamped when a logging window's losses reach the host (every log_every steps, one sync), so the
time is taken between window ends, skipping the first window, which includes one-off warm-up work.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from fangzhi.models import build_sd15_random_base, build_tiny_base
from fangzhi.train import TrainConfig, train



def seconds_per_step(loss_csv: Path) -> float:
    with open(loss_csv, newline="") as handle:
        rows = [(int(row["step"]), float(row["seconds"])) for row in csv.DictReader(handle)]
    ends = [row for index, row in enumerate(rows) if index + 1 == len(rows) or rows[index + 1][1] != row[1]]
    if len(ends) < 2:
        raise SystemExit(f"{loss_csv}: fewer than two logging windows; give more steps than 2 x log_every")
    (first_step, first_seconds), (last_step, last_seconds) = ends[0], ends[-1]
    return (last_seconds - first_seconds) / (last_step - first_step)


def run_case(name: str, base: str, work: Path, steps: int, **settings) -> dict:
    out = work / name
    cfg = TrainConfig.model_validate({"base": base, "output_dir": str(out), "max_steps": steps, "checkpoint_every": 10**6, **settings})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train(cfg)
    result = {
        "case": name,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "resolution": cfg.data.resolution,
        "mixed_precision": cfg.mixed_precision,
        "optimizer": cfg.optimizer,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "log_every": cfg.log_every,
        "seconds_per_step": round(seconds_per_step(out / "loss.csv"), 4),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    result["steps_per_second"] = round(1 / result["seconds_per_step"], 2)
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench/train.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpu-steps", type=int, default=40)
    parser.add_argument("--sd15-base", help="an sd15-random base folder to reuse (bench/gpu.sh builds one for all benchmarks)")
    args = parser.parse_args()

    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tiny = str(build_tiny_base(work / "tiny-base"))
        tiny_settings = {"data": {"resolution": 64, "repeats": 8}, "batch_size": 2, "optimizer": "adamw8bit", "lora": {"rank": 4, "alpha": 4},
                         "log_every": max(1, args.steps // 4)}
        cases.append(run_case("tiny-cpu-64px-b2", tiny, work, args.steps, **tiny_settings))
        cases[-1]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        if torch.cuda.is_available():
            sd15 = args.sd15_base or str(build_sd15_random_base(work / "sd15-random"))
            gpu_settings = {"data": {"resolution": 512, "repeats": 40, "random_flip": False, "allow_upscale": True}, "batch_size": 2,
                            "mixed_precision": "bf16", "optimizer": "adamw8bit"}
            for checkpointing in (False, True):
                name = f"sd15-random-512px-b2-bf16{'-gc' if checkpointing else ''}"
                cases.append(run_case(name, sd15, work, args.gpu_steps, gradient_checkpointing=checkpointing, **gpu_settings))

    report = {
        "benchmark": "train",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cases": cases,
        "targets": {"sd15_512_b2_steps_per_second_h100": 10, "sd15_512_b2_gc_peak_gib": 8},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
