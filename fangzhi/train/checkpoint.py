"""Resumable checkpoints: LoRA weights, optimizer, LR scheduler, data position and every RNG state.

A checkpoint folder is written under a temporary name and renamed, so a crash never leaves a
half checkpoint that `--resume latest` would pick.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fangzhi.errors import FangzhiError

STATE_FILE = "state.pt"


@dataclass
class TrainingPosition:
    global_step: int
    epoch: int
    batches_done_in_epoch: int


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{param_name}": param.detach().cpu().clone()
        for name, model in models.items()
        for param_name, param in model.named_parameters()
        if param.requires_grad
    }


def save_checkpoint(
    checkpoints_dir: Path,
    position: TrainingPosition,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    noise_generator: torch.Generator,
    keep: int,
) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{position.global_step:08d}"
    partial = checkpoints_dir / f".partial-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    torch.save(
        {
            "position": position.__dict__,
            "trainable": trainable_state(models),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "noise_generator": noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        },
        partial / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(checkpoints_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def find_checkpoint(resume: str, checkpoints_dir: Path) -> Path:
    """'latest' → newest complete checkpoint under checkpoints_dir; otherwise the given folder."""
    if resume == "latest":
        found = sorted(checkpoints_dir.glob("step-*"))
        if not found:
            raise FangzhiError(f"--resume latest: no checkpoint in {checkpoints_dir} (checkpoints are written every checkpoint_every steps)")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FangzhiError(f"--resume {resume}: {path / STATE_FILE} not found; give 'latest' or a checkpoints/step-N folder")
    return path


def load_checkpoint(
    path: Path,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    noise_generator: torch.Generator,
) -> TrainingPosition:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    params = {
        f"{name}.{param_name}": param
        for name, model in models.items()
        for param_name, param in model.named_parameters()
        if param.requires_grad
    }
    missing = set(params) ^ set(state["trainable"])
    if missing:
        raise FangzhiError(f"{path}: checkpoint does not match this config's LoRA layout ({len(missing)} parameters differ); resume with the config it was made with")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state["trainable"][key])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    noise_generator.set_state(state["noise_generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return TrainingPosition(**state["position"])
