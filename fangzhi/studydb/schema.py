"""The study file's tables, its schema version, and the migrations that bring an older file up to date.

Version 1 is the schema fangzhi wrote before the file carried a version (the same tables, no
`schema_version`); version 2 adds `schema_version`; version 3 adds the study's mode ('absolute' 1–5
scores or 'pairwise' side-by-side preferences) and the pairwise tables (`PAIRWISE_TABLES_SQL`); an
older file becomes an absolute study with empty pairwise tables. A file opened for writing is migrated in one
transaction; readers accept every version they can read and name the version otherwise.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import duckdb

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError

SCHEMA_VERSION = 3
PAIRWISE_SINCE = 3
MODES = ("absolute", "pairwise")
BLANK_SIDE = "(blank)"  # the arm name a pairwise attention item's blank side is exported under

DATA_TABLES_SQL = f"""
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

_DIMENSION_LIST = ", ".join(f"'{k}'" for k in DIMENSION_KEYS)

# A pairwise study shows each rater comparisons of two images of one (prompt, seed). A side that is
# NULL is the blank image the app draws itself: the attention items, whose right answer is the other side.
PAIRWISE_TABLES_SQL = f"""
CREATE TABLE study_mode (
    study_key     INTEGER PRIMARY KEY CHECK (study_key = 1),  -- exactly one row
    mode          VARCHAR NOT NULL CHECK (mode IN ('absolute', 'pairwise'))
);
CREATE TABLE comparisons (
    rater_id      INTEGER NOT NULL REFERENCES raters (rater_id),
    position      INTEGER NOT NULL CHECK (position >= 0),
    prompt_id     VARCHAR NOT NULL REFERENCES prompts (prompt_id),
    seed          BIGINT NOT NULL,
    left_image    VARCHAR REFERENCES images (image_id),
    right_image   VARCHAR REFERENCES images (image_id),
    kind          VARCHAR NOT NULL CHECK (kind IN ('main', 'retest', 'attention')),
    PRIMARY KEY (rater_id, position),
    CHECK (left_image IS NOT NULL OR right_image IS NOT NULL),
    CHECK ((kind = 'attention') = (left_image IS NULL OR right_image IS NULL)),
    CHECK (left_image IS NULL OR right_image IS NULL OR left_image <> right_image)
);
CREATE TABLE choices (
    rater_id      INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    dimension     VARCHAR NOT NULL CHECK (dimension IN ({_DIMENSION_LIST})),
    choice        VARCHAR NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rater_id, position, dimension),
    FOREIGN KEY (rater_id, position) REFERENCES comparisons (rater_id, position)
);
CREATE SEQUENCE choice_audit_seq START 1;
CREATE TABLE choice_audit (
    audit_id      BIGINT PRIMARY KEY DEFAULT nextval('choice_audit_seq'),
    rater_id      INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    dimension     VARCHAR NOT NULL,
    old_choice    VARCHAR,            -- NULL on the first save
    new_choice    VARCHAR NOT NULL CHECK (new_choice IN ('left', 'right', 'tie')),
    changed_at    TIMESTAMPTZ NOT NULL,
    FOREIGN KEY (rater_id, position) REFERENCES comparisons (rater_id, position)
);
CREATE TABLE comparison_notes (
    rater_id       INTEGER NOT NULL,
    position       INTEGER NOT NULL,
    comment        VARCHAR NOT NULL DEFAULT '',
    seconds_spent  DOUBLE NOT NULL CHECK (seconds_spent >= 0),
    saves          INTEGER NOT NULL CHECK (saves >= 1),
    first_saved_at TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rater_id, position),
    FOREIGN KEY (rater_id, position) REFERENCES comparisons (rater_id, position)
);
"""

VERSION_TABLE_SQL = "CREATE TABLE schema_version (version INTEGER NOT NULL);"


def create_schema(con: duckdb.DuckDBPyConnection, mode: str = "absolute") -> None:
    """Every table of a new study file, stamped with the current schema version."""
    con.execute(DATA_TABLES_SQL)
    con.execute(PAIRWISE_TABLES_SQL)
    con.execute("INSERT INTO study_mode VALUES (1, ?)", [mode])
    con.execute(VERSION_TABLE_SQL)
    con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])


@cache
def _data_columns(version: int) -> dict[str, frozenset[str]]:
    """Table -> column names of the data tables of a file of `version` (versions 1 and 2 have the same ones)."""
    with duckdb.connect() as scratch:
        scratch.execute(DATA_TABLES_SQL)
        if version >= PAIRWISE_SINCE:
            scratch.execute(PAIRWISE_TABLES_SQL)
        return _columns(scratch)


def study_mode(con: duckdb.DuckDBPyConnection, version: int) -> str:
    """'absolute' or 'pairwise'; files older than version 3 hold absolute studies."""
    if version < PAIRWISE_SINCE:
        return "absolute"
    return con.execute("SELECT mode FROM study_mode").fetchone()[0]


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, frozenset[str]]:
    rows = con.execute(
        "SELECT table_name, list(column_name) FROM duckdb_columns() WHERE database_name = current_database() AND schema_name = 'main' GROUP BY table_name"
    ).fetchall()
    return {table: frozenset(columns) for table, columns in rows}


def stored_version(con: duckdb.DuckDBPyConnection, path: str | Path) -> int:
    """The file's schema version; a clear FangzhiError when this fangzhi cannot read it."""
    present = _columns(con)
    if "study" not in present:
        raise FangzhiError(f"{path}: not a fangzhi rating study (it has no `study` table); create one with `fangzhi study create`")
    if "schema_version" in present:
        version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    else:
        version = 1
    if version > SCHEMA_VERSION:
        raise FangzhiError(
            f"{path}: made by a newer fangzhi (study schema version {version}; this fangzhi reads versions 1–{SCHEMA_VERSION}). "
            "Upgrade fangzhi to open it; the file is left as it is."
        )
    missing = [f"{table}.{column}" for table, columns in _data_columns(version).items() for column in sorted(columns - present.get(table, frozenset()))]
    if missing:
        raise FangzhiError(
            f"{path}: study schema version {version} but missing {', '.join(missing)}; the file was made by an early development "
            "version of fangzhi that no migration covers. Export its ratings with that version, or create the study again."
        )
    return version


def migrate(con: duckdb.DuckDBPyConnection, path: str | Path) -> int:
    """Bring the file to SCHEMA_VERSION in one transaction; returns the version it had."""
    version = stored_version(con, path)
    if version == SCHEMA_VERSION:
        return version
    con.execute("BEGIN TRANSACTION")
    try:
        if version < 2:  # 1 -> 2: the data tables are unchanged; the file now says which version it is.
            con.execute(VERSION_TABLE_SQL)
            con.execute("INSERT INTO schema_version VALUES (?)", [version])
        # 2 -> 3: an absolute study, with the (empty) pairwise tables.
        con.execute(PAIRWISE_TABLES_SQL)
        con.execute("INSERT INTO study_mode VALUES (1, 'absolute')")
        con.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return version
