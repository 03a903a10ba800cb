"""The paper's Table 2: mean ± SD per rating dimension (rows) and arm (columns), plus a comprehensive score.

What the SD is taken over (its "unit") changes the number a lot, so it is a required choice and is
printed under every table:

- images (default): each image's score is the mean of its raters' scores; mean ± SD over images.
  With integer 1–5 scores this is the only reading that can give the paper's "4.5 ± 0.3".
- ratings: every individual rating is a unit.
- raters: each rater's mean over the images of an arm is a unit.

The comprehensive score of a unit is the mean of its four dimension scores; its mean ± SD is then
taken over units like any dimension.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

import numpy as np
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS, DIMENSIONS
from fangzhi.errors import FangzhiError

SdOver = Literal["images", "ratings", "raters"]
SCORE_ROWS: tuple[str, ...] = (*DIMENSION_KEYS, "comprehensive")
ROW_NAMES: dict[str, str] = {**{d.key: d.name_en for d in DIMENSIONS}, "comprehensive": "Comprehensive score"}
UNIT_KEYS: dict[str, list[str]] = {"images": ["arm", "prompt", "seed"], "ratings": [], "raters": ["arm", "rater"]}
UNIT_NOTES: dict[str, str] = {
    "images": "over images; each image's score is the mean of its raters' scores",
    "ratings": "over individual ratings (one per rater × image)",
    "raters": "over raters; each rater's score is their mean over the arm's images",
}


def arm_order(ratings: pd.DataFrame, baseline_arm: str, order: list[str] | None = None) -> list[str]:
    """Baseline (reference) arm first, then the other arms in `order`, or alphabetically without it (the paper
    puts SD v1.5 before the LoRA). This order gives the table's columns and the adjacent-arm comparisons."""
    arms = sorted(ratings["arm"].unique())
    if baseline_arm not in arms:
        raise FangzhiError(
            f"reference arm '{baseline_arm}' is not in the ratings; arms found: {', '.join(arms)} (name the reference arm with --reference-arm)"
        )
    if order is None:
        return [baseline_arm] + [a for a in arms if a != baseline_arm]
    unknown = [a for a in order if a not in arms]
    missing = [a for a in arms if a not in order and a != baseline_arm]
    repeated = sorted({a for a in order if order.count(a) > 1})
    if unknown or missing or repeated:
        problems = [f"{label}: {', '.join(names)}" for label, names in (("not in the ratings", unknown), ("missing", missing), ("repeated", repeated)) if names]
        raise FangzhiError(f"arm order {','.join(order)}: {'; '.join(problems)} (arms found: {', '.join(arms)})")
    return [baseline_arm] + [a for a in order if a != baseline_arm]


def unit_scores(ratings: pd.DataFrame, sd_over: SdOver) -> pd.DataFrame:
    """One row per unit with its arm, the four dimension scores and the comprehensive score."""
    if sd_over == "ratings":
        units = ratings[["arm", *DIMENSION_KEYS]].astype({d: float for d in DIMENSION_KEYS})
    else:
        units = ratings.groupby(UNIT_KEYS[sd_over], sort=False, observed=True)[list(DIMENSION_KEYS)].mean().reset_index()
    units["comprehensive"] = units[list(DIMENSION_KEYS)].mean(axis=1)
    return units


def summary_table(ratings: pd.DataFrame, sd_over: SdOver, arms: list[str]) -> pd.DataFrame:
    """Long table: one row per (score, arm) with mean, sample SD (ddof 1) and n units."""
    units = unit_scores(ratings, sd_over)
    grouped = units.groupby("arm", sort=False, observed=True)[list(SCORE_ROWS)]
    stats = grouped.agg(["mean", "std", "count"])  # pandas std is ddof=1
    rows = []
    for score in SCORE_ROWS:
        for arm in arms:
            rows.append(
                {
                    "score": score,
                    "arm": arm,
                    "mean": float(stats.loc[arm, (score, "mean")]),
                    "sd": float(stats.loc[arm, (score, "std")]),
                    "n": int(stats.loc[arm, (score, "count")]),
                }
            )
    return pd.DataFrame(rows)


def half_up(value: float, decimals: int) -> str:
    """`value` to `decimals` places, halves rounded away from zero as the paper's tables do (3.05 → 3.1, 2.625 → 2.63).

    Python's format rounds the binary double half-to-even (3.05 is stored as 3.04999…, so it prints
    3.0); rounding the shortest decimal that reads back as the double rounds the number the reader sees.
    """
    if not np.isfinite(value):
        return "–"
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def _cell(mean: float, sd: float, decimals: int) -> str:
    return f"{half_up(mean, decimals)} ± {half_up(sd, decimals)}"


def paper_table(summary: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Dimensions as rows, arms as columns, 'mean ± SD' cells: one decimal, two for the comprehensive row."""
    table = {}
    for arm in arms:
        part = summary[summary["arm"] == arm].set_index("score")
        table[arm] = [_cell(part.at[s, "mean"], part.at[s, "sd"], 2 if s == "comprehensive" else 1) for s in SCORE_ROWS]
    return pd.DataFrame(table, index=[ROW_NAMES[s] for s in SCORE_ROWS]).rename_axis("Dimension")


def table_title(title_note: str | None) -> str:
    title = "Table 2. Human ratings: mean ± SD per dimension"
    return f"{title} ({title_note})" if title_note else title


def table_note(summary: pd.DataFrame, sd_over: SdOver) -> str:
    n_by_arm = ", ".join(f"{arm}: n = {n}" for arm, n in summary.drop_duplicates("arm")[["arm", "n"]].itertuples(index=False))
    return (
        f"Mean ± sample SD (ddof 1) {UNIT_NOTES[sd_over]} ({n_by_arm}). Scores 1–5. "
        "Comprehensive score: per unit the mean of the four dimensions, then mean ± SD over units."
    )


def to_markdown(table: pd.DataFrame, title: str, note: str) -> str:
    header = [table.index.name, *table.columns]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(table.columns)) + "|"]
    lines += ["| " + " | ".join([name, *row]) + " |" for name, row in zip(table.index, table.to_numpy().tolist())]
    return "\n".join(lines + ["", note, ""])


def to_latex(table: pd.DataFrame, title: str, note: str) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_").replace("#", r"\#")

    def cell(text: str) -> str:
        return escape(text).replace(" ± ", r" $\pm$ ").replace("–", "--")

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{cell(title)}}}",
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(["Dimension", *(escape(c) for c in table.columns)]) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join([cell(name), *(cell(v) for v in row)]) + r" \\" for name, row in zip(table.index, table.to_numpy().tolist())]
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip", rf"{{\footnotesize {cell(note)}}}", r"\end{table}", ""]
    return "\n".join(lines)


def to_csv_frame(summary: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Paper layout for the CSV: one row per dimension, `<arm>_mean, <arm>_sd, <arm>_n` columns, two decimals (half up)."""
    wide = pd.DataFrame({"dimension": [ROW_NAMES[s] for s in SCORE_ROWS], "key": list(SCORE_ROWS)})
    for arm in arms:
        part = summary[summary["arm"] == arm].set_index("score").loc[list(SCORE_ROWS)]
        wide[f"{arm}_mean"] = [float(half_up(v, 2)) if np.isfinite(v) else np.nan for v in part["mean"]]
        wide[f"{arm}_sd"] = [float(half_up(v, 2)) if np.isfinite(v) else np.nan for v in part["sd"]]
        wide[f"{arm}_n"] = part["n"].to_numpy()
    return wide


def breakdown(ratings: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean score per `by` (rater or prompt) × arm for every score row, with the number of ratings."""
    scored = ratings.assign(comprehensive=ratings[list(DIMENSION_KEYS)].mean(axis=1))
    grouped = scored.groupby([by, "arm"], sort=True, observed=True)
    means = grouped[list(SCORE_ROWS)].mean()
    means["n_ratings"] = grouped.size()
    return means.reset_index()
