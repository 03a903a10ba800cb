"""Resumable checkpoints through accelerate's `save_state`/`load_state`.

accelerate saves the optimizer, the LR scheduler, the data sampler, the fp16 GradScaler and every
process's own RNG states (python, numpy, torch, CUDA). fangzhi adds, through hooks and
`register_for_checkpointing`: the LoRA weights alone (not the frozen base), the data position, and
each process's noise generator, so after a resume every process draws the noise it would have drawn.

A checkpoint folder is written under a temporary name and renamed by the main process once every
process has written its part, so a crash never leaves a half checkpoint that `--resume latest` would pick.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from fangzhi.config import read_config_file
from fangzhi.errors import FangzhiError

LORA_STATE_FILE = "lora_trainable.safetensors"


@dataclass
class TrainingPosition:
    """Where training stands; saved with every checkpoint (identical on every process)."""

    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class ProcessNoiseGenerator:
    """This process's generator for noise, timesteps and latent samples, seeded per process.

    accelerate writes custom objects from the main process only, so `state_dict` gathers every
    process's generator state (all processes call it inside `save_state`) and `load_state_dict`
    takes back this process's own.
    """

    def __init__(self, seed: int, accelerator: Accelerator):
        self.accelerator = accelerator
        self.generator = torch.Generator(accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)

    def state_dict(self) -> dict:
        return {"states": gather_object([self.generator.get_state()])}

    def load_state_dict(self, state: dict) -> None:
        states = state["states"]
        if len(states) != self.accelerator.num_processes:
            raise FangzhiError(
                f"the checkpoint was written by {len(states)} processes, this run has {self.accelerator.num_processes}; "
                "resume with the same number of processes"
            )
        self.generator.set_state(states[self.accelerator.process_index])


def _trainable_parameters(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {
        f"{name}.{param_name}": param
        for name, model in models.items()
        for param_name, param in model.named_parameters()
        if param.requires_grad
    }


def register_lora_state_hooks(accelerator: Accelerator, models: dict[str, torch.nn.Module]) -> None:
    """Checkpoints hold the LoRA weights only: the frozen base (3.4 GB for SD v1.5's UNet) is never copied."""

    def save_hook(prepared_models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = {key: param.detach().cpu().contiguous() for key, param in _trainable_parameters(models).items()}
            save_file(state, str(Path(output_dir) / LORA_STATE_FILE))
        weights.clear()  # accelerate would otherwise save every prepared model whole

    def load_hook(prepared_models: list, input_dir: str) -> None:
        state = load_file(str(Path(input_dir) / LORA_STATE_FILE))
        params = _trainable_parameters(models)
        differing = set(params) ^ set(state)
        reshaped = sorted(key for key in set(params) & set(state) if params[key].shape != state[key].shape)
        if differing or reshaped:
            example = (
                f"e.g. {reshaped[0]} is {tuple(state[reshaped[0]].shape)} there and {tuple(params[reshaped[0]].shape)} here"
                if reshaped else f"e.g. {sorted(differing)[0]} is in only one of them"
            )
            raise FangzhiError(
                f"{input_dir}: checkpoint does not match this config's LoRA layout ({len(differing) + len(reshaped)} parameters "
                f"differ, {example}); resume with the config it was made with"
            )
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])
        prepared_models.clear()  # loaded above; accelerate would otherwise look for whole-model files

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, global_step: int, keep: int) -> Path:
    """Every process calls this; the main process publishes the folder and prunes old ones."""
    final = checkpoints_dir / f"step-{global_step:08d}"
    partial = checkpoints_dir / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in sorted(checkpoints_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_same_lora(lora: dict, checkpoint: Path) -> None:
    """Refuse, before any model loads, to resume a checkpoint with other LoRA settings than the run that wrote it.

    Its run's resolved config sits two folders up (OUTPUT/config.yaml). Another rank or other target layers could not
    load; another alpha would silently rescale the weights trained so far. Without that file, the weights' shapes are
    still checked when the checkpoint loads.
    """
    saved_config = checkpoint.parent.parent / "config.yaml"
    if not saved_config.is_file():
        return
    saved = read_config_file(saved_config).get("lora") or {}
    changed = [f"lora.{key}: {saved[key]!r} there, {value!r} now" for key, value in lora.items() if key in saved and saved[key] != value]
    if changed:
        raise FangzhiError(
            f"--resume {checkpoint}: its run ({saved_config}) had other LoRA settings: " + "; ".join(changed)
            + ". Resume with those settings, or train into a new output_dir."
        )


def find_checkpoint(resume: str, checkpoints_dir: Path) -> Path:
    """'latest' → newest complete checkpoint under checkpoints_dir; otherwise the given folder."""
    if resume == "latest":
        found = sorted(checkpoints_dir.glob("step-*"))
        if not found:
            raise FangzhiError(f"--resume latest: no checkpoint in {checkpoints_dir} (checkpoints are written every checkpoint_every steps)")
        path = found[-1]
    else:
        path = Path(resume)
    if not (path / LORA_STATE_FILE).is_file():
        older = " (its state.pt is an older fangzhi's checkpoint format, which cannot be resumed; train again)" if (path / "state.pt").is_file() else ""
        raise FangzhiError(f"--resume {resume}: {path / LORA_STATE_FILE} not found{older}; give 'latest' or a checkpoints/step-N folder")
    return path
