"""Reading a study, live or not: one row per assignment, the ratings made from them, and the snapshot.

Everything analysis needs is one table with a row per rater × position (`STUDY_ROWS_SQL`): the
rater and whether they were revoked, the item (image, arm, prompt, seed, kind, asked-for score),
the four scores (empty until saved), the comment, time and number of saves. The rating app writes
exactly this table as its snapshot (Parquet, the study settings and the snapshot's time and save
count in the file's key-value metadata), so a reader gets the same rows from the file or from the
snapshot.

A pairwise study's table has a row per rater × comparison instead (`COMPARISON_ROWS_SQL`: the arms
shown left and right, the blank side of an attention item as `(blank)`, and the choice per dimension);
`StudyRead.votes()` turns it into the long pairwise votes format.

`read_study` opens the file read-only when it is free, and otherwise reads the snapshot and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.files import output_file, replacing
from fangzhi.studydb.qc import pairwise_qc_results
from fangzhi.studydb.connection import DUCKDB_CONFIG, require_study_file, snapshot_path
from fangzhi.studydb.schema import BLANK_SIDE, stored_version, study_mode

_SCORE_COLUMNS = ",\n".join(f"max(score) FILTER (WHERE dimension = '{k}') AS {k}" for k in DIMENSION_KEYS)

STUDY_ROWS_SQL = f"""
SELECT a.rater_id, r.name AS rater, v.rater_id IS NOT NULL AS revoked, v.revoked_at,
       a.position, a.image_id, i.arm, i.prompt_id AS prompt, i.seed, a.kind, a.expected,
       {", ".join(f"s.{k}" for k in DIMENSION_KEYS)},
       n.comment, n.seconds_spent, n.saves, n.first_saved_at, n.updated_at
FROM assignments a
JOIN raters r USING (rater_id)
JOIN images i USING (image_id)
LEFT JOIN revocations v USING (rater_id)
LEFT JOIN (SELECT rater_id, position, {_SCORE_COLUMNS} FROM scores GROUP BY rater_id, position) s USING (rater_id, position)
LEFT JOIN item_notes n USING (rater_id, position)
ORDER BY a.rater_id, a.position
"""

_CHOICE_COLUMNS = ",\n".join(f"max(choice) FILTER (WHERE dimension = '{k}') AS {k}" for k in DIMENSION_KEYS)

COMPARISON_ROWS_SQL = f"""
SELECT c.rater_id, r.name AS rater, v.rater_id IS NOT NULL AS revoked, v.revoked_at,
       c.position, c.prompt_id AS prompt, c.seed, c.kind,
       coalesce(li.arm, '{BLANK_SIDE}') AS "left", coalesce(ri.arm, '{BLANK_SIDE}') AS "right",
       {", ".join(f"ch.{k}" for k in DIMENSION_KEYS)},
       n.comment, n.seconds_spent, n.saves, n.first_saved_at, n.updated_at
FROM comparisons c
JOIN raters r USING (rater_id)
LEFT JOIN images li ON li.image_id = c.left_image
LEFT JOIN images ri ON ri.image_id = c.right_image
LEFT JOIN revocations v USING (rater_id)
LEFT JOIN (SELECT rater_id, position, {_CHOICE_COLUMNS} FROM choices GROUP BY rater_id, position) ch USING (rater_id, position)
LEFT JOIN comparison_notes n USING (rater_id, position)
ORDER BY c.rater_id, c.position
"""
VOTE_COLUMNS = ["rater", "prompt", "seed", "dimension", "left", "right", "choice", "kind", "revoked"]

STUDY_SETTINGS_SQL = "SELECT manifest, default_lang, seed, qc_retest, qc_attention, created_at, unblinded_at FROM study"
SAVES_SQL = {
    "absolute": "SELECT coalesce(sum(saves), 0)::BIGINT FROM item_notes",
    "pairwise": "SELECT coalesce(sum(saves), 0)::BIGINT FROM comparison_notes",
}
ROWS_SQL = {"absolute": STUDY_ROWS_SQL, "pairwise": COMPARISON_ROWS_SQL}
SNAPSHOT_METADATA_KEY = "fangzhi_study_snapshot"
RATING_COLUMNS = ["rater", "arm", "prompt", "seed", "image_id", "kind", *DIMENSION_KEYS, "expected", "revoked"]


def study_rows(con: duckdb.DuckDBPyConnection, mode: str = "absolute") -> pd.DataFrame:
    return con.execute(ROWS_SQL[mode]).df()


def settings_row(con: duckdb.DuckDBPyConnection, version: int) -> dict[str, Any]:
    """The `study` row and the study's mode as JSON-ready values (timestamps as ISO text)."""
    row = con.execute(STUDY_SETTINGS_SQL).fetchone()
    settings = dict(zip([column for column, *_ in con.description], row))
    settings["mode"] = study_mode(con, version)
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in settings.items()}


def votes_from_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """A pairwise study's saved choices in the long votes format (docs/formats.md, "Pairwise votes, long format"),
    one row per rater × comparison × dimension, with `kind` and `revoked`."""
    long = rows.melt(
        id_vars=["rater", "prompt", "seed", "left", "right", "kind", "revoked", "position"], value_vars=list(DIMENSION_KEYS),
        var_name="dimension", value_name="choice",
    ).dropna(subset=["choice"])
    long["dimension"] = pd.Categorical(long["dimension"], categories=list(DIMENSION_KEYS))
    long = long.sort_values(["rater", "position", "dimension"], kind="stable")
    return long[VOTE_COLUMNS].astype({"rater": str, "prompt": str, "seed": "int64", "dimension": str, "revoked": bool}).reset_index(drop=True)


def ratings_from_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per rater × item with all four dimensions scored (see docs/formats.md, "Ratings, wide format").

    Columns: rater, arm, prompt, seed, image_id, kind, style, match, detail, beauty, expected, revoked.
    """
    complete = rows[list(DIMENSION_KEYS)].notna().all(axis=1)
    ratings = rows.loc[complete, RATING_COLUMNS].reset_index(drop=True)
    return ratings.astype(
        {"rater": str, "arm": str, "prompt": str, "image_id": str, "kind": str, "seed": "int64", "expected": "Int64", "revoked": bool,
         **dict.fromkeys(DIMENSION_KEYS, "int64")}
    )


def read_ratings(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The ratings on an open connection (the rating app's own, for its admin page)."""
    return ratings_from_rows(study_rows(con))


def read_votes_and_qc(con: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A pairwise study's votes and its per-rater attention results, on an open connection (for the admin page)."""
    rows = study_rows(con, "pairwise")
    return votes_from_rows(rows), pairwise_qc_results(rows)


# ---- the snapshot ------------------------------------------------------------------------------


def write_snapshot(con: duckdb.DuckDBPyConnection, db_path: str | Path) -> int:
    """Write the study's rows, settings and save count to the snapshot file atomically; returns the save count.

    One read transaction, so rows, settings and count are from the same moment; readers see either
    the previous snapshot or this one (temp file + rename).
    """
    with replacing(snapshot_path(db_path)) as temporary:
        con.execute("BEGIN TRANSACTION")
        try:
            version = stored_version(con, db_path)
            mode = study_mode(con, version)
            saves = con.execute(SAVES_SQL[mode]).fetchone()[0]
            metadata = {
                "schema_version": version,
                "taken_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "saves": saves,
                "study": settings_row(con, version),
            }
            literal = json.dumps(metadata, ensure_ascii=False).replace("'", "''")
            con.execute(f"COPY ({ROWS_SQL[mode]}) TO '{_sql_path(temporary)}' (FORMAT parquet, KV_METADATA {{{SNAPSHOT_METADATA_KEY}: '{literal}'}})")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    return saves


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


@dataclass(frozen=True)
class StudyRead:
    """A study as read: its assignment rows and settings, and where they came from."""

    rows: pd.DataFrame
    settings: dict[str, Any]
    source: str  # e.g. "study.duckdb" or "study.duckdb.snapshot.parquet (snapshot of 09:12:03 UTC, 412 saves)"
    from_snapshot: bool
    saves: int

    @property
    def mode(self) -> str:
        return self.settings.get("mode", "absolute")

    def ratings(self) -> pd.DataFrame:
        if self.mode != "absolute":
            raise FangzhiError(f"{self.source}: a {self.mode} study has votes, not 1–5 ratings")
        return ratings_from_rows(self.rows)

    def votes(self) -> pd.DataFrame:
        if self.mode != "pairwise":
            raise FangzhiError(f"{self.source}: an {self.mode} study has 1–5 ratings, not pairwise votes")
        return votes_from_rows(self.rows)


def read_study(db_path: str | Path) -> StudyRead:
    """The study from its file (read-only) when no other process holds it, else from the app's snapshot."""
    db_path = require_study_file(db_path)
    try:
        con = duckdb.connect(str(db_path), read_only=True, config=DUCKDB_CONFIG)
    except duckdb.Error as exc:
        # Held by the rating app (or another program): its snapshot is the consistent copy to read.
        return _read_snapshot(db_path, reason=str(exc))
    with con:
        version = stored_version(con, db_path)
        mode = study_mode(con, version)
        return StudyRead(study_rows(con, mode), settings_row(con, version), str(db_path), False, con.execute(SAVES_SQL[mode]).fetchone()[0])


def _read_snapshot(db_path: Path, reason: str) -> StudyRead:
    snapshot = snapshot_path(db_path)
    if not snapshot.is_file():
        raise FangzhiError(
            f"{db_path}: cannot open it ({reason}), and there is no snapshot {snapshot.name} beside it. "
            "If another program has the study open, close it and try again."
        )
    try:
        metadata = json.loads(pq.read_metadata(snapshot).metadata[SNAPSHOT_METADATA_KEY.encode()])
        rows = pd.read_parquet(snapshot)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise FangzhiError(f"{snapshot}: not a readable study snapshot: {exc}") from None
    taken_at = datetime.fromisoformat(metadata["taken_at"])
    age = (datetime.now(timezone.utc) - taken_at).total_seconds()
    source = (
        f"{snapshot} (the study file is in use, e.g. by the rating app; snapshot taken {taken_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"{age:.0f} s ago, holding {metadata['saves']} saves)"
    )
    return StudyRead(rows, metadata["study"], source, True, metadata["saves"])


def export_ratings(db_path: str | Path, out: str | Path) -> tuple[int, StudyRead]:
    """Write the study's ratings (a pairwise study: its votes, long format) to .csv or .parquet; returns the number of rows and what was read."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise FangzhiError(f"{out}: the export file must end in .csv or .parquet")
    output_file(out)
    study = read_study(db_path)
    ratings = study.votes() if study.mode == "pairwise" else study.ratings()
    with replacing(out) as temporary:
        if out.suffix == ".csv":
            ratings.to_csv(temporary, index=False)
        else:
            ratings.to_parquet(temporary, index=False)
    return len(ratings), study
