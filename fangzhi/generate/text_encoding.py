"""Encode prompts longer than CLIP's 77-token window, the way AUTOMATIC1111's web UI and `compel` do.

SD v1.5's CLIP text encoder sees 77 positions: a start token, 75 text tokens and an end token; the
standard pipeline silently drops everything after token 75. Narrative prompts are longer, so by
default (`mode="chunk"`) we tokenize without truncation, cut the ids into 75-token chunks, wrap each
chunk as its own 77-token sequence (start + chunk + end, padded), encode every chunk and concatenate
the hidden states along the sequence axis: a prompt of k chunks gives [77 * k, hidden] conditioning.
The UNet's cross-attention accepts any sequence length, so the result goes straight to diffusers:

    prompt_embeds, negative_embeds, chunked = encode_prompt_pair(
        pipe.tokenizer, pipe.text_encoder, prompts, negatives)
    pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, ...)

diffusers requires `prompt_embeds` and `negative_prompt_embeds` to have the same shape, and every
row of a batch must have the same length, so shorter prompts are padded with encoded empty chunks
(start, end, padding), as A1111 does. `mode="truncate"` keeps only the first 75 tokens, which is
exactly what diffusers does with a plain `prompt=` string.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

logger = logging.getLogger(__name__)

EncodeMode = Literal["chunk", "truncate"]


def chunk_token_ids(tokenizer, prompts: list[str], mode: EncodeMode) -> list[list[list[int]]]:
    """For each prompt, its text token ids (no start/end) cut into chunks of at most 75."""
    chunk_size = tokenizer.model_max_length - 2
    # The length warning is moot here: long prompts are chunked (or truncated) below, never fed whole.
    all_ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    chunked_ids = []
    for prompt, ids in zip(prompts, all_ids):
        if mode == "truncate":
            if len(ids) > chunk_size:
                logger.warning("prompt truncated from %d to %d CLIP tokens: %.60s...", len(ids), chunk_size, prompt)
            chunks = [ids[:chunk_size]]
        else:
            # An empty prompt still needs one (empty) chunk: it encodes to start + end + padding.
            chunks = [ids[start : start + chunk_size] for start in range(0, len(ids), chunk_size)] or [[]]
        chunked_ids.append(chunks)
    return chunked_ids


@torch.no_grad()
def _encode_chunked_ids(tokenizer, text_encoder, chunked_ids: list[list[list[int]]]) -> torch.Tensor:
    """Encode every prompt's chunks, padded with empty chunks to the longest prompt: [B, 77 * k, hidden]."""
    window = tokenizer.model_max_length
    num_chunks = max(len(chunks) for chunks in chunked_ids)
    rows = []
    for chunks in chunked_ids:
        for chunk in chunks + [[]] * (num_chunks - len(chunks)):
            ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
            rows.append(ids + [tokenizer.pad_token_id] * (window - len(ids)))
    input_ids = torch.tensor(rows, dtype=torch.long, device=text_encoder.device)
    # Like diffusers' StableDiffusionPipeline for SD v1.5: no attention mask (CLIP's causal mask means
    # padding after the end token cannot change the states before it), last hidden state.
    hidden = text_encoder(input_ids)[0]
    return hidden.reshape(len(chunked_ids), num_chunks * window, hidden.shape[-1])


def encode_prompts(tokenizer, text_encoder, prompts: list[str], mode: EncodeMode = "chunk") -> tuple[torch.Tensor, list[bool]]:
    """Encode a batch of prompts into [B, 77 * k, hidden] states; `chunked[i]` is True when prompt i needed k > 1.

    `tokenizer` is a CLIPTokenizer (model_max_length 77), `text_encoder` a CLIPTextModel. k is the
    largest chunk count in the batch; shorter prompts are padded with encoded empty chunks.
    """
    if mode not in ("chunk", "truncate"):
        raise ValueError(f"mode must be 'chunk' or 'truncate', got {mode!r}")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    chunked_ids = chunk_token_ids(tokenizer, list(prompts), mode)
    return _encode_chunked_ids(tokenizer, text_encoder, chunked_ids), [len(chunks) > 1 for chunks in chunked_ids]


def encode_prompt_pair(
    tokenizer, text_encoder, prompts: list[str], negative_prompts: list[str], mode: EncodeMode = "chunk"
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Encode prompts and their negative prompts to equal shapes, ready for diffusers' `prompt_embeds` /
    `negative_prompt_embeds` (pass "" for no negative prompt: that is diffusers' unconditional input).

    Returns (prompt_embeds, negative_prompt_embeds, chunked) where `chunked[i]` is True when prompt i
    was longer than 75 tokens (a long negative prompt is chunked too, but is not what `chunked` reports).
    """
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    embeddings, chunked = encode_prompts(tokenizer, text_encoder, list(prompts) + list(negative_prompts), mode)
    batch = len(prompts)
    return embeddings[:batch], embeddings[batch:], chunked[:batch]
