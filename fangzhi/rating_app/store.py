"""What the rating app reads and writes in the study file, and the connection it holds while serving.

While the app serves, its process is the file's one owner: `StudyServer` opens one connection for
the app's lifetime, hands each page run a cursor of it, and keeps a snapshot of the study beside
the file (`fangzhi.studydb`) fresh within about a second of each change, for analysis and exports
to read. The schema, the readers and the QC rules live in `fangzhi.studydb`.

Every save is one transaction: the four scores, the audit rows of what changed, and the item's
comment and time. A crash loses at most the item on screen.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from fangzhi import studydb
from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError
from fangzhi.studydb import qc_results, read_ratings, read_votes_and_qc  # noqa: F401  (the admin page's answers and QC tables)

SNAPSHOT_INTERVAL_SECONDS = 1.0
T = TypeVar("T")
log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# Store functions take an open connection (the app's cursor) or a study path, for which they open a
# short-lived connection (the demo, tests, tools run while no app serves).
Database = str | Path | duckdb.DuckDBPyConnection


@contextmanager
def _using(db: Database) -> Iterator[duckdb.DuckDBPyConnection]:
    if isinstance(db, duckdb.DuckDBPyConnection):
        yield db
    else:
        with studydb.connect(db) as con:
            yield con


# DuckDB checks write conflicts optimistically: two transactions that both insert the first scores of
# one item collide (a constraint error, or a failed COMMIT). Writes that could touch the same rows
# (one rater's saves: a double click, two tabs; the admin's writes) take turns; different raters'
# saves never share a row and run side by side.
_turns: dict[object, threading.Lock] = {}
_turns_guard = threading.Lock()


def _turn(key: object) -> threading.Lock:
    with _turns_guard:
        return _turns.setdefault(key, threading.Lock())


def _transaction(db: Database, work: Callable[[duckdb.DuckDBPyConnection], T], turn: object = "admin") -> T:
    """Run `work` in one transaction, after any other write of this process with the same `turn` has finished."""
    with _using(db) as con, _turn(turn):
        con.execute("BEGIN TRANSACTION")
        try:
            result = work(con)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")  # if COMMIT itself fails, DuckDB has already rolled the transaction back
        return result


def _query_df(db: Database, sql: str, params: Iterable[Any] = ()) -> pd.DataFrame:
    with _using(db) as con:
        return con.execute(sql, list(params)).df()


# ---- the app's connection -----------------------------------------------------------------------

# Changes when anything a reader sees changes: saves (also of a comment only), revisions, raters, revocations, unblinding.
_CHANGE_SQL = """
SELECT (SELECT coalesce(sum(saves), 0) FROM item_notes), (SELECT count(*) FROM score_audit),
       (SELECT coalesce(sum(saves), 0) FROM comparison_notes), (SELECT count(*) FROM choice_audit),
       (SELECT count(*) FROM raters), (SELECT count(*) FROM revocations), (SELECT unblinded_at FROM study)
"""


class StudyServer:
    """The rating app's one connection to the study, from start to shutdown, and the snapshot beside it.

    `cursor()` gives a page run its own cursor (DuckDB cursors are connections to the same open
    database, usable from the run's thread). When a run ends, a background thread rewrites the
    snapshot if the study changed, at most once per SNAPSHOT_INTERVAL_SECONDS.
    """

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self._con = studydb.open_study(self.db_path)
        self._snapshot_con = self._con.cursor()
        self._snapshot_of: tuple | None = None
        self._runs_ended = threading.Event()
        self._closing = threading.Event()
        try:
            self._write_snapshot_if_changed()  # readers have a snapshot from the first moment the file is held
        except BaseException:
            self._con.close()  # let go of the file: a server that cannot start must not block others
            raise
        self._thread = threading.Thread(target=self._keep_snapshot, daemon=True, name="study-snapshot")
        self._thread.start()
        atexit.register(self.close)

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cursor = self._con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
            self._runs_ended.set()

    def _write_snapshot_if_changed(self) -> None:
        state = self._snapshot_con.execute(_CHANGE_SQL).fetchone()
        if state != self._snapshot_of:
            studydb.write_snapshot(self._snapshot_con, self.db_path)
            self._snapshot_of = state

    def _keep_snapshot(self) -> None:
        while True:
            self._runs_ended.wait()
            if self._closing.is_set():
                return
            self._runs_ended.clear()
            try:
                self._write_snapshot_if_changed()
            except Exception:  # a full disk must not stop the app serving; readers see the snapshot's age
                log.exception("could not write the study snapshot %s", studydb.snapshot_path(self.db_path))
            self._closing.wait(SNAPSHOT_INTERVAL_SECONDS)

    def close(self) -> None:
        """Write a last snapshot and close the file (at shutdown; also when Streamlit drops the cached server)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._runs_ended.set()
        self._thread.join()
        try:
            self._write_snapshot_if_changed()
        finally:
            self._snapshot_con.close()
            self._con.close()
            atexit.unregister(self.close)


# ---- what the app reads -------------------------------------------------------------------


@dataclass(frozen=True)
class Rater:
    rater_id: int
    name: str


@dataclass(frozen=True)
class StudySettings:
    default_lang: str
    unblinded: bool
    reference_paths: tuple[str, ...]
    mode: str = "absolute"  # or 'pairwise' (side-by-side preferences, `pairwise_page`)


@dataclass(frozen=True)
class ItemView:
    """One item as the app needs it. `image_path` stays on the server: only re-encoded pixels leave."""

    position: int
    image_path: str
    narrative_zh: str
    prompt_en: str
    kind: str
    expected: int | None
    scores: dict[str, int]
    comment: str


def study_settings(db: Database) -> StudySettings:
    with _using(db) as con:
        lang, unblinded_at = con.execute("SELECT default_lang, unblinded_at FROM study").fetchone()
        references = con.execute("SELECT path FROM reference_images ORDER BY reference_id").fetchall()
        (mode,) = con.execute("SELECT mode FROM study_mode").fetchone()
    return StudySettings(lang, unblinded_at is not None, tuple(p for (p,) in references), mode)


def rater_for_token(db: Database, token: str) -> Rater | None:
    """The rater whose invitation token this is, or None for an unknown or revoked token."""
    with _using(db) as con:
        row = con.execute(
            "SELECT rater_id, name FROM raters ANTI JOIN revocations USING (rater_id) WHERE token_sha256 = ?", [hash_token(token)]
        ).fetchone()
    return Rater(*row) if row else None


@dataclass(frozen=True)
class AnswerTables:
    """Where one kind of item keeps its answers: the items, the answers, their audit, and the notes."""

    items: str
    answers: str
    answer: str  # the answer column, also `old_<answer>`/`new_<answer>` in the audit
    audit: str
    notes: str
    noun: str  # for messages: "item", "comparison"


SCORE_TABLES = AnswerTables("assignments", "scores", "score", "score_audit", "item_notes", "item")


def completed_positions(db: Database, rater_id: int, tables: AnswerTables = SCORE_TABLES) -> list[bool]:
    """For each of the rater's items (or, with the pairwise tables, comparisons) in order: are all four dimensions answered?"""
    with _using(db) as con:
        rows = con.execute(
            f"""
            SELECT a.position, count(s.dimension) = ? AS complete
            FROM {tables.items} a LEFT JOIN {tables.answers} s USING (rater_id, position)
            WHERE a.rater_id = ?
            GROUP BY a.position ORDER BY a.position
            """,
            [len(DIMENSION_KEYS), rater_id],
        ).fetchall()
    return [complete for _, complete in rows]


def item_view(db: Database, rater_id: int, position: int) -> ItemView:
    with _using(db) as con:
        row = con.execute(
            """
            SELECT i.path, p.narrative_zh, p.prompt_en, a.kind, a.expected, coalesce(n.comment, '')
            FROM assignments a
            JOIN images i USING (image_id)
            JOIN prompts p USING (prompt_id)
            LEFT JOIN item_notes n USING (rater_id, position)
            WHERE a.rater_id = ? AND a.position = ?
            """,
            [rater_id, position],
        ).fetchone()
        if row is None:
            raise FangzhiError(f"rater {rater_id} has no item at position {position}")
        scores = dict(
            con.execute("SELECT dimension, score FROM scores WHERE rater_id = ? AND position = ?", [rater_id, position]).fetchall()
        )
    path, narrative_zh, prompt_en, kind, expected, comment = row
    return ItemView(position, path, narrative_zh, prompt_en, kind, expected, scores, comment)


# ---- the one write path: used by the app, the demo's simulated raters and the tests ------------


def _placeholders(rows: int, columns: int) -> str:
    """`(?, ?), (?, ?)` for a multi-row VALUES list."""
    return ", ".join(["(" + ", ".join(["?"] * columns) + ")"] * rows)


def save_answers(db: Database, tables: AnswerTables, rater_id: int, position: int, answers: Mapping[str, Any], comment: str, seconds: float) -> None:
    """Save one item's four answers, comment and time in one transaction; changed answers go to the audit table.

    Upserts throughout, so a repeated or concurrent first save of an item leaves one set of rows.
    """

    def work(con: duckdb.DuckDBPyConnection) -> None:
        allowed = con.execute(
            f"SELECT 1 FROM {tables.items} ANTI JOIN revocations USING (rater_id) WHERE rater_id = ? AND position = ?", [rater_id, position]
        ).fetchone()
        if allowed is None:
            raise FangzhiError(f"rater {rater_id} cannot save {tables.noun} {position} (no such {tables.noun}, or the rater was revoked)")
        now = con.execute("SELECT current_timestamp").fetchone()[0]
        old = dict(con.execute(f"SELECT dimension, {tables.answer} FROM {tables.answers} WHERE rater_id = ? AND position = ?", [rater_id, position]).fetchall())
        # One multi-row statement each: DuckDB's executemany runs a statement per row (~5 ms more per save).
        con.execute(
            f"""
            INSERT INTO {tables.answers} VALUES {_placeholders(len(answers), 5)}
            ON CONFLICT (rater_id, position, dimension) DO UPDATE SET {tables.answer} = excluded.{tables.answer}, updated_at = excluded.updated_at
            """,
            [value for dimension, answer in answers.items() for value in (rater_id, position, dimension, answer, now)],
        )
        changes = [(rater_id, position, d, old.get(d), a, now) for d, a in answers.items() if old.get(d) != a]
        if changes:
            con.execute(
                f"INSERT INTO {tables.audit} (rater_id, position, dimension, old_{tables.answer}, new_{tables.answer}, changed_at) "
                f"VALUES {_placeholders(len(changes), 6)}",
                [value for change in changes for value in change],
            )
        con.execute(
            f"""
            INSERT INTO {tables.notes} VALUES (?, ?, ?, ?, 1, ?, ?)
            ON CONFLICT (rater_id, position) DO UPDATE SET
                comment = excluded.comment,
                seconds_spent = {tables.notes}.seconds_spent + excluded.seconds_spent,
                saves = {tables.notes}.saves + 1,
                updated_at = excluded.updated_at
            """,
            [rater_id, position, comment, max(0.0, float(seconds)), now, now],
        )

    _transaction(db, work, turn=("rater", rater_id))


def save_item(db: Database, rater_id: int, position: int, scores: Mapping[str, int], comment: str = "", seconds: float = 0.0
) -> None:
    """Save one item's four scores, comment and time in one transaction; revisions go to score_audit."""
    if set(scores) != set(DIMENSION_KEYS):
        raise FangzhiError(f"a save needs exactly the scores {list(DIMENSION_KEYS)}, got {sorted(scores)}")
    for dimension, score in scores.items():
        if not (isinstance(score, int) and SCORE_MIN <= score <= SCORE_MAX):
            raise FangzhiError(f"score for {dimension!r} must be an integer {SCORE_MIN}–{SCORE_MAX}, got {score!r}")
    save_answers(db, SCORE_TABLES, rater_id, position, scores, comment, seconds)


def list_assignments(db: Database) -> pd.DataFrame:
    """Every rater's items with their arm (unblinded!): for the demo's simulated raters and the admin."""
    return _query_df(
        db,
        """
        SELECT r.name AS rater, a.position, i.image_id, i.arm, i.prompt_id AS prompt, i.seed, a.kind, a.expected
        FROM assignments a JOIN raters r USING (rater_id) JOIN images i USING (image_id)
        ORDER BY r.rater_id, a.position
        """,
    )


def add_ratings(db: Database, rows: Iterable[Mapping[str, Any]]) -> int:
    """Save ratings given as dicts {rater, position, style, match, detail, beauty[, comment, seconds]}.

    Goes through `save_item`, the app's own save path. Returns the number of items saved.
    """
    with _using(db) as con:
        rater_ids = dict(con.execute("SELECT name, rater_id FROM raters").fetchall())
        saved = 0
        for row in rows:
            if row["rater"] not in rater_ids:
                raise FangzhiError(f"no rater named {row['rater']!r} in this study")
            scores = {key: int(row[key]) for key in DIMENSION_KEYS}
            save_item(con, rater_ids[row["rater"]], int(row["position"]), scores, row.get("comment", ""), row.get("seconds", 0.0))
            saved += 1
    return saved


# ---- for the admin page -------------------------------------------------------------------------


def rater_progress(db: Database, tables: AnswerTables = SCORE_TABLES) -> pd.DataFrame:
    """Per rater: items (or comparisons, with the pairwise tables) done of total, seconds spent, last save, revoked or not."""
    return _query_df(
        db,
        f"""
        WITH done AS (
            SELECT rater_id, position FROM {tables.answers} GROUP BY rater_id, position HAVING count(*) = {len(DIMENSION_KEYS)}
        )
        SELECT r.name AS rater,
               count(DISTINCT d.position) AS done,
               count(DISTINCT a.position) AS total,
               coalesce(sum(n.seconds_spent), 0) AS seconds,
               median(n.seconds_spent) AS median_seconds_per_item,
               max(n.updated_at) AS last_save,
               v.revoked_at IS NOT NULL AS revoked
        FROM raters r
        LEFT JOIN revocations v ON v.rater_id = r.rater_id
        JOIN {tables.items} a ON a.rater_id = r.rater_id
        LEFT JOIN done d ON d.rater_id = a.rater_id AND d.position = a.position
        LEFT JOIN {tables.notes} n ON n.rater_id = a.rater_id AND n.position = a.position
        GROUP BY r.rater_id, r.name, v.revoked_at
        ORDER BY r.rater_id
        """,
    )


def arm_summary(ratings: pd.DataFrame) -> pd.DataFrame:
    """Mean score per arm and dimension over the main items (unblinded: admin only, after unblinding)."""
    main = ratings[ratings["kind"] == "main"]
    return main.groupby("arm")[list(DIMENSION_KEYS)].agg(["mean", "count"])


# ---- admin writes -------------------------------------------------------------------------------


def revoke_rater(db: Database, name: str) -> None:
    def work(con: duckdb.DuckDBPyConnection) -> None:
        found = con.execute("SELECT rater_id FROM raters ANTI JOIN revocations USING (rater_id) WHERE name = ?", [name]).fetchone()
        if found is None:
            raise FangzhiError(f"no active rater named {name!r} in this study")
        con.execute("INSERT INTO revocations (rater_id) VALUES (?)", found)

    _transaction(db, work)


def set_unblinded(db: Database) -> None:
    _transaction(db, lambda con: con.execute("UPDATE study SET unblinded_at = current_timestamp WHERE unblinded_at IS NULL"))


# ---- the rating app's review page and save checks (added for the app's UI; new queries only) ----


@dataclass(frozen=True)
class ItemVersion:
    """How often an item's answers have changed, and when last: a save in another tab changes it."""

    changes: int
    changed_at: Any


def item_version(db: Database, rater_id: int, position: int, tables: AnswerTables = SCORE_TABLES) -> ItemVersion:
    with _using(db) as con:
        changes, changed_at = con.execute(
            f"SELECT count(*), max(changed_at) FROM {tables.audit} WHERE rater_id = ? AND position = ?", [rater_id, position]
        ).fetchone()
    return ItemVersion(changes, changed_at)


def study_image_paths(db: Database) -> list[str]:
    """Every rated image of the study (both arms), in a fixed order."""
    with _using(db) as con:
        return [path for (path,) in con.execute("SELECT path FROM images ORDER BY image_id").fetchall()]


@dataclass(frozen=True)
class ReviewRow:
    position: int
    image_path: str
    scores: dict[str, int]


def review_rows(db: Database, rater_id: int) -> list[ReviewRow]:
    """Each of the rater's items in order, with whatever scores are saved (an empty dict when none)."""
    with _using(db) as con:
        rows = con.execute(
            """
            SELECT a.position, i.path, list(s.dimension ORDER BY s.dimension), list(s.score ORDER BY s.dimension)
            FROM assignments a
            JOIN images i USING (image_id)
            LEFT JOIN scores s USING (rater_id, position)
            WHERE a.rater_id = ?
            GROUP BY a.position, i.path ORDER BY a.position
            """,
            [rater_id],
        ).fetchall()
    return [ReviewRow(position, path, {d: s for d, s in zip(dims, scores) if d is not None}) for position, path, dims, scores in rows]
