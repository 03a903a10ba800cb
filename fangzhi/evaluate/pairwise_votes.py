"""Read and validate side-by-side preference votes in the long format (one row per rater × comparison × dimension).

Columns: `rater, prompt, seed, dimension, left, right, choice`; `left`/`right` are the arm names shown on
each side, `choice` is `left`, `right` or `tie`, `dimension` one of the four rating dimensions. An
optional `kind` column (`main`/`retest`/`attention`, as the rating app exports) is kept; extra columns
are ignored. Every bad row is reported by its position in the source (CSV: line number, header = line
1; Parquet: row number), as for the wide ratings file. Seeds are read as exact 64-bit integers (never
through a float, which would change seeds above 2^53).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.evaluate.ratings import BadRows, RowProblems, copy_places, parse_seeds, read_csv_utf8, read_table, row_labels, value_problems

PAIRWISE_COLUMNS: tuple[str, ...] = ("rater", "prompt", "seed", "dimension", "left", "right", "choice")
TEXT_COLUMNS: tuple[str, ...] = ("rater", "prompt", "left", "right")
CHOICES: tuple[str, ...] = ("left", "right", "tie")
KINDS: tuple[str, ...] = ("main", "retest", "attention")
FORMAT_SECTION = "see docs/formats.md, 'Pairwise votes, long format'"


def is_pairwise_file(columns: Iterable[object]) -> bool:
    """True when a ratings file's header is the pairwise long format rather than the wide score format.

    `choice`, or both `left` and `right`, decide it, so that a pairwise file missing another column gets
    the pairwise format's error message, not the wide format's.
    """
    names = {str(c).strip() for c in columns}
    return "choice" in names or {"left", "right"} <= names


def file_columns(path: str | Path) -> list[str]:
    """The column names of a CSV or Parquet file without reading its rows (for `is_pairwise_file`)."""
    path = Path(path)
    if not path.is_file():
        raise FangzhiError(f"ratings file not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        return [str(c) for c in read_csv_utf8(path, nrows=0).columns]
    except pd.errors.EmptyDataError:
        return []
    except FangzhiError:
        raise
    except Exception as exc:  # pyarrow and the CSV parser raise several unrelated types for a corrupt file
        raise FangzhiError(f"{path}: cannot read the header: {exc}") from None


def read_pairwise_file(path: str | Path, drop_bad_rows: bool = False) -> tuple[pd.DataFrame, BadRows]:
    """Read a CSV or Parquet pairwise votes file and validate it (see `validate_pairwise_votes`)."""
    path = Path(path)
    # Every column as text: seeds stay exact.
    raw, positions = read_table(path, "pairwise votes file", PAIRWISE_COLUMNS, dtype=str)
    return validate_pairwise_votes(raw, source=str(path), positions=positions, drop_bad_rows=drop_bad_rows)


def validate_pairwise_votes(
    raw: pd.DataFrame,
    source: str,
    positions: list[str] | None = None,
    drop_bad_rows: bool = False,
) -> tuple[pd.DataFrame, BadRows]:
    """Check every rule on a pairwise votes table; return (clean typed table, bad rows).

    Rules: no empty field; seed a whole number that fits in 64 bits; dimension one of the four; choice
    left/right/tie; two different arms; no vote given twice. Without a `kind` column a vote is given twice
    when the same rater, prompt, seed and dimension show the same arms on the same sides again (the same
    arms with the sides swapped is a consistency repeat, which is allowed); with `kind`, when two rows of the
    same kind judge the same arms in any orientation. The clean table has categorical text columns
    (`dimension` in the order of the four dimensions, `choice` in left/right/tie order) and int64 seeds.
    """
    problems = RowProblems.of_table(raw, source, PAIRWISE_COLUMNS, "the header of a pairwise votes file", FORMAT_SECTION)
    flag, is_bad = problems.flag, problems.is_bad
    n = len(raw)
    # Text columns become integer codes once (stripped values, -1 where missing); every later rule and the
    # duplicate check work on codes, which keeps a million rows under a second.
    coded = {column: _coded(raw[column]) for column in ("rater", "prompt", "dimension", "choice", *(("kind",) if "kind" in raw.columns else ()))}
    arm_codes, arm_names = _coded(pd.concat([raw["left"], raw["right"]], ignore_index=True))
    coded["left"], coded["right"] = (arm_codes[:n], arm_names), (arm_codes[n:], arm_names)
    for column in (*TEXT_COLUMNS, "dimension", "choice"):
        flag(coded[column][0] < 0, f"missing {column}")

    seeds, bad_seed, seed_reasons = parse_seeds(raw["seed"])
    flag(bad_seed, lambda rows: [seed_reasons[i] for i in rows.tolist()])
    for column, allowed in (("dimension", DIMENSION_KEYS), ("choice", CHOICES), ("kind", KINDS)):
        if column in coded:
            codes, names = coded[column]
            known = np.isin(names, allowed)[codes] & (codes >= 0)
            flag(~known, value_problems(column, raw[column], f"must be one of {', '.join(allowed)}"))
    same_arm = coded["left"][0] == coded["right"][0]
    flag(same_arm, lambda rows: [f"left and right are both arm {arm!r}; a comparison needs two different arms" for arm in arm_names[arm_codes[rows]]])
    _flag_duplicates(coded, seeds, ~is_bad, positions, flag)

    bad_rows = problems.report(source, positions, drop_bad_rows)
    good = ~is_bad
    if not good.any():
        raise FangzhiError(f"{source}: no valid pairwise votes")
    used_arms = np.unique(np.concatenate([arm_codes[:n][good], arm_codes[n:][good]]))
    clean = pd.DataFrame(
        {
            "rater": _categorical(*coded["rater"], good),
            "prompt": _categorical(*coded["prompt"], good),
            "seed": seeds[good],
            "dimension": _categorical(*coded["dimension"], good, DIMENSION_KEYS),
            "left": _categorical(*coded["left"], good, sorted(arm_names[used_arms])),
            "right": _categorical(*coded["right"], good, sorted(arm_names[used_arms])),
            "choice": _categorical(*coded["choice"], good, CHOICES),
        }
    )
    if "kind" in coded:
        clean["kind"] = _categorical(*coded["kind"], good, KINDS)
    return clean, bad_rows


def _coded(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the stripped text values (-1 where missing or blank) and the distinct values."""
    codes, names = pd.factorize(values.astype("string").str.strip())
    names = np.asarray(names, dtype=object)
    blank = np.flatnonzero(names == "")
    if blank.size:
        codes = np.where(np.isin(codes, blank), -1, codes)
    return codes, names


def _categorical(codes: np.ndarray, names: np.ndarray, rows: np.ndarray, categories=None) -> pd.Categorical:
    """The kept rows as a categorical with `categories` in that order (default: the kept values, sorted)."""
    kept = codes[rows]
    if categories is None:
        categories = sorted(names[np.unique(kept)])
    position = {name: i for i, name in enumerate(categories)}
    remap = np.array([position.get(name, -1) for name in names], dtype=np.int64)
    return pd.Categorical.from_codes(remap[kept], categories=pd.Index(list(categories), dtype=object))


def _flag_duplicates(coded: dict, seeds: np.ndarray, candidates: np.ndarray, positions: list[str] | None, flag) -> None:
    """Flag every copy of a vote given twice (among rows otherwise valid), naming where its copies are."""
    arm_a, arm_b = coded["left"][0], coded["right"][0]
    by_kind = "kind" in coded
    columns = {"rater": coded["rater"][0], "prompt": coded["prompt"][0], "seed": seeds, "dimension": coded["dimension"][0]}
    if by_kind:  # one row per kind and comparison, whichever side each arm was on
        kind_codes, kind_names = coded["kind"]
        candidates = candidates & ~np.isin(kind_codes, np.flatnonzero(kind_names == "attention"))
        arm_a, arm_b = np.minimum(arm_a, arm_b), np.maximum(arm_a, arm_b)
        columns["kind"] = kind_codes
    columns["arm_a"], columns["arm_b"] = arm_a, arm_b
    rows = np.flatnonzero(candidates)
    group = group_codes(*(values[rows] for values in columns.values()))
    repeated = np.bincount(group)[group] > 1
    if not repeated.any():
        return
    rows, group = rows[repeated], group[repeated]
    where = copy_places(row_labels(positions, rows), group)
    copies = {name: values[rows] for name, values in columns.items()}
    duplicated = np.zeros(len(seeds), dtype=bool)
    duplicated[rows] = True
    arm_names = coded["left"][1]
    arms = "arms {} and {}" if by_kind else "left {}, right {}"
    texts = [
        f"duplicate vote: rater {coded['rater'][1][r]}, prompt {coded['prompt'][1][p]}, seed {seed}, {coded['dimension'][1][d]}, "
        f"{arms.format(arm_names[a], arm_names[b])} (copies at {w}); all copies are bad"
        for r, p, seed, d, a, b, w in zip(copies["rater"], copies["prompt"], copies["seed"], copies["dimension"], copies["arm_a"], copies["arm_b"], where)
    ]
    flag(duplicated, lambda rows: texts)


def group_codes(*columns: np.ndarray) -> np.ndarray:
    """One dense code per distinct combination of the given columns' values (codes in order of first appearance).

    Mixed-radix arithmetic on the columns' own codes, re-compacted before it could overflow int64: hashing one
    int64 column is several times faster than `DataFrame.duplicated` over many.
    """
    key = np.zeros(len(columns[0]), dtype=np.int64)
    radix = 1
    for column in columns:
        codes, distinct = pd.factorize(column)
        width = max(len(distinct), 1)
        if radix * width >= 2**62:
            key, compact = pd.factorize(key)
            radix = len(compact)
        key = key * width + codes
        radix *= width
    return pd.factorize(key)[0]
