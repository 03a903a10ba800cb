"""Training speed and peak memory: tiny base on CPU always; SD v1.5-size (random weights) at 512 on a CUDA GPU.

Writes results/bench/train.json. With --extras, instead: the same setting with `compile: true`, with
`cache_latents: true` (every image encoded once before training, no decoding or VAE per step), and a
profile of the eager step (kernels launched and GPU-busy time per step, against the step's wall time, which
says whether a step is bound by the GPU's arithmetic or by launching kernels), into train_extras.json. Seconds per step are read from the run's own loss.csv: its `seconds`
column is stamped when a logging window's losses reach the host (every log_every steps, one sync), so the
time is taken between window ends, skipping the first window, which includes one-off warm-up work.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

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


def bench_config(out: Path, base: str, steps: int, **settings) -> TrainConfig:
    shutil.rmtree(out, ignore_errors=True)
    return TrainConfig.model_validate({"base": base, "output_dir": str(out), "max_steps": steps, "checkpoint_every": 10**6, **settings})


def run_case(name: str, base: str, work: Path, steps: int, **settings) -> dict:
    out = work / name
    cfg = bench_config(out, base, steps, **settings)
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
        "compile": cfg.compile,
        "cache_latents": cfg.cache_latents,
        "log_every": cfg.log_every,
        "seconds_per_step": round(seconds_per_step(out / "loss.csv"), 4),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    result["steps_per_second"] = round(1 / result["seconds_per_step"], 2)
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))
    return result


def profile_steps(name: str, base: str, work: Path, steps: int, **settings) -> dict:
    """Kernels and GPU-busy time per step: two profiled runs of `steps` and 2 x `steps` steps, differenced (loading cancels out)."""
    counts = []
    for run_steps in (steps, 2 * steps):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            train(bench_config(work / f"{name}-{run_steps}", base, run_steps, **settings))
        events = prof.events()
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        by_name: dict[str, float] = {}
        for kernel in kernels:
            by_name[kernel.name] = by_name.get(kernel.name, 0.0) + kernel.time_range.elapsed_us()
        counts.append({"operators": sum(1 for event in events if event.cpu_parent is None and event.name.startswith("aten::")),
                       "kernels": len(kernels), "gpu_busy_us": sum(by_name.values()), "by_name": by_name})
    short, long = counts
    top = sorted(((long["by_name"][k] - short["by_name"].get(k, 0.0)) / steps, k) for k in long["by_name"])[::-1][:12]
    result = {
        "case": f"{name}-profile",
        "top_level_operators_per_step": round((long["operators"] - short["operators"]) / steps, 1),
        "kernels_per_step": round((long["kernels"] - short["kernels"]) / steps, 1),
        "gpu_busy_ms_per_step": round((long["gpu_busy_us"] - short["gpu_busy_us"]) / steps / 1000, 3),
        "top_kernels_ms_per_step": [{"kernel": kernel[:120], "ms": round(us / 1000, 3)} for us, kernel in top],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels_ms_per_step"}))
    return result


def write_report(out_file: Path, cases: list[dict]) -> None:
    report = {
        "benchmark": "train",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cases": cases,
        "targets": {"sd15_512_b2_steps_per_second_h100": 10, "sd15_512_b2_gc_peak_gib": 8},
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="default results/bench/train.json, or train_extras.json with --extras")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpu-steps", type=int, default=40)
    parser.add_argument("--sd15-base", help="an sd15-random base folder to reuse (bench/gpu.sh builds one for all benchmarks)")
    parser.add_argument("--extras", action="store_true", help="the compiled case and the step profile instead of the plain cases")
    args = parser.parse_args()
    out_file = Path(args.out or f"results/bench/train{'_extras' if args.extras else ''}.json")

    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tiny = str(build_tiny_base(work / "tiny-base"))
        tiny_settings = {"data": {"resolution": 64, "repeats": 8}, "batch_size": 2, "optimizer": "adamw8bit", "lora": {"rank": 4, "alpha": 4},
                         "log_every": max(1, args.steps // 4)}
        if torch.cuda.is_available():
            sd15 = args.sd15_base or str(build_sd15_random_base(work / "sd15-random"))
            gpu_settings = {"data": {"resolution": 512, "repeats": 40, "random_flip": False, "allow_upscale": True}, "batch_size": 2,
                            "mixed_precision": "bf16", "optimizer": "adamw8bit"}
            setting = ("sd15-random-512px-b2-bf16", sd15, args.gpu_steps, gpu_settings)
        else:
            setting = ("tiny-cpu-64px-b2", tiny, args.steps, tiny_settings)
        name, base, steps, settings = setting
        if args.extras:
            # Cheapest first, and the JSON rewritten after each, so that a time limit keeps what finished.
            cases.append(run_case(f"{name}-cache-latents", base, work, steps, cache_latents=True, **settings))
            write_report(out_file, cases)
            cases.append(profile_steps(name, base, work, max(2, steps // 4), **settings))
            write_report(out_file, cases)
            cases.append(run_case(f"{name}-compile", base, work, steps, compile=True, **settings))
        else:
            cases.append(run_case("tiny-cpu-64px-b2", tiny, work, args.steps, **tiny_settings))
            cases[-1]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
            if torch.cuda.is_available():
                for checkpointing in (False, True):
                    cases.append(run_case(f"{name}{'-gc' if checkpointing else ''}", base, work, steps, gradient_checkpointing=checkpointing, **settings))

    write_report(out_file, cases)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
