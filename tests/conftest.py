"""Shared fixtures: the offline bases that the project builds itself (never downloaded)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny SD-architecture diffusers folder (random weights, real CLIP BPE tokenizer, SD v1.5 schedule)."""
    from fangzhi.models import build_tiny_base

    return str(build_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0))


@pytest.fixture(scope="session")
def sd15_random(tmp_path_factory) -> Iterator[str]:
    """SD v1.5's full-size architecture as a diffusers folder with random fp16 weights (2 GB, ~25 s to write)."""
    from fangzhi.models import build_sd15_random_base

    folder = build_sd15_random_base(tmp_path_factory.mktemp("sd15-random"), seed=0)
    yield str(folder)
    shutil.rmtree(folder)  # pytest keeps a failed session's folders; these 2 GB never help to debug one
