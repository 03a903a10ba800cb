"""Opening the study file for writing: one owner at a time, migrated to the current schema on open.

DuckDB lets one process open a file for writing, and then no other process can open it at all.
While the rating app serves, the app is that process (one connection for its lifetime); everything
else reads the snapshot it keeps beside the file (see `readers`). There is no waiting or retrying
here: a file held by another program is a clear error at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from fangzhi.errors import FangzhiError
from fangzhi.studydb.schema import migrate

# Queries on a study are tiny and many run at once (one per rater); DuckDB's per-query worker
# threads would only contend for the CPU. Every connection of one process must use the same config.
DUCKDB_CONFIG = {"threads": 1}


def snapshot_path(db_path: str | Path) -> Path:
    """Where the rating app keeps the study's latest consistent snapshot while it serves."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".snapshot.parquet")


# DuckDB's file format: an 8-byte checksum, then this magic.
DUCKDB_MAGIC = (8, b"DUCK")


def require_study_file(db_path: str | Path, not_a_study_hint: str = "a ratings CSV or Parquet file goes to --ratings") -> Path:
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FangzhiError(f"{db_path}: no rating study here (create one with `fangzhi study create`)")
    offset, magic = DUCKDB_MAGIC
    with db_path.open("rb") as handle:
        handle.seek(offset)
        if handle.read(len(magic)) != magic:
            raise FangzhiError(
                f"{db_path}: not a rating study (a DuckDB file from `fangzhi study create`); {not_a_study_hint}"
            )
    return db_path


def open_study(db_path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-write connection to an existing study, migrated to the current schema version."""
    db_path = require_study_file(db_path)
    try:
        con = duckdb.connect(str(db_path), config=DUCKDB_CONFIG)
    except duckdb.Error as exc:
        raise FangzhiError(
            f"{db_path}: cannot open the study for writing ({exc}). If another program (the rating app, the DuckDB CLI, "
            f"a notebook) has it open, close that first; to read a study while the app serves, use {snapshot_path(db_path).name}."
        ) from None
    try:
        migrate(con, db_path)
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def connect(db_path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection (study creation tools, the demo, tests); closed on exit."""
    con = open_study(db_path)
    try:
        yield con
    finally:
        con.close()
