"""Paired comparison of two arms: Wilcoxon signed-rank (primary), paired t (sensitivity), effect sizes,
bootstrap CI of the mean difference, Holm correction across the four dimensions and the comprehensive score.

Two pairings are reported:
- images: the same (prompt, seed) in both arms, each image's score averaged over its raters
  (the independent unit is the prompt × seed pair);
- ratings: the same (rater, prompt, seed), i.e. one rater's two scores of a pair. These pairs are not
  independent (one rater contributes many), so this reading is a sensitivity check, not the headline.

Differences are always `other − baseline`, so a positive difference favours the LoRA arm.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import pingouin
from scipy import stats as sps

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.evaluate.table import SCORE_ROWS

PairBy = Literal["images", "ratings"]
PAIR_KEYS: dict[str, list[str]] = {"images": ["prompt", "seed"], "ratings": ["rater", "prompt", "seed"]}
WILCOXON_NOTE = (
    "Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided, zero_method='wilcox': pairs with zero "
    "difference are dropped before ranking, tied |differences| get average ranks; method='auto': exact null "
    "distribution for ≤50 pairs without ties, exhaustive permutation for ≤13 pairs with ties or zeros, "
    "otherwise the tie-corrected normal approximation without continuity correction). "
    "Effect size: matched-pairs rank-biserial correlation (Kerby 2014) over the non-zero differences. "
    "Sensitivity: paired t-test with Cohen's dz = mean(d) / SD(d). "
    "95% CI of the mean difference: percentile bootstrap over pairs. "
    "Holm correction across the four dimensions and the comprehensive score, within each arm comparison and pairing."
)


def paired_scores(ratings: pd.DataFrame, baseline_arm: str, other_arm: str, pair_by: PairBy) -> tuple[pd.DataFrame, int]:
    """Pairs of scores with columns `<score>_base`, `<score>_other` per score row; and how many units had no partner."""
    keys = PAIR_KEYS[pair_by]
    scores = ratings[[*keys, "arm", *DIMENSION_KEYS]]
    if pair_by == "images":
        scores = scores.groupby(["arm", *keys], sort=False, observed=True)[list(DIMENSION_KEYS)].mean().reset_index()
    else:
        scores = scores.astype({d: float for d in DIMENSION_KEYS})
    scores = scores.assign(comprehensive=scores[list(DIMENSION_KEYS)].mean(axis=1))
    base = scores.loc[scores["arm"] == baseline_arm].drop(columns="arm").set_index(keys).add_suffix("_base")
    other = scores.loc[scores["arm"] == other_arm].drop(columns="arm").set_index(keys).add_suffix("_other")
    pairs = base.join(other, how="inner")
    unpaired = len(base) + len(other) - 2 * len(pairs)
    return pairs, unpaired


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial r = (R+ − R−) / (R+ + R−) over non-zero differences (Kerby 2014)."""
    nonzero = diff[diff != 0]
    if nonzero.size == 0:
        return float("nan")
    ranks = sps.rankdata(np.abs(nonzero))
    return float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())


def cohens_dz(diff: np.ndarray) -> float:
    sd = diff.std(ddof=1) if diff.size > 1 else float("nan")
    return float(diff.mean() / sd) if sd > 0 else float("nan")


def bootstrap_mean_ci(diff: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling pairs with replacement.

    A resample's mean depends only on how often each distinct value is drawn, so we draw multinomial
    counts over the distinct differences. This is the ordinary bootstrap exactly, but with rating data
    (a few dozen distinct values) it costs O(n_boot × distinct) instead of O(n_boot × n).
    """
    if diff.size < 2:
        return float("nan"), float("nan")
    values, counts = np.unique(diff, return_counts=True)
    draws = rng.multinomial(diff.size, counts / diff.size, size=n_boot)
    means = draws @ values / diff.size
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def compare_pair(base: np.ndarray, other: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, float]:
    """All paired statistics of one score for one pairing."""
    diff = other - base
    nonzero = int(np.count_nonzero(diff))
    if nonzero > 0:
        wilcoxon = sps.wilcoxon(other, base, zero_method="wilcox", alternative="two-sided")
        w_stat, w_p = float(wilcoxon.statistic), float(wilcoxon.pvalue)
    else:  # every pair tied: there is nothing to rank and no evidence of a difference
        w_stat, w_p = float("nan"), float("nan")
    if diff.size > 1 and diff.std() > 0:
        ttest = sps.ttest_rel(other, base)
        t_stat, t_p = float(ttest.statistic), float(ttest.pvalue)
    else:
        t_stat, t_p = float("nan"), float("nan")
    ci_low, ci_high = bootstrap_mean_ci(diff, n_boot, rng)
    return {
        "n_pairs": int(diff.size),
        "n_zero_diff": int(diff.size - nonzero),
        "mean_base": float(base.mean()),
        "mean_other": float(other.mean()),
        "mean_diff": float(diff.mean()),
        "ci95_low": ci_low,
        "ci95_high": ci_high,
        "wilcoxon_W": w_stat,
        "wilcoxon_p": w_p,
        "rank_biserial": rank_biserial(diff),
        "t": t_stat,
        "t_df": int(diff.size - 1),
        "t_p": t_p,
        "cohens_dz": cohens_dz(diff),
    }


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values; undefined (NaN) p-values stay NaN and do not count as tests."""
    return pingouin.multicomp(np.asarray(pvalues, dtype=float), method="holm")[1]


def compare_arms(
    ratings: pd.DataFrame,
    baseline_arm: str,
    arms: list[str],
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (other arm, pairing, score) with the paired statistics and Holm-adjusted p-values."""
    rng = np.random.default_rng(seed)
    rows = []
    for other_arm in arms:
        if other_arm == baseline_arm:
            continue
        for pair_by in ("images", "ratings"):
            pairs, unpaired = paired_scores(ratings, baseline_arm, other_arm, pair_by)
            if len(pairs) == 0:
                continue
            block = []
            for score in SCORE_ROWS:
                result = compare_pair(pairs[f"{score}_base"].to_numpy(), pairs[f"{score}_other"].to_numpy(), n_boot, rng)
                block.append({"arm": other_arm, "baseline": baseline_arm, "pair_by": pair_by, "score": score, "n_unpaired": unpaired, **result})
            wilcoxon_holm = holm(np.array([r["wilcoxon_p"] for r in block]))
            t_holm = holm(np.array([r["t_p"] for r in block]))
            for row, pw, pt in zip(block, wilcoxon_holm, t_holm):
                row["wilcoxon_p_holm"] = float(pw)
                row["t_p_holm"] = float(pt)
            rows.extend(block)
    return pd.DataFrame(rows)
