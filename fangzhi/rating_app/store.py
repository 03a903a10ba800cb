"""The rating study's DuckDB file: schema, the app's reads and writes, and readers for analysis.

DuckDB lets one process at a time open a database file (the first one locks it), and analysis must
be able to read while the app serves raters. So no process holds the file for long: the app runs
each page on one connection and keeps the database open between pages only while raters are active
and no other process is waiting; readers such as `read_ratings` and the export connect briefly.
A process that finds the file locked retries and announces itself (see `connect`). Inside the app's
process all sessions share one DuckDB instance, so raters never wait for each other on the lock;
they only run as separate transactions.

Every save is one transaction: the four scores, the audit rows of what changed, and the item's
comment and time. A crash loses at most the item on screen."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError

SCHEMA_SQL = f"""
CREATE TABLE study (
    study_key     INTEGER PRIMARY KEY CHECK (study_key = 1),  -- exactly one row
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    manifest      VARCHAR NOT NULL,
    default_lang  VARCHAR NOT NULL CHECK (default_lang IN ('zh', 'en')),
    seed          BIGINT NOT NULL,
    qc_retest     INTEGER NOT NULL CHECK (qc_retest >= 0),
    qc_attention  INTEGER NOT NULL CHECK (qc_attention >= 0),
    unblinded_at  TIMESTAMPTZ
);
CREATE TABLE prompts (
    prompt_id     VARCHAR PRIMARY KEY,
    prompt_en     VARCHAR NOT NULL,
    narrative_zh  VARCHAR NOT NULL
);
CREATE TABLE images (
    image_id      VARCHAR PRIMARY KEY,
    arm           VARCHAR NOT NULL,
    prompt_id     VARCHAR NOT NULL REFERENCES prompts (prompt_id),
    seed          BIGINT NOT NULL,
    path          VARCHAR NOT NULL,
    UNIQUE (arm, prompt_id, seed)
);
CREATE TABLE reference_images (
    reference_id  INTEGER PRIMARY KEY,
    path          VARCHAR NOT NULL
);
CREATE SEQUENCE rater_id_seq START 1;
CREATE TABLE raters (
    rater_id      INTEGER PRIMARY KEY DEFAULT nextval('rater_id_seq'),
    name          VARCHAR NOT NULL UNIQUE,
    token_sha256  VARCHAR NOT NULL UNIQUE,
    seed          BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
-- A separate table because DuckDB cannot UPDATE a row that foreign keys point at.
CREATE TABLE revocations (
    rater_id      INTEGER PRIMARY KEY REFERENCES raters (rater_id),
    revoked_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE assignments (
    rater_id      INTEGER NOT NULL REFERENCES raters (rater_id),
    position      INTEGER NOT NULL CHECK (position >= 0),
    image_id      VARCHAR NOT NULL REFERENCES images (image_id),
    kind          VARCHAR NOT NULL CHECK (kind IN ('main', 'retest', 'attention')),
    expected      INTEGER CHECK (expected BETWEEN {SCORE_MIN} AND {SCORE_MAX}),
    PRIMARY KEY (rater_id, position),
    CHECK ((kind = 'attention') = (expected IS NOT NULL))
);
CREATE TABLE scores (
    rater_id      INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    dimension     VARCHAR NOT NULL CHECK (dimension IN ({", ".join(f"'{k}'" for k in DIMENSION_KEYS)})),
    score         INTEGER NOT NULL CHECK (score BETWEEN {SCORE_MIN} AND {SCORE_MAX}),
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rater_id, position, dimension),
    FOREIGN KEY (rater_id, position) REFERENCES assignments (rater_id, position)
);
CREATE SEQUENCE score_audit_seq START 1;
CREATE TABLE score_audit (
    audit_id      BIGINT PRIMARY KEY DEFAULT nextval('score_audit_seq'),
    rater_id      INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    dimension     VARCHAR NOT NULL,
    old_score     INTEGER,            -- NULL on the first save
    new_score     INTEGER NOT NULL CHECK (new_score BETWEEN {SCORE_MIN} AND {SCORE_MAX}),
    changed_at    TIMESTAMPTZ NOT NULL,
    FOREIGN KEY (rater_id, position) REFERENCES assignments (rater_id, position)
);
CREATE TABLE item_notes (
    rater_id       INTEGER NOT NULL,
    position       INTEGER NOT NULL,
    comment        VARCHAR NOT NULL DEFAULT '',
    seconds_spent  DOUBLE NOT NULL CHECK (seconds_spent >= 0),  -- summed over every visit that ended in a save
    saves          INTEGER NOT NULL CHECK (saves >= 1),
    first_saved_at TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rater_id, position),
    FOREIGN KEY (rater_id, position) REFERENCES assignments (rater_id, position)
);
"""

LOCK_TIMEOUT_SECONDS = 30.0
# Queries here are tiny and many run at once (one per rater); DuckDB's per-query worker threads
# would only contend for the CPU.
DUCKDB_CONFIG = {"threads": 1}
T = TypeVar("T")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


# DuckDB's lock has no queue: while the app serves many raters, some thread nearly always has the
# file open and a reader from another process could wait forever. So a process that finds the file
# locked leaves a request file beside it, and a process about to open the file first lets fresh
# requests of other processes go ahead (for at most GIVE_WAY_SECONDS). The app's connections then
# drain within milliseconds, the file closes, and the waiting reader gets in.
GIVE_WAY_SECONDS = 2.0
REQUEST_FRESH_SECONDS = 5.0


def _request_file(db_path: Path) -> Path:
    return db_path.with_name(f"{db_path.name}.open-request.{os.getpid()}-{threading.get_ident()}")


def _others_waiting(db_path: Path) -> bool:
    # Threads of this process share one open database, so only other processes count.
    own_process = f"{db_path.name}.open-request.{os.getpid()}-"
    now = time.time()
    for request in db_path.parent.glob(f"{db_path.name}.open-request.*"):
        try:
            if not request.name.startswith(own_process) and now - request.stat().st_mtime < REQUEST_FRESH_SECONDS:
                return True
        except FileNotFoundError:  # withdrawn meanwhile
            continue
    return False


# Opening a DuckDB file costs ~12 ms, more than a page's queries. The app therefore keeps one
# "anchor" connection open while raters are active: later connects in the process then reuse the
# open database (duckdb caches it per path) for microseconds. A watcher closes the anchor after a
# second without requests, or as soon as another process asks for the file.
ANCHOR_IDLE_SECONDS = 1.0
_anchors: dict[Path, duckdb.DuckDBPyConnection] = {}
_anchor_last_used: dict[Path, float] = {}
_anchor_lock = threading.Lock()


def _keep_warm(db_path: Path) -> None:
    with _anchor_lock:
        _anchor_last_used[db_path] = time.monotonic()
        if db_path not in _anchors:
            _anchors[db_path] = duckdb.connect(str(db_path), config=DUCKDB_CONFIG)  # the database is open: a cache hit
            threading.Thread(target=_watch_anchor, args=(db_path,), daemon=True, name="duckdb-anchor").start()


def _watch_anchor(db_path: Path) -> None:
    while True:
        time.sleep(0.05)
        with _anchor_lock:
            if time.monotonic() - _anchor_last_used[db_path] > ANCHOR_IDLE_SECONDS or _others_waiting(db_path):
                _anchors.pop(db_path).close()
                return


@contextmanager
def connect(db_path: str | Path, timeout: float = LOCK_TIMEOUT_SECONDS, keep_warm: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection; waits its turn while another process holds the file.

    keep_warm (the app's page runs): keep the database open in this process between requests.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FangzhiError(f"{db_path}: no rating study here (create one with `fangzhi study create`)")
    give_way_until = time.monotonic() + GIVE_WAY_SECONDS
    while _others_waiting(db_path) and time.monotonic() < give_way_until:
        time.sleep(0.005)
    deadline = time.monotonic() + timeout
    request = _request_file(db_path)
    try:
        while True:
            try:
                con = duckdb.connect(str(db_path), config=DUCKDB_CONFIG)
                break
            except duckdb.Error as exc:
                if not _is_lock_conflict(exc):
                    raise
                if time.monotonic() > deadline:
                    raise FangzhiError(f"{db_path}: still locked by another process after {timeout:.0f} s: {exc}") from None
                request.touch()  # (re)announce that this process is waiting
                time.sleep(0.005 + 0.01 * random.random())
    finally:
        request.unlink(missing_ok=True)
    if keep_warm:
        _keep_warm(db_path)
    try:
        yield con
    finally:
        con.close()


# Store functions take a database path (and open a short-lived connection) or a connection that is
# already open, so that one app run can do all its work with a single open.
Database = str | Path | duckdb.DuckDBPyConnection


@contextmanager
def _using(db: Database) -> Iterator[duckdb.DuckDBPyConnection]:
    if isinstance(db, duckdb.DuckDBPyConnection):
        yield db
    else:
        with connect(db) as con:
            yield con


def _transaction(db: Database, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run `work` in one transaction; retried whole when DuckDB reports a write-write conflict."""
    for attempt in range(20):
        with _using(db) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                result = work(con)
                con.execute("COMMIT")
                return result
            except duckdb.TransactionException:
                con.execute("ROLLBACK")
                if attempt == 19:
                    raise
            except BaseException:
                con.execute("ROLLBACK")
                raise
        time.sleep(0.01 * (1 + random.random()))
    raise AssertionError("unreachable")


def _query_df(db: Database, sql: str, params: Iterable[Any] = ()) -> pd.DataFrame:
    with _using(db) as con:
        return con.execute(sql, list(params)).df()


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
    return StudySettings(lang, unblinded_at is not None, tuple(p for (p,) in references))


def rater_for_token(db: Database, token: str) -> Rater | None:
    """The rater whose invitation token this is, or None for an unknown or revoked token."""
    with _using(db) as con:
        row = con.execute(
            "SELECT rater_id, name FROM raters ANTI JOIN revocations USING (rater_id) WHERE token_sha256 = ?", [hash_token(token)]
        ).fetchone()
    return Rater(*row) if row else None


def completed_positions(db: Database, rater_id: int) -> list[bool]:
    """For each of the rater's positions in order: are all four dimensions scored?"""
    with _using(db) as con:
        rows = con.execute(
            """
            SELECT a.position, count(s.dimension) = ? AS complete
            FROM assignments a LEFT JOIN scores s USING (rater_id, position)
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


def save_item(db: Database, rater_id: int, position: int, scores: Mapping[str, int], comment: str = "", seconds: float = 0.0
) -> None:
    """Save one item's four scores, comment and time in one transaction; revisions go to score_audit."""
    if set(scores) != set(DIMENSION_KEYS):
        raise FangzhiError(f"a save needs exactly the scores {list(DIMENSION_KEYS)}, got {sorted(scores)}")
    for dimension, score in scores.items():
        if not (isinstance(score, int) and SCORE_MIN <= score <= SCORE_MAX):
            raise FangzhiError(f"score for {dimension!r} must be an integer {SCORE_MIN}–{SCORE_MAX}, got {score!r}")

    def work(con: duckdb.DuckDBPyConnection) -> None:
        allowed = con.execute(
            """
            SELECT 1 FROM assignments ANTI JOIN revocations USING (rater_id)
            WHERE rater_id = ? AND position = ?
            """,
            [rater_id, position],
        ).fetchone()
        if allowed is None:
            raise FangzhiError(f"rater {rater_id} cannot save position {position} (no such item, or the rater was revoked)")
        now = con.execute("SELECT current_timestamp").fetchone()[0]
        old = dict(con.execute("SELECT dimension, score FROM scores WHERE rater_id = ? AND position = ?", [rater_id, position]).fetchall())
        # One multi-row statement each: DuckDB's executemany runs a statement per row (~5 ms more per save).
        con.execute(
            f"""
            INSERT INTO scores VALUES {_placeholders(len(scores), 5)}
            ON CONFLICT (rater_id, position, dimension) DO UPDATE SET score = excluded.score, updated_at = excluded.updated_at
            """,
            [value for dimension, score in scores.items() for value in (rater_id, position, dimension, score, now)],
        )
        changes = [(rater_id, position, d, old.get(d), s, now) for d, s in scores.items() if old.get(d) != s]
        if changes:
            con.execute(
                "INSERT INTO score_audit (rater_id, position, dimension, old_score, new_score, changed_at) "
                f"VALUES {_placeholders(len(changes), 6)}",
                [value for change in changes for value in change],
            )
        con.execute(
            """
            INSERT INTO item_notes VALUES (?, ?, ?, ?, 1, ?, ?)
            ON CONFLICT (rater_id, position) DO UPDATE SET
                comment = excluded.comment,
                seconds_spent = item_notes.seconds_spent + excluded.seconds_spent,
                saves = item_notes.saves + 1,
                updated_at = excluded.updated_at
            """,
            [rater_id, position, comment, max(0.0, float(seconds)), now, now],
        )

    _transaction(db, work)


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
            raise FangzhiError(f"{db}: no rater named {row['rater']!r}")
        scores = {key: int(row[key]) for key in DIMENSION_KEYS}
        save_item(db, rater_ids[row["rater"]], int(row["position"]), scores, row.get("comment", ""), row.get("seconds", 0.0))
        saved += 1
    return saved


# ---- readers for analysis and the admin page ----------------------------------------------------

_PIVOT = ",\n".join(f"max(s.score) FILTER (WHERE s.dimension = '{k}') AS {k}" for k in DIMENSION_KEYS)


def read_ratings(db: Database) -> pd.DataFrame:
    """One row per rater × item with all four dimensions scored (see docs/formats.md, "Rating study DB").

    Columns: rater, arm, prompt, seed, image_id, kind, style, match, detail, beauty, expected.
    Safe to call while the app serves raters: the connection is short-lived and waits for the lock.
    """
    ratings = _query_df(
        db,
        f"""
        SELECT r.name AS rater, i.arm, i.prompt_id AS prompt, i.seed, i.image_id, a.kind,
               {_PIVOT},
               a.expected
        FROM assignments a
        JOIN raters r USING (rater_id)
        JOIN images i USING (image_id)
        JOIN scores s USING (rater_id, position)
        GROUP BY r.rater_id, r.name, a.position, i.arm, i.prompt_id, i.seed, i.image_id, a.kind, a.expected
        HAVING count(*) = {len(DIMENSION_KEYS)}
        ORDER BY r.rater_id, a.position
        """,
    )
    for key in DIMENSION_KEYS:
        ratings[key] = ratings[key].astype("int64")
    ratings["seed"] = ratings["seed"].astype("int64")
    ratings["expected"] = ratings["expected"].astype("Int64")
    return ratings.reset_index(drop=True)


def export_ratings(db: Database, out: str | Path) -> int:
    """Write `read_ratings` to .csv or .parquet; returns the number of rows."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise FangzhiError(f"{out}: the export file must end in .csv or .parquet")
    ratings = read_ratings(db)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".csv":
        ratings.to_csv(tmp, index=False)
    else:
        ratings.to_parquet(tmp, index=False)
    tmp.replace(out)
    return len(ratings)


def rater_progress(db: Database) -> pd.DataFrame:
    """Per rater: items done of total, seconds spent, last save, revoked or not."""
    return _query_df(
        db,
        f"""
        WITH done AS (
            SELECT rater_id, position FROM scores GROUP BY rater_id, position HAVING count(*) = {len(DIMENSION_KEYS)}
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
        JOIN assignments a ON a.rater_id = r.rater_id
        LEFT JOIN done d ON d.rater_id = a.rater_id AND d.position = a.position
        LEFT JOIN item_notes n ON n.rater_id = a.rater_id AND n.position = a.position
        GROUP BY r.rater_id, r.name, v.revoked_at
        ORDER BY r.rater_id
        """,
    )


def qc_results(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per rater: attention checks passed (all four scores as asked) and test–retest agreement.

    Retest agreement compares each repeated image with the rater's first ('main') rating of it:
    the share of the four scores that are identical and the mean absolute difference.
    """
    rows = []
    for rater, own in ratings.groupby("rater", sort=False):
        attention = own[own["kind"] == "attention"]
        passed = int((attention[list(DIMENSION_KEYS)].eq(attention["expected"].astype("int64"), axis=0)).all(axis=1).sum())
        retest = own[own["kind"] == "retest"].merge(own[own["kind"] == "main"], on="image_id", suffixes=("_retest", "_main"))
        differences = pd.concat([(retest[f"{k}_retest"] - retest[f"{k}_main"]).abs() for k in DIMENSION_KEYS]) if len(retest) else pd.Series(dtype=float)
        rows.append(
            {
                "rater": rater,
                "attention_passed": passed,
                "attention_rated": len(attention),
                "retest_pairs": len(retest),
                "retest_exact_agreement": float((differences == 0).mean()) if len(differences) else float("nan"),
                "retest_mean_abs_diff": float(differences.mean()) if len(differences) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["rater", "attention_passed", "attention_rated", "retest_pairs", "retest_exact_agreement", "retest_mean_abs_diff"])


def arm_summary(ratings: pd.DataFrame) -> pd.DataFrame:
    """Mean score per arm and dimension over the main items (unblinded: admin only, after unblinding)."""
    main = ratings[ratings["kind"] == "main"]
    return main.groupby("arm")[list(DIMENSION_KEYS)].agg(["mean", "count"])


# ---- admin writes -------------------------------------------------------------------------------


def revoke_rater(db: Database, name: str) -> None:
    def work(con: duckdb.DuckDBPyConnection) -> None:
        found = con.execute("SELECT rater_id FROM raters ANTI JOIN revocations USING (rater_id) WHERE name = ?", [name]).fetchone()
        if found is None:
            raise FangzhiError(f"{db}: no active rater named {name!r}")
        con.execute("INSERT INTO revocations (rater_id) VALUES (?)", found)

    _transaction(db, work)


def set_unblinded(db: Database) -> None:
    _transaction(db, lambda con: con.execute("UPDATE study SET unblinded_at = current_timestamp WHERE unblinded_at IS NULL"))


# ---- the rating app's review page and save checks (added for the app's UI; new queries only) ----


@dataclass(frozen=True)
class ItemVersion:
    """How often an item's scores have changed, and when last: a save in another tab changes it."""

    changes: int
    changed_at: Any


def item_version(db: Database, rater_id: int, position: int) -> ItemVersion:
    with _using(db) as con:
        changes, changed_at = con.execute(
            "SELECT count(*), max(changed_at) FROM score_audit WHERE rater_id = ? AND position = ?", [rater_id, position]
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
