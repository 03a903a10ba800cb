"""The study's quality-control rules, used alike by the admin page and the analysis report.

Attention check: the page asks for one given score on all four questions; the item is failed
unless all four scores equal that score. Failing does not by itself remove a rater from the
analysis (two checks are a thin basis for discarding someone's work, and the report shows every
failure); `fangzhi analyze --exclude-failed-attention N` removes raters with N or more failures.

Test–retest: a repeated image is compared with the rater's first ('main') rating of it.

Pairwise studies: an attention item shows an image beside a blank one; it is failed unless all four
choices name the image's side. (Swapped-side repeats are scored by the preference analysis.)
"""

from __future__ import annotations

import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.studydb.schema import BLANK_SIDE


def attention_failed(checks: pd.DataFrame) -> pd.Series:
    """Per attention-check row: True unless all four scores equal the asked-for (`expected`) score."""
    expected = pd.to_numeric(checks["expected"], errors="coerce")
    return ~checks[list(DIMENSION_KEYS)].eq(expected, axis=0).all(axis=1)


def attention_failures(ratings: pd.DataFrame) -> pd.DataFrame | None:
    """Per rater with attention checks: items answered and failed (None when there are no attention rows)."""
    if "kind" not in ratings.columns or not (ratings["kind"] == "attention").any():
        return None
    checks = ratings.loc[ratings["kind"] == "attention"]
    summary = checks.assign(failed=attention_failed(checks)).groupby("rater", observed=True, sort=False)["failed"].agg(items="count", failures="sum")
    return summary.reset_index().astype({"items": int, "failures": int})


def raters_failing_attention(ratings: pd.DataFrame, min_failures: int) -> list[str]:
    """Raters with at least `min_failures` failed attention checks."""
    failures = attention_failures(ratings)
    if failures is None:
        return []
    return [str(rater) for rater in failures.loc[failures["failures"] >= min_failures, "rater"]]


def qc_results(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per rater: attention checks passed and answered, and test–retest agreement.

    Retest agreement is the share of the four scores that are identical to the rater's first
    rating of the image, and the mean absolute difference.
    """
    columns = ["rater", "attention_passed", "attention_rated", "retest_pairs", "retest_exact_agreement", "retest_mean_abs_diff"]
    attention = attention_failures(ratings)
    attention = attention.set_index("rater") if attention is not None else pd.DataFrame(columns=["items", "failures"])
    rows = []
    for rater, own in ratings.groupby("rater", sort=False, observed=True):
        retest = own[own["kind"] == "retest"].merge(own[own["kind"] == "main"], on="image_id", suffixes=("_retest", "_main"))
        differences = pd.concat([(retest[f"{k}_retest"] - retest[f"{k}_main"]).abs() for k in DIMENSION_KEYS]) if len(retest) else pd.Series(dtype=float)
        rated = int(attention.loc[rater, "items"]) if rater in attention.index else 0
        failed = int(attention.loc[rater, "failures"]) if rater in attention.index else 0
        rows.append(
            {
                "rater": rater,
                "attention_passed": rated - failed,
                "attention_rated": rated,
                "retest_pairs": len(retest),
                "retest_exact_agreement": float((differences == 0).mean()) if len(differences) else float("nan"),
                "retest_mean_abs_diff": float(differences.mean()) if len(differences) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def pairwise_attention_failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Per rater of a pairwise study (its comparison rows, `read_study(...).rows`): attention items answered and failed."""
    checks = rows.loc[(rows["kind"] == "attention") & rows[list(DIMENSION_KEYS)].notna().all(axis=1)]
    expected = checks["left"].eq(BLANK_SIDE).map({True: "right", False: "left"})
    failed = ~checks[list(DIMENSION_KEYS)].eq(expected, axis=0).all(axis=1)
    summary = checks.assign(failed=failed).groupby("rater", sort=False)["failed"].agg(items="count", failures="sum")
    return summary.reset_index().astype({"rater": str, "items": int, "failures": int})


def pairwise_qc_results(rows: pd.DataFrame) -> pd.DataFrame:
    """Per rater of a pairwise study, every rater of `rows` (its comparison rows): attention items passed and answered."""
    failures = pairwise_attention_failures(rows).set_index("rater")
    raters = pd.Series(rows["rater"].astype(str).unique(), name="rater")
    answered = raters.map(failures["items"]).fillna(0).astype(int)
    passed = answered - raters.map(failures["failures"]).fillna(0).astype(int)
    return pd.DataFrame({"rater": raters, "attention_passed": passed, "attention_answered": answered})
