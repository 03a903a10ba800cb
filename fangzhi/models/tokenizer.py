"""A Stable Diffusion v1.5 text tokenizer built offline from the BPE file that open_clip ships.

SD v1.5's `tokenizer/` folder is OpenAI CLIP ViT-L/14's BPE tokenizer. Its vocabulary is not a
separate download: it is derived from the merges list in `bpe_simple_vocab_16e6.txt.gz`, exactly as
OpenAI's `SimpleTokenizer` builds it (256 byte symbols, the same 256 with `</w>`, one token per merge,
then the two special tokens: 49408 entries). We write `vocab.json`, `merges.txt` and the two small
config files `transformers.CLIPTokenizer` reads, so the folder can serve as a diffusers pipeline's `tokenizer/`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file (the rest would overflow the
# 49408-token embedding table); the file's first line is a version header, not a merge.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def clip_tokenizer_from_open_clip_bpe(out_dir: str | Path, bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """Write CLIP's `vocab.json` and `merges.txt` into `out_dir` and return the tokenizer loaded from there.

    `bpe_path` defaults to open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`. Token ids match
    `open_clip.tokenizer.SimpleTokenizer` (start 49406, end 49407), and `model_max_length` is 77,
    CLIP's context length.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path or default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]

    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}

    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    # The four files of SD v1.5's own tokenizer/ folder; transformers 4.x and 5.x both load them.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special_tokens}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(out_dir)
