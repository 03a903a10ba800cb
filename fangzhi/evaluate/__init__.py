"""Evaluation: human-ratings analysis (Table 2, paired tests, reliability, power) and CLIP scores."""

from fangzhi.evaluate.analyze import AnalyzeConfig, PowerConfig, analyze, run_power
from fangzhi.evaluate.power import simulate_ratings
from fangzhi.evaluate.ratings import read_ratings_file, validate_ratings
from fangzhi.evaluate.clip_check import ClipCheckConfig, clip_check
from fangzhi.evaluate.clip_score import ClipScoreConfig, paired_arm_test, run_clip_score, score_manifest, summarize_by_arm
