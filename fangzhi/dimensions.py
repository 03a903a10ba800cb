"""The paper's four rating dimensions, shared by the rating app (questions) and the analysis (table rows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dimension:
    key: str
    name_en: str
    name_zh: str


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("style", "Style consistency", "风格一致性"),
    Dimension("match", "Image–text match", "图文匹配度"),
    Dimension("detail", "Detail richness", "细节丰富度"),
    Dimension("beauty", "Artistic beauty", "艺术美感"),
)
DIMENSION_KEYS: tuple[str, ...] = tuple(d.key for d in DIMENSIONS)
SCORE_MIN, SCORE_MAX = 1, 5
