"""Read and validate human ratings in the wide format (one row per rater × image).

Columns: `rater, arm, prompt, seed, style, match, detail, beauty`; scores are integers 1–5, extra
columns are ignored. Every bad row is reported with its position in the source (for CSV the line
number in the file, header = line 1), so the person who exported the file can fix it; the run stops
unless the caller asks to drop bad rows.

Validation is vectorized (one boolean mask per rule) so a million rows take well under a second.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from fangzhi.config import decode_utf8
from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError

ID_COLUMNS: tuple[str, ...] = ("rater", "arm", "prompt", "seed")
REQUIRED_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *DIMENSION_KEYS)
IMAGE_KEY: tuple[str, ...] = ("arm", "prompt", "seed")
MAX_LISTED_PROBLEMS = 20
KINDS: tuple[str, ...] = ("main", "retest", "attention")
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # signed int64 and unsigned uint64 together
INT64_MAX = 2**63 - 1
FLOAT_EXACT_MAX = 2**53  # above this a float64 no longer holds every integer
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


@dataclass
class BadRows:
    """Problems found in a ratings table: (position label, reason) per bad row, in source order."""

    source: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    def message(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} bad row(s)"]
        lines += [f"  {where}: {reason}" for where, reason in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        return "\n".join(lines)


class RowProblems:
    """The bad rows of a table under validation, each with the first problem found on it."""

    def __init__(self, n_rows: int) -> None:
        self.is_bad = np.zeros(n_rows, dtype=bool)
        self.reasons: dict[int, str] = {}

    @classmethod
    def of_table(cls, raw: pd.DataFrame, source: str, required: Sequence[str], header: str, format_section: str) -> RowProblems:
        """Start checking a table: refuse one that lacks a required column, and flag its empty lines."""
        missing = [c for c in required if c not in raw.columns]
        if missing:
            separator = next((s for s in (";", "\t") if len(raw.columns) == 1 and s in str(raw.columns[0])), None)
            hint = f"; its columns look separated by {separator!r}: save it with commas (CSV UTF-8)" if separator else ""
            raise FangzhiError(
                f"{source}: missing column(s) {', '.join(missing)}; {header} must contain {','.join(required)} ({format_section}){hint}"
            )
        problems = cls(len(raw))
        problems.flag(raw[list(required)].isna().all(axis=1).to_numpy(), "empty line")
        return problems

    def flag(self, mask: np.ndarray, reason: str | Callable[[np.ndarray], list[str]]) -> None:
        # The first problem found on a row is the one reported; texts are built for new bad rows only.
        new = np.flatnonzero(mask & ~self.is_bad)
        if new.size:
            texts = [reason] * new.size if isinstance(reason, str) else reason(new)
            self.reasons.update(zip(new.tolist(), texts))
            self.is_bad[new] = True

    def report(self, source: str, positions: list[str] | None, drop_bad_rows: bool) -> BadRows:
        """The flagged rows as BadRows: an error naming them, or with `drop_bad_rows` a warning."""
        bad_rows = BadRows(source)
        bad_index = np.flatnonzero(self.is_bad)
        bad_rows.problems = list(zip(row_labels(positions, bad_index), (self.reasons[i] for i in bad_index.tolist())))
        if bad_rows and not drop_bad_rows:
            raise FangzhiError(bad_rows.message() + "\nfix these rows, or pass --drop-bad-rows to analyse without them")
        if bad_rows:
            warnings.warn(bad_rows.message() + "\nthese rows were dropped (--drop-bad-rows)", stacklevel=3)
        return bad_rows


def read_table(path: Path, what: str, header: Sequence[str], dtype: Mapping[str, type] | type) -> tuple[pd.DataFrame, list[str] | None]:
    """A CSV or Parquet file as read, and a position label per row (None for CSV: line numbers, computed on demand).

    CSV: only an empty field counts as missing, so a rater called "NA" stays a rater; blank lines are
    kept as all-missing rows, so row i is always line i + 2; a spreadsheet's byte-order mark is dropped.
    """
    if not path.is_file():
        raise FangzhiError(f"{what} not found: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            raw = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
            raise FangzhiError(f"{path}: cannot read as Parquet: {exc}") from None
        # Parquet has no lines; number data rows from 1.
        return raw, [f"row {i}" for i in range(1, len(raw) + 1)]
    if path.suffix.lower() in (".csv", ".txt"):
        try:
            raw = read_csv_utf8(path, dtype=dtype, keep_default_na=False, na_values=[""], skip_blank_lines=False)
        except pd.errors.ParserError as exc:
            raise FangzhiError(f"{path}: not a readable CSV file: {exc}") from None
        except pd.errors.EmptyDataError:
            raise FangzhiError(f"{path}: the file is empty; expected a header line {','.join(header)}") from None
        return raw, None
    raise FangzhiError(f"{path}: {what}s must end in .csv or .parquet")


def read_csv_utf8(path: Path, **options) -> pd.DataFrame:
    """`pd.read_csv` of a user's UTF-8 CSV (a BOM allowed); a file in another encoding is a FangzhiError naming its line."""
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **options)
    except UnicodeDecodeError:
        decode_utf8(path, path.read_bytes())  # pandas counts the byte within its read buffer; this names the line
        raise


def read_ratings_file(path: str | Path, drop_bad_rows: bool = False, arm_alias: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, BadRows]:
    """Read a CSV or Parquet ratings file and validate it (`arm_alias` renames arms, e.g. {"LoRA": "lora"}).

    Returns the clean ratings (typed: rater/arm/prompt str, seed and scores int64) and the bad rows
    found. Raises FangzhiError listing the bad rows by line number unless `drop_bad_rows`.
    """
    path = Path(path)
    raw, positions = read_table(path, "ratings file", REQUIRED_COLUMNS, dtype={"rater": str, "arm": str, "prompt": str})
    if positions is None and "seed" in raw.columns and not pd.api.types.is_integer_dtype(raw["seed"]):
        # pandas reads a seed column with a blank or a huge value as float64, which rounds
        # seeds above 2^53; read it again as text so every seed is parsed exactly (or refused).
        raw["seed"] = read_csv_utf8(path, usecols=["seed"], dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False)["seed"]
    return validate_ratings(raw, source=str(path), positions=positions, drop_bad_rows=drop_bad_rows, arm_alias=arm_alias)


def validate_ratings(
    raw: pd.DataFrame,
    source: str,
    positions: list[str] | None = None,
    drop_bad_rows: bool = False,
    arm_alias: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, BadRows]:
    """Check every rule on a wide ratings table; return (clean typed table, bad rows).

    `positions` labels each row in messages; by default "line N" with the CSV header as line 1.
    A `kind` column (from the rating app: main/retest/attention) is kept; any other value, empty
    included, is a bad row. Duplicates are only checked among 'main' rows because a retest is by
    design a second rating of the same image. Seeds are exact 64-bit integers (signed, or unsigned as
    ComfyUI writes them). Arm names that differ only in case are refused unless `arm_alias` maps
    one spelling onto the other: they would otherwise silently become separate arms.
    """
    problems = RowProblems.of_table(raw, source, REQUIRED_COLUMNS, "the header", "see docs/formats.md, 'Ratings, wide format'")
    flag, is_bad = problems.flag, problems.is_bad
    n = len(raw)
    stripped = {}
    for column in ("rater", "arm", "prompt"):
        stripped[column] = _stripped_text(raw[column])
        flag(raw[column].isna().to_numpy() | (stripped[column] == "").to_numpy(), f"missing {column}")

    if arm_alias:
        stripped["arm"] = stripped["arm"].replace(dict(arm_alias))
    flag(*_case_variant_arms(stripped["arm"]))
    if "kind" in raw.columns:
        kind = _stripped_text(raw["kind"])
        flag(~kind.isin(KINDS).to_numpy() | raw["kind"].isna().to_numpy(), value_problems("kind", raw["kind"], f"must be one of {', '.join(KINDS)}"))

    seed, bad_seed, seed_reasons = parse_seeds(raw["seed"])
    flag(bad_seed, lambda rows: [seed_reasons[i] for i in rows.tolist()])

    scores = {}
    for dim in DIMENSION_KEYS:
        numeric = pd.to_numeric(raw[dim], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(numeric) | (numeric != np.round(numeric)) | (numeric < SCORE_MIN) | (numeric > SCORE_MAX)
        flag(bad, value_problems(dim, raw[dim], f"must be an integer {SCORE_MIN}–{SCORE_MAX}"))
        scores[dim] = numeric

    clean = pd.DataFrame(
        {
            **stripped,
            "seed": seed,
            **{dim: np.nan_to_num(scores[dim]).astype(np.int64) for dim in DIMENSION_KEYS},
        }
    )
    if "kind" in raw.columns:
        clean["kind"] = kind.to_numpy()
    for extra in ("image_id", "expected"):
        if extra in raw.columns:
            clean[extra] = raw[extra].to_numpy()

    # Duplicates: the same rater scoring the same image twice (among rows otherwise valid).
    is_main = clean["kind"].to_numpy() == "main" if "kind" in clean.columns else np.ones(n, dtype=bool)
    candidates = is_main & ~is_bad
    key = ["rater", *IMAGE_KEY]
    duplicated = np.zeros(n, dtype=bool)
    duplicated[candidates] = clean.loc[candidates, key].duplicated(keep=False).to_numpy()
    if duplicated.any():
        copies = clean.loc[duplicated, key]
        where = copy_places(row_labels(positions, np.flatnonzero(duplicated)), copies.groupby(key, sort=False).ngroup().to_numpy())
        texts = [
            f"duplicate rating of rater {r} × image ({a}, {p}, seed {s}) (copies at {w}); all copies are bad"
            for r, a, p, s, w in zip(*(copies[c] for c in key), where)
        ]
        flag(duplicated, lambda rows: texts)

    bad_rows = problems.report(source, positions, drop_bad_rows)
    clean = clean.loc[~is_bad].reset_index(drop=True)
    # Categorical ids make every later groupby work on integer codes (several times faster at 1M rows).
    clean = clean.astype({"rater": "category", "arm": "category", "prompt": "category"})
    if clean.empty:
        raise FangzhiError(f"{source}: no valid rating rows")
    return clean, bad_rows


def _stripped_text(values: pd.Series) -> pd.Series:
    """Values as text without surrounding spaces; each distinct value is stripped once (a million rows hold a few hundred)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    texts = np.array([str(v).strip() for v in uniques], dtype=object)
    return pd.Series(texts[codes] if len(texts) else np.array([], dtype=object), index=values.index)


def parse_seeds(values: pd.Series) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Seeds as exact 64-bit integers: (int64 or uint64 array, bad-row mask, reason per bad row).

    Integer columns are taken as they are; anything else is parsed value by value from its text,
    because a detour through float64 merges seeds above 2^53. A file may use the signed or the
    unsigned range, not both (no numpy integer type holds both).
    """
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_extension_array_dtype(values):
        return values.to_numpy(), np.zeros(len(values), dtype=bool), {}
    parsed: list[int | None] = []
    reasons: dict[int, str] = {}
    for i, value in enumerate(values.to_numpy(dtype=object)):
        number, reason = _one_seed(value)
        parsed.append(number)
        if reason == "empty":
            reasons[i] = "seed is empty; must be an integer"
        elif reason:
            reasons[i] = f"seed is {_as_written(value)!r}; {reason}"
    good = [v for v in parsed if v is not None]
    if good and min(good) < 0 and max(good) > INT64_MAX:
        for i, v in enumerate(parsed):
            if v is not None and v > INT64_MAX:
                reasons[i] = f"seed is {v}; the file mixes negative seeds with seeds above 2^63−1 (signed and unsigned 64-bit ranges); use one range"
    bad = np.zeros(len(values), dtype=bool)
    bad[list(reasons)] = True
    unsigned = bool(good) and max(good) > INT64_MAX and min(good) >= 0
    filled = [0 if v is None or i in reasons else v for i, v in enumerate(parsed)]
    return np.array(filled, dtype=np.uint64 if unsigned else np.int64), bad, reasons


def _one_seed(value: object) -> tuple[int | None, str]:
    """(seed, "") or (None, why not) for one value as read from the file."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None, "empty"
    if isinstance(value, (bool, np.bool_)):
        return None, "must be an integer"
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            return None, "must be an integer"
        if abs(value) > FLOAT_EXACT_MAX:
            return None, "is stored as a floating-point number, which cannot hold every seed above 2^53 exactly; store seeds as integers"
        number = int(value)
    else:
        text = str(value).strip()
        if not text:
            return None, "empty"
        if not INTEGER_TEXT.fullmatch(text):
            return None, "must be an integer"
        number = int(text)
    if not SEED_MIN <= number <= SEED_MAX:
        return None, "does not fit in 64 bits (signed from −2^63, unsigned up to 2^64−1)"
    return number, ""


def _case_variant_arms(arms: pd.Series) -> tuple[np.ndarray, Callable[[np.ndarray], list[str]]]:
    """Rows whose arm differs from a more frequent arm name only in case, and their reason texts."""
    counts = arms.value_counts()
    folded = counts.groupby(counts.index.str.casefold(), sort=False)
    canonical: dict[str, str] = {}
    for _, group in folded:
        if len(group) > 1:
            keep = group.index[0]  # value_counts sorts by frequency: the most common spelling
            canonical.update({spelling: keep for spelling in group.index[1:]})
    mask = arms.isin(list(canonical)).to_numpy()

    def describe(rows: np.ndarray) -> list[str]:
        return [
            f"arm {arm!r} differs from arm {canonical[arm]!r} only in case; fix the file or pass --arm-alias {arm}={canonical[arm]}"
            for arm in arms.to_numpy()[rows]
        ]

    return mask, describe


def row_labels(positions: list[str] | None, index: np.ndarray) -> list[str]:
    if positions is None:
        return [f"line {i + 2}" for i in index]
    return [positions[i] for i in index]


def copy_places(labels: list[str], group: np.ndarray, shown: int = 3) -> list[str]:
    """For each copy of a repeated row (`group`: which row it repeats), where its copies are: 'line 2, line 10'."""
    places: dict[int, list[str]] = {}
    for label, copy_of in zip(labels, group):
        places.setdefault(copy_of, []).append(label)
    text = {g: ", ".join(found[:shown]) + (f" and {len(found) - shown} more" if len(found) > shown else "") for g, found in places.items()}
    return [text[copy_of] for copy_of in group]


def value_problems(column: str, values: pd.Series, rule: str) -> Callable[[np.ndarray], list[str]]:
    """Reason texts for the given bad rows of one column, quoting the value as written."""

    def describe(rows: np.ndarray) -> list[str]:
        return [f"{column} is {'empty' if pd.isna(v) else repr(_as_written(v))}; {rule}" for v in values.to_numpy(dtype=object)[rows]]

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
