"""Inter-rater reliability (Krippendorff's ordinal alpha, ICC(2,k)) within each arm and pooled, and test–retest agreement.

Attention checks follow the study's one QC rule in `fangzhi.studydb.qc`.

Units of reliability are images (arm, prompt, seed); raters are the coders. Alpha is computed from the
units × values count matrix through `krippendorff.alpha(value_counts=...)`, which needs no raters ×
units table and is fast on a million ratings. ICC is computed from the two-way ANOVA mean squares
(Shrout & Fleiss 1979) with numpy, because `pingouin.intraclass_corr` fits a full ANOVA on the long
table and takes seconds per dimension at that size; the tests check it equals pingouin's ICC2k.
"""

from __future__ import annotations

import krippendorff
import numpy as np
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN

ALPHA_FLAG_BELOW = 0.4
POOLED_SCOPE = "pooled (all arms)"
SCORE_DOMAIN = np.arange(SCORE_MIN, SCORE_MAX + 1)


def krippendorff_alpha(units: np.ndarray, values: np.ndarray, level: str = "ordinal", value_domain: np.ndarray = SCORE_DOMAIN) -> float:
    """Krippendorff's alpha from long data (one unit code and one value per rating).

    Returns NaN when alpha is undefined: fewer than two pairable values, or no variation at all
    (every pairable value equal, so the expected disagreement is zero).
    """
    if units.dtype.kind not in "iu" or units.size == 0 or units.min() < 0:
        units = np.unique(units, return_inverse=True)[1]  # any labels to dense codes; integer codes are used as they are
    n_units = int(units.max()) + 1 if units.size else 0
    value_index = np.searchsorted(value_domain, values)
    counts = np.bincount(units * len(value_domain) + value_index, minlength=n_units * len(value_domain))
    counts = counts.reshape(n_units, len(value_domain))
    pairable = counts[counts.sum(axis=1) >= 2]  # also drops codes with no rating in this subset
    if pairable.sum() < 2 or np.count_nonzero(pairable.sum(axis=0)) < 2:
        return float("nan")
    return float(krippendorff.alpha(value_counts=pairable, value_domain=value_domain, level_of_measurement=level))


def two_way_mean_squares(matrix: np.ndarray) -> dict[str, float]:
    """Mean squares of a complete targets × raters matrix (two-way random effects, one rating per cell)."""
    n, k = matrix.shape
    grand = matrix.mean()
    ss_rows = k * ((matrix.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((matrix.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((matrix - grand) ** 2).sum() - ss_rows - ss_cols
    return {
        "n": n,
        "k": k,
        "ms_rows": ss_rows / (n - 1),
        "ms_cols": ss_cols / (k - 1),
        "ms_error": ss_error / ((n - 1) * (k - 1)),
    }


def icc2(matrix: np.ndarray) -> tuple[float, float]:
    """ICC(2,1) and ICC(2,k) (Shrout & Fleiss 1979); NaN when undefined (fewer than 2×2, or no variance)."""
    if matrix.shape[0] < 2 or matrix.shape[1] < 2:
        return float("nan"), float("nan")
    ms = two_way_mean_squares(matrix)
    n, k, msr, msc, mse = ms["n"], ms["k"], ms["ms_rows"], ms["ms_cols"], ms["ms_error"]
    denominator_1 = msr + (k - 1) * mse + k * (msc - mse) / n
    denominator_k = msr + (msc - mse) / n
    if np.isclose(denominator_1, 0) or np.isclose(denominator_k, 0):
        return float("nan"), float("nan")
    return float((msr - mse) / denominator_1), float((msr - mse) / denominator_k)


def rating_matrices(ratings: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Per dimension an images × raters matrix (NaN where a rater did not score an image), plus image codes and rater names."""
    image_code = ratings.groupby(["arm", "prompt", "seed"], sort=False, observed=True).ngroup().to_numpy()
    rater_code, rater_names = pd.factorize(ratings["rater"], sort=True)
    n_images = image_code.max() + 1
    matrices = {}
    for dim in DIMENSION_KEYS:
        matrix = np.full((n_images, len(rater_names)), np.nan)
        matrix[image_code, rater_code] = ratings[dim].to_numpy()
        matrices[dim] = matrix
    return matrices, image_code, list(rater_names)


def reliability_table(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per dimension and arm, then pooled over arms: ordinal alpha over all images, ICC(2,1)/ICC(2,k) over images every rater scored.

    The within-arm rows carry the agreement flag. Pooling both arms adds the arms' difference to the
    between-image variance, which inflates agreement whenever the arms differ; the pooled row is
    shown, labelled, but never flagged or trusted on its own.
    """
    matrices, image_code, rater_names = rating_matrices(ratings)
    image_arm = pd.Series(ratings["arm"].to_numpy()).groupby(image_code).first()
    arms = [str(a) for a in pd.unique(ratings["arm"])]
    scopes = [(arm, True, (ratings["arm"] == arm).to_numpy(), (image_arm == arm).to_numpy()) for arm in sorted(arms)]
    scopes.append((POOLED_SCOPE, False, np.ones(len(ratings), dtype=bool), np.ones(len(image_arm), dtype=bool)))
    rows = []
    for dim in DIMENSION_KEYS:
        values = ratings[dim].to_numpy()
        for scope, within_arm, rating_mask, image_mask in scopes:
            matrix = matrices[dim][image_mask]
            complete = matrix[~np.isnan(matrix).any(axis=1)]
            alpha = krippendorff_alpha(image_code[rating_mask], values[rating_mask])
            icc_1, icc_k = icc2(complete)
            flagged = bool(within_arm and np.isfinite(alpha) and alpha < ALPHA_FLAG_BELOW)
            notes = []
            if np.isnan(alpha):
                notes.append("alpha undefined (no variation in the ratings, or no image with two ratings)")
            elif flagged:
                notes.append(f"alpha below {ALPHA_FLAG_BELOW} within this arm: raters disagree; treat this dimension's means with caution")
            if not within_arm:
                notes.append("pooled over arms: a difference between the arms inflates agreement; the within-arm rows carry the flag")
            if np.isnan(icc_k):
                notes.append("ICC undefined (needs ≥2 raters who all scored ≥2 images, and some variance)")
            rows.append(
                {
                    "dimension": dim,
                    "scope": scope,
                    "krippendorff_alpha_ordinal": alpha,
                    "alpha_flag": flagged,
                    "icc2_1": icc_1,
                    "icc2_k": icc_k,
                    "n_images": int(matrix.shape[0]),
                    "n_raters": len(rater_names),
                    "n_images_all_raters": int(complete.shape[0]),
                    "note": "; ".join(notes),
                }
            )
    return pd.DataFrame(rows)


def retest_agreement(ratings: pd.DataFrame) -> pd.DataFrame | None:
    """Agreement between each 'retest' rating and the same rater's 'main' rating of that image (None without retests)."""
    if "kind" not in ratings.columns or not (ratings["kind"] == "retest").any():
        return None
    key = ["rater", "arm", "prompt", "seed"]
    main = ratings.loc[ratings["kind"] == "main", key + list(DIMENSION_KEYS)]
    retest = ratings.loc[ratings["kind"] == "retest", key + list(DIMENSION_KEYS)]
    pairs = main.merge(retest, on=key, suffixes=("_first", "_retest"))
    rows = []
    for dim in DIMENSION_KEYS:
        first, second = pairs[f"{dim}_first"].to_numpy(), pairs[f"{dim}_retest"].to_numpy()
        gap = np.abs(first - second)
        varies = len(pairs) > 2 and first.std() > 0 and second.std() > 0
        rows.append(
            {
                "dimension": dim,
                "n_pairs": len(pairs),
                "exact_agreement": float((gap == 0).mean()) if len(pairs) else float("nan"),
                "within_one": float((gap <= 1).mean()) if len(pairs) else float("nan"),
                "mean_abs_diff": float(gap.mean()) if len(pairs) else float("nan"),
                "spearman_rho": float(pd.Series(first).corr(pd.Series(second), method="spearman")) if varies else float("nan"),
            }
        )
    return pd.DataFrame(rows)
