"""LoRA style training: `train(TrainConfig)` → pytorch_lora_weights.safetensors; kohya export for A1111/ComfyUI."""

from fangzhi.train.config import LoraSettings, TrainConfig, ValidationSettings
from fangzhi.train.lora import LORA_WEIGHT_NAME, attach_lora, export_kohya, resolve_lora_file, save_lora

__all__ = ["LORA_WEIGHT_NAME", "attach_lora", "LoraSettings", "TrainConfig", "ValidationSettings", "export_kohya", "resolve_lora_file", "save_lora", "train"]


def __getattr__(name: str):
    if name == "train":
        from fangzhi.train.loop import train

        return train
    raise AttributeError(f"module 'fangzhi.train' has no attribute {name!r}")
