"""Model loading, in one place: Stable Diffusion bases (`sd`), the CLIP tokenizer, and CLIP scorers (`clip`)."""

from fangzhi.models.sd import (
    DEFAULT_BASE,
    allow_tf32,
    base_available,
    build_sd15_random_base,
    build_tiny_base,
    load_pipeline,
    weights_sha256,
)

__all__ = ["DEFAULT_BASE", "allow_tf32", "base_available", "build_sd15_random_base", "build_tiny_base", "load_pipeline", "weights_sha256"]
