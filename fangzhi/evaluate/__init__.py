"""Evaluation: human-ratings analysis (Table 2, paired tests, reliability, power) and CLIP scores.

The ratings analysis is imported here (pandas, scipy; no torch). The CLIP names are imported on first
use, so `import fangzhi.evaluate.stats` (or `.analyze`, `.power`) does not pull in torch and open_clip.
"""

import importlib

# Imported eagerly because the function `analyze` shares its name with its module: bound here, after
# the module's import, the package attribute stays the function.
from fangzhi.evaluate.analyze import AnalyzeConfig, PowerConfig, analyze, run_power
from fangzhi.evaluate.power import simulate_ratings
from fangzhi.evaluate.ratings import read_ratings_file, validate_ratings

_CLIP_NAMES = {
    "ClipCheckConfig": "clip_check", "clip_check": "clip_check",
    "ClipScoreConfig": "clip_score", "paired_arm_test": "clip_score", "run_clip_score": "clip_score",
    "score_manifest": "clip_score", "summarize_by_arm": "clip_score",
}
__all__ = ["AnalyzeConfig", "PowerConfig", "analyze", "run_power", "simulate_ratings", "read_ratings_file", "validate_ratings", *_CLIP_NAMES]


def __getattr__(name: str):
    if name in _CLIP_NAMES:
        return getattr(importlib.import_module(f"fangzhi.evaluate.{_CLIP_NAMES[name]}"), name)
    raise AttributeError(f"module 'fangzhi.evaluate' has no attribute {name!r}")
