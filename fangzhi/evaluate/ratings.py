"""Read and validate human ratings in the wide format (one row per rater × image).

Columns: `rater, arm, prompt, seed, style, match, detail, beauty`; scores are integers 1–5, extra
columns are ignored. Every bad row is reported with its position in the source (for CSV the line
number in the file, header = line 1), so the person who exported the file can fix it; the run stops
unless the caller asks to drop bad rows.

Validation is vectorized (one boolean mask per rule) so a million rows take well under a second.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError

ID_COLUMNS: tuple[str, ...] = ("rater", "arm", "prompt", "seed")
REQUIRED_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *DIMENSION_KEYS)
IMAGE_KEY: tuple[str, ...] = ("arm", "prompt", "seed")
MAX_LISTED_PROBLEMS = 20


@dataclass
class BadRows:
    """Problems found in a ratings table: (position label, reason) per bad row, in source order."""

    source: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    def message(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} bad rating row(s)"]
        lines += [f"  {where}: {reason}" for where, reason in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        return "\n".join(lines)


def read_ratings_file(path: str | Path, drop_bad_rows: bool = False) -> tuple[pd.DataFrame, BadRows]:
    """Read a CSV or Parquet ratings file and validate it.

    Returns the clean ratings (typed: rater/arm/prompt str, seed and scores int64) and the bad rows
    found. Raises FangzhiError listing the bad rows by line number unless `drop_bad_rows`.
    """
    path = Path(path)
    if not path.is_file():
        raise FangzhiError(f"ratings file not found: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            raw = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
            raise FangzhiError(f"{path}: cannot read as Parquet: {exc}") from None
        # Parquet has no lines; number data rows from 1.
        positions = [f"row {i}" for i in range(1, len(raw) + 1)]
    elif path.suffix.lower() in (".csv", ".txt"):
        try:
            # Keep blank lines (as all-missing rows) so row i is always line i + 2 of the file;
            # only an empty field counts as missing, so a rater called "NA" stays a rater.
            raw = pd.read_csv(
                path,
                dtype={"rater": str, "arm": str, "prompt": str},
                keep_default_na=False,
                na_values=[""],
                skip_blank_lines=False,
            )
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise FangzhiError(f"{path}: not a readable CSV file: {exc}") from None
        except pd.errors.EmptyDataError:
            raise FangzhiError(f"{path}: the file is empty; expected a header line {','.join(REQUIRED_COLUMNS)}") from None
        positions = None  # line numbers are computed on demand (cheap for a million rows)
    else:
        raise FangzhiError(f"{path}: ratings files must end in .csv or .parquet")
    return validate_ratings(raw, source=str(path), positions=positions, drop_bad_rows=drop_bad_rows)


def validate_ratings(
    raw: pd.DataFrame,
    source: str,
    positions: list[str] | None = None,
    drop_bad_rows: bool = False,
) -> tuple[pd.DataFrame, BadRows]:
    """Check every rule on a wide ratings table; return (clean typed table, bad rows).

    `positions` labels each row in messages; by default "line N" with the CSV header as line 1.
    A `kind` column (from the rating app: main/retest/attention) is kept; duplicates are only
    checked among 'main' rows because a retest is by design a second rating of the same image.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise FangzhiError(
            f"{source}: missing column(s) {', '.join(missing)}; the header must contain "
            f"{','.join(REQUIRED_COLUMNS)} (see docs/formats.md, 'Ratings, wide format')"
        )
    n = len(raw)
    is_bad = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}

    def flag(mask: np.ndarray, reason: str | Callable[[np.ndarray], list[str]]) -> None:
        # The first problem found on a row is the one reported; texts are built for new bad rows only.
        new = np.flatnonzero(mask & ~is_bad)
        if new.size:
            texts = [reason] * new.size if isinstance(reason, str) else reason(new)
            reasons.update(zip(new.tolist(), texts))
            is_bad[new] = True

    flag(raw[list(REQUIRED_COLUMNS)].isna().all(axis=1).to_numpy(), "empty line")
    stripped = {}
    for column in ("rater", "arm", "prompt"):
        stripped[column] = raw[column].astype(str).str.strip()
        flag(raw[column].isna().to_numpy() | (stripped[column] == "").to_numpy(), f"missing {column}")

    seed = pd.to_numeric(raw["seed"], errors="coerce").to_numpy(dtype=float)
    bad_seed = ~np.isfinite(seed) | (seed != np.round(seed))
    flag(bad_seed, _describer("seed", raw["seed"], "must be an integer"))

    scores = {}
    for dim in DIMENSION_KEYS:
        numeric = pd.to_numeric(raw[dim], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(numeric) | (numeric != np.round(numeric)) | (numeric < SCORE_MIN) | (numeric > SCORE_MAX)
        flag(bad, _describer(dim, raw[dim], f"must be an integer {SCORE_MIN}–{SCORE_MAX}"))
        scores[dim] = numeric

    clean = pd.DataFrame(
        {
            **stripped,
            "seed": np.where(bad_seed, -1, np.nan_to_num(seed)).astype(np.int64),
            **{dim: np.nan_to_num(scores[dim]).astype(np.int64) for dim in DIMENSION_KEYS},
        }
    )
    for extra in ("kind", "image_id", "expected"):
        if extra in raw.columns:
            clean[extra] = raw[extra].to_numpy()

    # Duplicates: the same rater scoring the same image twice (among rows otherwise valid).
    is_main = clean["kind"].to_numpy() == "main" if "kind" in clean.columns else np.ones(n, dtype=bool)
    candidates = is_main & ~is_bad
    key = ["rater", *IMAGE_KEY]
    duplicated = np.zeros(n, dtype=bool)
    duplicated[candidates] = clean.loc[candidates, key].duplicated(keep=False).to_numpy()
    if duplicated.any():
        copies = clean.loc[duplicated, key].assign(label=_labels(positions, np.flatnonzero(duplicated)))
        first = copies.groupby(key, sort=False)["label"].transform("first")
        texts = [
            f"duplicate rating of rater {r} × image ({a}, {p}, seed {s}) (first at {f}); all copies are bad"
            for r, a, p, s, f in zip(*(copies[c] for c in key), first)
        ]
        flag(duplicated, lambda rows: texts)

    bad_rows = BadRows(source)
    bad_index = np.flatnonzero(is_bad)
    bad_rows.problems = list(zip(_labels(positions, bad_index), (reasons[i] for i in bad_index.tolist())))
    if bad_rows and not drop_bad_rows:
        raise FangzhiError(bad_rows.message() + "\nfix these rows, or pass --drop-bad-rows to analyse without them")
    if bad_rows:
        warnings.warn(bad_rows.message() + "\nthese rows were dropped (--drop-bad-rows)", stacklevel=2)
    clean = clean.loc[~is_bad].reset_index(drop=True)
    # Categorical ids make every later groupby work on integer codes (several times faster at 1M rows).
    clean = clean.astype({"rater": "category", "arm": "category", "prompt": "category"})
    if clean.empty:
        raise FangzhiError(f"{source}: no valid rating rows")
    return clean, bad_rows


def _labels(positions: list[str] | None, index: np.ndarray) -> list[str]:
    if positions is None:
        return [f"line {i + 2}" for i in index]
    return [positions[i] for i in index]


def _describer(column: str, values: pd.Series, rule: str) -> Callable[[np.ndarray], list[str]]:
    """Reason texts for the given bad rows of one column, quoting the value as written."""

    def describe(rows: np.ndarray) -> list[str]:
        return [f"{column} is {'empty' if pd.isna(v) else repr(_as_written(v))}; {rule}" for v in values.to_numpy()[rows]]

    return describe


def _as_written(value: object) -> str:
    # A column holding one empty field is read as float; show 7.0 as the 7 that was written.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def main_ratings(ratings: pd.DataFrame) -> pd.DataFrame:
    """Only the ratings that count for the table and tests (drops retest and attention-check rows)."""
    if "kind" not in ratings.columns:
        return ratings
    return ratings.loc[ratings["kind"] == "main"].reset_index(drop=True)
