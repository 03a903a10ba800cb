"""diffusers → original LDM key names for SD v1.x, so tests can write the single-file checkpoints that A1111/ComfyUI use.

diffusers only converts the other way (`diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint`); this is the
inverse of those functions, after diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, with the
block numbering read from the models' configs instead of hard-coded for SD v1.5's four blocks of two layers.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                     "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state_dict: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, dict[str, str]]]) -> dict[str, torch.Tensor]:
    """Rename every key by its diffusers module prefix (→ LDM prefix) and the part after it (→ LDM part name)."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no LDM name known for diffusers key {key}")
        ldm_prefix, parts = prefixes[prefix]
        rest = key[len(prefix):]
        part = next((p for p in parts if rest.startswith(p + ".")), None)
        if part is not None:
            rest = parts[part] + rest[len(part):]
        renamed[ldm_prefix + rest] = tensor
    return renamed


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    # LDM numbers the UNet's layers flat: input_blocks.0 is conv_in, then per down block `layers` resnet(+attention)
    # blocks and one downsampler; output_blocks has `layers + 1` per up block, the upsampler inside the last one.
    layers = unet.config.layers_per_block
    prefixes = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET_PARTS),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET_PARTS),
    }
    for i, block in enumerate(unet.down_blocks):
        for j in range(layers):
            index = (layers + 1) * i + j + 1
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{index}.0.", UNET_RESNET_PARTS)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{index}.1.", {})
        if block.downsamplers is not None:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", {})
    for i, block in enumerate(unet.up_blocks):
        for j in range(layers + 1):
            index = (layers + 1) * i + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{index}.0.", UNET_RESNET_PARTS)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{index}.1.", {})
        if block.upsamplers is not None:
            position = 2 if hasattr(block, "attentions") else 1
            prefixes[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{(layers + 1) * i + layers}.{position}.", {})
    return _rename(unet.state_dict(), prefixes)


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    # LDM's decoder counts its up blocks from the lowest resolution, diffusers' from the highest.
    prefixes = {"encoder.conv_norm_out.": ("encoder.norm_out.", {}), "decoder.conv_norm_out.": ("decoder.norm_out.", {})}
    for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.", "post_quant_conv."):
        prefixes[name] = (name, {})
    for coder in ("encoder", "decoder"):
        prefixes[f"{coder}.mid_block.resnets.0."] = (f"{coder}.mid.block_1.", VAE_RESNET_PARTS)
        prefixes[f"{coder}.mid_block.resnets.1."] = (f"{coder}.mid.block_2.", VAE_RESNET_PARTS)
        prefixes[f"{coder}.mid_block.attentions.0."] = (f"{coder}.mid.attn_1.", VAE_ATTENTION_PARTS)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", VAE_RESNET_PARTS)
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
    last = len(vae.decoder.up_blocks) - 1
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{last - i}.block.{j}.", VAE_RESNET_PARTS)
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{last - i}.upsample.", {})
    state_dict = _rename(vae.state_dict(), prefixes)
    # LDM's mid-block attention projects with 1x1 convolutions, diffusers' with linear layers.
    for key, tensor in state_dict.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            state_dict[key] = tensor.reshape(*tensor.shape, 1, 1)
    return state_dict


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    # LDM keeps Hugging Face's CLIPTextModel names under `cond_stage_model.transformer.text_model.`; transformers 5
    # dropped the `text_model.` level from CLIPTextModel's own state dict, older versions have it.
    return {
        "cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in text_encoder.state_dict().items()
    }


def diffusers_to_ldm_state_dict(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """One SD v1.x checkpoint state dict in the original LDM layout (UNet, VAE, CLIP text encoder), sharing the pipeline's tensors."""
    return {
        **{"model.diffusion_model." + key: tensor for key, tensor in unet_to_ldm(pipe.unet).items()},
        **{"first_stage_model." + key: tensor for key, tensor in vae_to_ldm(pipe.vae).items()},
        **text_encoder_to_ldm(pipe.text_encoder),
    }
