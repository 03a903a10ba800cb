"""Shared fixtures: the offline bases that the project builds itself (never downloaded)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny SD-architecture diffusers folder (random weights, real CLIP BPE tokenizer, SD v1.5 schedule)."""
    from fangzhi.models import build_tiny_base

    return str(build_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0))
