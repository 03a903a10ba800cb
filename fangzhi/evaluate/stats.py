"""Paired comparison of two arms at three units, with the prompt as the primary one.

The study's question is whether the LoRA arm is rated higher *for a prompt* than the base model.
Seeds of one prompt share that prompt's effect (and its own LoRA − base difference), and each rater
has their own taste for the LoRA style, so images and ratings are not independent units. The primary
test therefore pairs prompts:

- prompts (primary): each prompt's score per arm is the mean over its images (seeds), each image's score
  the mean of its raters' scores; one difference per prompt.
- images (secondary): the same (prompt, seed) in both arms, each image averaged over its raters.
  Treats the seeds of one prompt as independent: too optimistic when prompts differ in their LoRA effect.
- ratings (secondary): one rater's two scores of a (prompt, seed) pair. Also ignores that a rater's
  ratings belong together; a descriptive reading only.

Differences are always `other − baseline`, so a positive difference favours the LoRA arm. With more than
two arms every arm is compared with the reference arm, and each arm with the next one in the arm order
(`arm_pairs`); a Friedman test across all arms (`friedman_tests`) uses the same units.
The crossed mixed model (`fangzhi.evaluate.mixed`) models raters and prompts together.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special
from scipy import stats as sps

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.evaluate.table import SCORE_ROWS

Unit = Literal["prompts", "images", "ratings"]
PRIMARY_UNIT: Unit = "prompts"
UNITS: tuple[Unit, ...] = ("prompts", "images", "ratings")
PAIR_KEYS: dict[str, list[str]] = {"prompts": ["prompt"], "images": ["prompt", "seed"], "ratings": ["rater", "prompt", "seed"]}
FRIEDMAN_NOTE = (
    "Friedman test across all arms, per score: within each unit the arms' scores are ranked (ties averaged), chi-square "
    "with the tie correction on k − 1 degrees of freedom; only units scored in every arm count. Effect size: Kendall's W. "
    "Holm correction across the four dimensions and the comprehensive score within each unit. Unit prompts (primary): "
    "seeds and raters averaged within prompt and arm; unit images (secondary): raters averaged per (prompt, seed), "
    "which treats the seeds of a prompt as independent."
)
UNIT_NOTES: dict[str, str] = {
    "prompts": "prompts (primary): one pair per prompt, seeds and raters averaged within prompt and arm",
    "images": "images (secondary): one pair per (prompt, seed), raters averaged; the seeds of a prompt are not independent",
    "ratings": "ratings (secondary): one pair per rater × (prompt, seed); neither raters nor prompts are independent units",
}
# Up to this many non-zero differences the signed-rank p-value is exact (the full permutation
# distribution of the statistic given the observed ranks, ties included); beyond it the
# tie-corrected normal approximation is indistinguishable and far cheaper.
EXACT_MAX_PAIRS = 50
# Means of integer scores computed in different orders can differ in the last bit; differences equal
# to this many decimals are the same difference (a tie, or zero).
TIE_DECIMALS = 9
# A multinomial count costs about twice an index draw plus its gather (measured with numpy 2.4).
BOOTSTRAP_INDEX_COST = 2
WILCOXON_NOTE = (
    "Wilcoxon signed-rank test, two-sided: pairs with zero difference are dropped, tied |differences| get "
    f"average ranks; p is exact (the permutation distribution of the statistic given those ranks) for ≤ {EXACT_MAX_PAIRS} "
    "non-zero pairs, otherwise the tie-corrected normal approximation without continuity correction. "
    "Effect size: matched-pairs rank-biserial correlation (Kerby 2014). Also the paired t-test with Cohen's dz = mean(d) / SD(d). "
    "95% CI of the mean difference: percentile bootstrap resampling the unit (prompts in the primary rows). "
    "Holm correction across the four dimensions and the comprehensive score of every arm pair compared, within each unit. "
    "Rows with unit images or ratings are secondary: they treat seeds (and raters) as independent and overstate the evidence "
    "when prompts or raters differ in their LoRA effect."
)


def image_means(ratings: pd.DataFrame) -> pd.DataFrame:
    """Each image's dimension scores averaged over its raters, indexed by (arm, prompt, seed)."""
    return ratings.groupby(["arm", "prompt", "seed"], sort=False, observed=True)[list(DIMENSION_KEYS)].mean()


def unit_scores(ratings: pd.DataFrame, unit: Unit, images: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (arm, unit) with the four dimension scores and the comprehensive score.

    `images` (from `image_means`) saves recomputing the image means when several units are needed.
    """
    keys = PAIR_KEYS[unit]
    columns = list(DIMENSION_KEYS)
    if unit == "ratings":
        scores = ratings[["arm", *keys, *columns]].astype({d: float for d in columns})
    else:
        scores = image_means(ratings) if images is None else images
        if unit == "prompts":
            scores = scores.groupby(level=["arm", "prompt"], sort=False, observed=True).mean()
        scores = scores.reset_index()
    return scores.assign(comprehensive=scores[columns].mean(axis=1))


def paired_scores(
    ratings: pd.DataFrame, baseline_arm: str, other_arm: str, unit: Unit, images: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, int]:
    """Pairs of scores with columns `<score>_base`, `<score>_other` per score row; and how many units had no partner."""
    keys = PAIR_KEYS[unit]
    scores = unit_scores(ratings, unit, images)
    base = scores.loc[scores["arm"] == baseline_arm].drop(columns="arm").set_index(keys).add_suffix("_base")
    other = scores.loc[scores["arm"] == other_arm].drop(columns="arm").set_index(keys).add_suffix("_other")
    pairs = base.join(other, how="inner")
    unpaired = len(base) + len(other) - 2 * len(pairs)
    return pairs, unpaired


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial r = (R+ − R−) / (R+ + R−) over non-zero differences (Kerby 2014)."""
    ranks = _signed_ranks(diff)
    if ranks is None:
        return float("nan")
    n, r_plus, _, _ = ranks
    total = n * (n + 1) / 2
    return float((2 * r_plus - total) / total)


def _signed_ranks(diff: np.ndarray) -> tuple[int, float, np.ndarray, np.ndarray] | None:
    """(n non-zero, R+, tie-group sizes, their average ranks) of |diff| without zeros; None when all are zero.

    Ranks are computed over the distinct differences with their counts: a million ratings on a 1–5
    scale have a few dozen, so one sort of the data is the whole cost.
    """
    diff = np.round(np.asarray(diff, dtype=float), TIE_DECIMALS)
    values, counts = np.unique(diff[diff != 0], return_counts=True)
    n = int(counts.sum())
    if n == 0:
        return None
    magnitude_of_value = np.unique(np.abs(values), return_inverse=True)[1]
    tied = np.bincount(magnitude_of_value, weights=counts)  # how many differences share each |value|
    average_rank = np.cumsum(tied) - (tied - 1) / 2
    r_plus = float((counts * average_rank[magnitude_of_value])[values > 0].sum())
    return n, r_plus, tied, average_rank


@lru_cache(maxsize=4096)
def _signed_rank_null(doubled_ranks: tuple[int, ...]) -> np.ndarray:
    """P(2·R+ = k) for k = 0..sum under random signs, given the (doubled, so integer) ranks."""
    distribution = np.zeros(sum(doubled_ranks) + 1)
    distribution[0] = 1.0
    for rank in doubled_ranks:
        distribution[rank:] = 0.5 * distribution[rank:] + 0.5 * distribution[:-rank].copy()
        distribution[:rank] *= 0.5
    return distribution


def signed_rank_test(diff: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test on paired differences: (W = min(R+, R−), p).

    Zeros are dropped, ties get average ranks. With ≤ EXACT_MAX_PAIRS non-zero differences p comes
    from the exact permutation distribution (equal to scipy's exact test without ties and to its
    exhaustive permutation test with ties); beyond, from the tie-corrected normal approximation.
    NaN, NaN when every difference is zero. The power simulation calls this same function.
    """
    ranks = _signed_ranks(diff)
    if ranks is None:
        return float("nan"), float("nan")
    n, r_plus, tied, average_rank = ranks
    total = n * (n + 1) / 2
    statistic = min(r_plus, total - r_plus)
    if n <= EXACT_MAX_PAIRS:
        doubled = np.repeat(np.rint(2 * average_rank).astype(np.int64), tied.astype(np.int64))
        null = _signed_rank_null(tuple(doubled.tolist()))
        observed = int(round(2 * r_plus))
        tail = min(null[: observed + 1].sum(), null[observed:].sum())
        return statistic, float(min(1.0, 2 * tail))
    variance = n * (n + 1) * (2 * n + 1) / 24 - (tied**3 - tied).sum() / 48
    z = (r_plus - total / 2) / np.sqrt(variance)
    return statistic, float(min(1.0, 2 * special.ndtr(-abs(z))))


def cohens_dz(diff: np.ndarray) -> float:
    sd = diff.std(ddof=1) if diff.size > 1 else float("nan")
    return float(diff.mean() / sd) if sd > 0 else float("nan")


def bootstrap_mean_ci(diff: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling pairs (the unit) with replacement.

    Two exact ways to draw the same resamples, whichever is cheaper: indices (n_boot × n draws; few
    units, e.g. prompts), or multinomial counts over the distinct differences (n_boot × distinct draws;
    many units with few distinct values, e.g. a million ratings on a 1–5 scale).
    """
    if diff.size < 2:
        return float("nan"), float("nan")
    values, counts = np.unique(diff, return_counts=True)
    if diff.size <= BOOTSTRAP_INDEX_COST * values.size:
        chunk = max(1, 4_000_000 // diff.size)  # resamples per batch, so memory stays near 32 MB
        means = np.concatenate(
            [diff[rng.integers(0, diff.size, (min(chunk, n_boot - start), diff.size))].mean(axis=1) for start in range(0, n_boot, chunk)]
        )
    else:
        draws = rng.multinomial(diff.size, counts / diff.size, size=n_boot)
        means = draws @ values / diff.size
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def compare_pair(base: np.ndarray, other: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, float]:
    """All paired statistics of one score for one unit."""
    diff = np.round(other - base, TIE_DECIMALS)
    w_stat, w_p = signed_rank_test(diff)
    if diff.size > 1 and diff.std() > 0:
        ttest = sps.ttest_rel(other, base)
        t_stat, t_p = float(ttest.statistic), float(ttest.pvalue)
    else:
        t_stat, t_p = float("nan"), float("nan")
    ci_low, ci_high = bootstrap_mean_ci(diff, n_boot, rng)
    return {
        "n_pairs": int(diff.size),
        "n_zero_diff": int(diff.size - np.count_nonzero(diff)),
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
    pvalues = np.asarray(pvalues, dtype=float)
    adjusted = np.full(pvalues.shape, np.nan)
    defined = np.flatnonzero(np.isfinite(pvalues))
    order = defined[np.argsort(pvalues[defined], kind="stable")]
    steps = pvalues[order] * (len(order) - np.arange(len(order)))
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def arm_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(baseline, other) pairs compared: every arm against the first (the reference arm), then each arm
    after the first against the next one in `arms` (adjacent arms, e.g. LoRA scales in increasing order)."""
    against_reference = [(arms[0], other) for other in arms[1:]]
    adjacent = [(arms[i], arms[i + 1]) for i in range(1, len(arms) - 1)]
    return against_reference + adjacent


def compare_arms(
    ratings: pd.DataFrame,
    baseline_arm: str,
    arms: list[str],
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (arm pair, unit, score) with the paired statistics and Holm-adjusted p-values.

    The pairs are `arm_pairs` of `arms` with `baseline_arm` first; `baseline` names the pair's first arm.
    `primary` is true on the prompt-level rows: exactly one row per (arm pair, score). The Holm family
    is every score of every arm pair within a unit (with two arms: the five scores of the one pair).
    """
    rng = np.random.default_rng(seed)
    images = image_means(ratings)
    ordered = [baseline_arm, *(arm for arm in arms if arm != baseline_arm)]
    rows = []
    for first_arm, other_arm in arm_pairs(ordered):
        for unit in UNITS:
            pairs, unpaired = paired_scores(ratings, first_arm, other_arm, unit, images)
            if len(pairs) == 0:
                continue
            for score in SCORE_ROWS:
                result = compare_pair(pairs[f"{score}_base"].to_numpy(), pairs[f"{score}_other"].to_numpy(), n_boot, rng)
                rows.append(
                    {"arm": other_arm, "baseline": first_arm, "unit": unit, "primary": unit == PRIMARY_UNIT, "score": score, "n_unpaired": unpaired, **result}
                )
    comparisons = pd.DataFrame(rows)
    if comparisons.empty:
        return comparisons
    for column in ("wilcoxon_p", "t_p"):
        comparisons[f"{column}_holm"] = comparisons.groupby("unit", sort=False)[column].transform(lambda p: holm(p.to_numpy()))
    return comparisons


def friedman_test(blocks: np.ndarray) -> dict[str, float]:
    """Friedman test on a (units × arms) array of scores: chi-square with the tie correction, as scipy's
    `friedmanchisquare`, its p-value on k − 1 degrees of freedom, and Kendall's W = chi² / (n (k − 1))."""
    n, k = blocks.shape
    ranks = sps.rankdata(np.round(blocks, TIE_DECIMALS), axis=1)
    rank_sums = ranks.sum(axis=0)
    tie_sizes = np.concatenate([np.unique(row, return_counts=True)[1] for row in ranks]) if n else np.array([1])
    correction = 1 - (tie_sizes**3 - tie_sizes).sum() / (n * k * (k * k - 1)) if n else 0.0
    if n < 2 or correction <= 0:
        return {"chi2": float("nan"), "df": k - 1, "p": float("nan"), "kendall_w": float("nan")}
    chi2 = (12 / (n * k * (k + 1)) * (rank_sums**2).sum() - 3 * n * (k + 1)) / correction
    return {"chi2": float(chi2), "df": k - 1, "p": float(sps.chi2.sf(chi2, k - 1)), "kendall_w": float(chi2 / (n * (k - 1)))}


def friedman_tests(ratings: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Per unit (prompts: primary; images: secondary) and score, a Friedman test across all `arms` over
    the units scored in every arm (raters, and at the prompt level seeds, averaged); Holm across the
    five scores within a unit. Units missing an arm are left out and counted in `n_incomplete`."""
    images = image_means(ratings)
    rows = []
    for unit in ("prompts", "images"):
        scores = unit_scores(ratings, unit, images)
        keys = PAIR_KEYS[unit]
        block = []
        for score in SCORE_ROWS:
            wide = scores.pivot_table(index=keys, columns="arm", values=score, observed=True).reindex(columns=arms)
            complete = wide.dropna()
            block.append(
                {"unit": unit, "primary": unit == PRIMARY_UNIT, "score": score, "arms": ", ".join(arms), "n_units": len(complete),
                 "n_incomplete": len(wide) - len(complete), **friedman_test(complete.to_numpy())}
            )
        for row, adjusted in zip(block, holm(np.array([r["p"] for r in block]))):
            row["p_holm"] = float(adjusted)
        rows.extend(block)
    return pd.DataFrame(rows)
