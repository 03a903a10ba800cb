"""The study file with one owner: concurrent saves, outside readers, the snapshot, crashes, migration, one QC rule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from fangzhi import studydb
from fangzhi.cli import main as cli_main
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.evaluate.analyze import AnalyzeConfig, analyze
from fangzhi.rating_app import sample, store, study
from fangzhi.rating_app.serve import DB_ENV

APP = Path(study.__file__).with_name("app.py")
FIXTURE_V1 = Path(__file__).parent / "data" / "study_schema_v1"
ALL_FOUR = dict.fromkeys(DIMENSION_KEYS, 3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return sample.write_sample_manifest(tmp_path_factory.mktemp("generation"), n_prompts=3, size=64)


@pytest.fixture
def served(tmp_path, manifest):
    """A study with two raters, held by the app's connection as while the app serves."""
    db = tmp_path / "study.duckdb"
    study.create_study(manifest, db, ["ann", "bo"], qc_retest=1, qc_attention=1, seed=2)
    server = store.StudyServer(db)
    yield db, server
    server.close()


def table_count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---- saves -----------------------------------------------------------------------------------


def test_double_and_concurrent_first_saves_of_one_item_give_one_row_set(served):
    """Two page runs saving the same new item at once (a double click, two tabs) both succeed."""
    db, server = served
    errors = []
    items = 8
    for position in range(items):
        both_ready = threading.Barrier(2)

        def save(scores: dict[str, int]) -> None:
            with server.cursor() as con:
                both_ready.wait()
                try:
                    store.save_item(con, 1, position, scores, seconds=1.0)
                except Exception as exc:  # collected: the test fails on any
                    errors.append(exc)

        # Even positions: the identical double click; odd: two different answers racing.
        second = ALL_FOUR if position % 2 == 0 else dict.fromkeys(DIMENSION_KEYS, 5)
        threads = [threading.Thread(target=save, args=(scores,)) for scores in (ALL_FOUR, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    with server.cursor() as con:
        assert table_count(con, "scores") == items * 4
        assert con.execute("SELECT min(saves), max(saves) FROM item_notes").fetchone() == (2, 2)
        # The identical second save changes nothing; a different one is one revision of all four scores.
        assert table_count(con, "score_audit") == items * 4 + (items // 2) * 4
        assert store.completed_positions(con, 1)[:items] == [True] * items


OUTSIDE = textwrap.dedent(
    """
    import sys, time, duckdb
    from fangzhi import studydb
    db, seconds = sys.argv[1], float(sys.argv[2])
    attempts = opened = snapshot_reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for read_only in (True, False):
            attempts += 1
            try:
                duckdb.connect(db, read_only=read_only).close()
                opened += 1
            except duckdb.Error:
                pass
        snapshot_reads += studydb.read_study(db).from_snapshot
    print(attempts, opened, snapshot_reads, flush=True)
    """
)


def test_an_outside_process_opening_the_file_does_not_delay_saves(served):
    """DuckDB CLI, a notebook or `fangzhi study export` trying the file while the app serves."""
    db, server = served
    outside = subprocess.Popen([sys.executable, "-c", OUTSIDE, str(db), "6"], stdout=subprocess.PIPE, text=True)
    latencies = []
    position = 0
    while outside.poll() is None:
        started = time.monotonic()
        with server.cursor() as con:
            store.save_item(con, 1 + position % 2, position // 2 % 10, dict.fromkeys(DIMENSION_KEYS, 1 + position % 5))
        latencies.append(time.monotonic() - started)
        position += 1
        time.sleep(0.02)
    attempts, opened, snapshot_reads = map(int, outside.stdout.read().split())
    assert outside.returncode == 0
    assert attempts > 10 and opened == 0, "the outside process got into a file the app holds"
    assert snapshot_reads > 5
    # Saves go on while the outside process tries the file: none waits for it (that would be its whole 6 s run).
    # The bound leaves room for a busy 2-core CI machine (one save took 1.5 s in a full run there).
    assert len(latencies) > 50 and statistics.median(latencies) < 0.2 and max(latencies) < 3.0, (statistics.median(latencies), max(latencies))


# ---- reading a live study ---------------------------------------------------------------------

SERVING_APP = textwrap.dedent(
    """
    import sys, threading, time
    from fangzhi.rating_app import store
    db, raters, items, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    server = store.StudyServer(db)
    print("serving", flush=True)
    printing = threading.Lock()
    def rate(rater_id):
        for position in range(items):
            with server.cursor() as con:  # one page run
                store.save_item(con, rater_id, position, dict(style=1 + position % 5, match=2, detail=3, beauty=4), seconds=1.0)
            with printing:
                print(rater_id, position, time.time(), flush=True)  # acknowledged to the rater
            time.sleep(pause)
    threads = [threading.Thread(target=rate, args=(rater_id,)) for rater_id in range(1, raters + 1)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print("all saved", flush=True)
    sys.stdin.readline()  # keep serving until told to stop
    server.close()
    """
)


class Acknowledged:
    """(rater_id, position, time) of each save the serving process acknowledged, collected as they come."""

    def __init__(self, process: subprocess.Popen):
        self.saves: list[tuple[int, int, float]] = []
        self.finished = threading.Event()
        threading.Thread(target=self._collect, args=(process,), daemon=True).start()

    def _collect(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            if line.strip() == "all saved":
                self.finished.set()
                return
            rater_id, position, at = line.split()
            self.saves.append((int(rater_id), int(position), float(at)))

    def before(self, moment: float) -> set[tuple[int, int]]:
        return {(rater_id, position) for rater_id, position, at in list(self.saves) if at < moment}


def saved_items(read: studydb.StudyRead) -> set[tuple[int, int]]:
    rows = read.rows
    complete = rows[list(DIMENSION_KEYS)].notna().all(axis=1)
    return set(zip(rows.loc[complete, "rater_id"].astype(int), rows.loc[complete, "position"].astype(int)))


def test_export_and_analyze_while_the_app_serves_see_every_save_older_than_five_seconds(tmp_path, manifest, capsys):
    db = tmp_path / "live.duckdb"
    study.create_study(manifest, db, ["r1", "r2", "r3", "r4"], qc_retest=0, qc_attention=0)
    items = 12
    app = subprocess.Popen(
        [sys.executable, "-c", SERVING_APP, str(db), "4", str(items), "0.6"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert app.stdout.readline().strip() == "serving"
    acknowledged = Acknowledged(app)
    reads = 0
    analyzed = False
    while not acknowledged.finished.is_set():
        started = time.time()
        rows, read = studydb.export_ratings(db, tmp_path / "ratings.csv")
        assert read.from_snapshot and "snapshot taken" in read.source
        assert acknowledged.before(started - 5.0) <= saved_items(read)
        assert rows == len(pd.read_csv(tmp_path / "ratings.csv")) == len(saved_items(read))
        reads += 1
        if not analyzed and len(saved_items(read)) > 12:  # what the snapshot holds, which may lag the saves by seconds
            assert cli_main(["analyze", "--db", str(db), "--out", str(tmp_path / "analysis"), "--bootstrap", "200"]) == 0
            assert "is open in another process; analysing" in capsys.readouterr().err
            counts = json.loads((tmp_path / "analysis" / "results.json").read_text(encoding="utf-8"))["counts"]
            assert "snapshot taken" in counts["source"]
            assert counts["n_main_ratings"] >= len(acknowledged.before(started - 5.0))
            analyzed = True
        time.sleep(0.5)
    assert reads >= 5 and analyzed
    # Five seconds after the last save, the snapshot (the app still serving) holds every save.
    time.sleep(max(0.0, max(at for _, _, at in acknowledged.saves) + 5.0 - time.time()))
    snapshot = studydb.read_study(db)
    assert snapshot.from_snapshot and saved_items(snapshot) == acknowledged.before(time.time()) and len(acknowledged.saves) == 4 * items
    assert snapshot.saves == 4 * items
    app.stdin.write("stop\n")
    app.stdin.close()
    assert app.wait(timeout=30) == 0
    # Once the app has stopped, readers open the file itself, and it matches the last snapshot.
    direct = studydb.read_study(db)
    assert not direct.from_snapshot and direct.source == str(db)
    pd.testing.assert_frame_equal(direct.ratings(), snapshot.ratings())
    assert direct.settings == snapshot.settings and direct.settings["qc_retest"] == 0


def test_a_file_held_elsewhere_gets_clear_messages_and_the_app_starts_once_it_is_free(tmp_path, manifest, monkeypatch):
    db = tmp_path / "held.duckdb"
    study.create_study(manifest, db, ["ann"], qc_retest=0, qc_attention=0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('held', flush=True); sys.stdin.readline()", str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FangzhiError, match="no snapshot held.duckdb.snapshot.parquet"):
            studydb.read_study(db)
        with pytest.raises(FangzhiError, match="cannot open the study for writing"):
            store.StudyServer(db)
        monkeypatch.setenv(DB_ENV, str(db))
        at = AppTest.from_file(str(APP), default_timeout=30).run()
        assert not at.exception and "cannot be opened right now" in at.error[0].value
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    at.run()  # the next page load, once the other program has let go
    assert not at.exception and not at.error and at.button[0].label == "进入"
    st.cache_resource.clear()


# ---- crashes --------------------------------------------------------------------------------

KILLED_APP = textwrap.dedent(
    """
    import sys
    from fangzhi.rating_app import store
    server = store.StudyServer(sys.argv[1])
    for position in range(1000):
        for rater_id in (1, 2):
            with server.cursor() as con:
                store.save_item(con, rater_id, position % 12, dict(style=1 + position % 5, match=2, detail=3, beauty=4), seconds=0.1)
            print(rater_id, position, flush=True)
    """
)


def test_kill_9_during_saves_loses_nothing_acknowledged_and_raters_resume(tmp_path, manifest):
    db = tmp_path / "crash.duckdb"
    study.create_study(manifest, db, ["ann", "bo"], qc_retest=0, qc_attention=0)
    app = subprocess.Popen([sys.executable, "-c", KILLED_APP, str(db)], stdout=subprocess.PIPE, text=True)
    acknowledged: dict[int, int] = {}
    while sum(acknowledged.values()) < 2 * 7:  # fewer than 12: the next unrated item is well defined
        rater_id, position = map(int, app.stdout.readline().split())
        acknowledged[rater_id] = position + 1
    os.kill(app.pid, signal.SIGKILL)
    app.wait()
    # Readers get the file itself (the crash released it), not the snapshot the app left behind.
    after_crash = studydb.read_study(db)
    assert not after_crash.from_snapshot and after_crash.saves >= sum(acknowledged.values())
    with studydb.connect(db) as con:
        per_item = con.execute("SELECT rater_id, position, count(*) FROM scores GROUP BY ALL").fetchall()
        assert all(n == 4 for _, _, n in per_item), "an item was saved in part"
        for rater_id, saved in acknowledged.items():
            complete = store.completed_positions(con, rater_id)
            resume_at = complete.index(False)
            # Every acknowledged save is there; at most the one in flight was saved too.
            assert all(complete[:saved]) and resume_at in (saved, saved + 1)


# ---- the schema -------------------------------------------------------------------------------


def test_a_study_from_schema_version_1_is_read_as_is_and_migrated_when_served(tmp_path):
    """tests/data/study_schema_v1: a study written by fangzhi before the file had a schema version."""
    db = tmp_path / "old.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f"IMPORT DATABASE '{FIXTURE_V1}'")
        assert "schema_version" not in {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    old = studydb.read_study(db)  # read-only: no migration, and none needed to read
    ratings = old.ratings()
    assert len(ratings) == 17 and old.saves == 18 and ratings["revoked"].sum() == 3  # bo's 3 items; ann revised one
    server = store.StudyServer(db)
    try:
        with server.cursor() as con:
            assert con.execute("SELECT version FROM schema_version").fetchall() == [(studydb.SCHEMA_VERSION,)]
            assert store.item_view(con, 1, 0).comment == "revised"
            store.save_item(con, 1, 1, ALL_FOUR)
    finally:
        server.close()
    migrated = studydb.read_study(db)
    assert migrated.saves == 19
    pd.testing.assert_frame_equal(migrated.ratings().drop(columns=list(DIMENSION_KEYS)), ratings.drop(columns=list(DIMENSION_KEYS)))


def test_newer_or_foreign_files_get_a_clear_message(tmp_path, manifest):
    db = tmp_path / "future.duckdb"
    study.create_study(manifest, db, ["ann"], qc_retest=0, qc_attention=0)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE schema_version SET version = 99")
    for open_it in (studydb.read_study, store.StudyServer):
        with pytest.raises(FangzhiError, match=rf"newer fangzhi \(study schema version 99; this fangzhi reads versions 1–{studydb.SCHEMA_VERSION}\)"):
            open_it(db)
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(FangzhiError, match="not a fangzhi rating study"):
        studydb.read_study(other)
    early = tmp_path / "early.duckdb"
    shutil.copy(db, early)
    with duckdb.connect(str(early)) as con:
        con.execute("DROP TABLE schema_version")
        con.execute("ALTER TABLE study DROP COLUMN qc_attention")
    with pytest.raises(FangzhiError, match="study schema version 1 but missing study.qc_attention"):
        with studydb.connect(early):
            pass


# ---- one QC rule, one set of raters -------------------------------------------------------------


def rate_everything(db: Path, attention_answers: dict[str, dict[str, int]]) -> None:
    """Every item of every rater; attention items get the asked-for score except where `attention_answers` says."""
    rows = []
    for item in store.list_assignments(db).itertuples():
        scores = dict.fromkeys(DIMENSION_KEYS, 1 + (item.position * 3 + len(item.rater)) % 5)
        if item.kind == "attention":
            scores = {**dict.fromkeys(DIMENSION_KEYS, int(item.expected)), **attention_answers.get(item.rater, {})}
        rows.append({"rater": item.rater, "position": item.position, **scores})
    store.add_ratings(db, rows)


def test_admin_page_and_report_agree_on_attention_failures(tmp_path, manifest, monkeypatch):
    db = tmp_path / "qc.duckdb"
    study.create_study(manifest, db, ["ann", "bo", "cy"], qc_retest=1, qc_attention=1, seed=4)
    # bo answers the style question as asked but not the others: a failure under the one rule.
    rate_everything(db, {"bo": {"match": 1, "detail": 1, "beauty": 1}, "cy": {"style": 1}})
    expected_by_rater = store.list_assignments(db).query("kind == 'attention'").set_index("rater")["expected"]
    assert expected_by_rater["bo"] != 1 and expected_by_rater["cy"] != 1  # seed 4 asks for other scores, so both fail

    monkeypatch.setenv(DB_ENV, str(db))
    monkeypatch.setenv("FANGZHI_ADMIN_PASSWORD", "pw")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["page"] = "admin"
    at.run()
    at.text_input[0].input("pw")
    at.button[0].click().run()
    admin_qc = at.dataframe[1].value.set_index("rater")
    st.cache_resource.clear()  # the app lets go of the file

    out = analyze(AnalyzeConfig(db=db, out=tmp_path / "out", bootstrap=200))
    report = pd.DataFrame(json.loads((out / "results.json").read_text(encoding="utf-8"))["attention"]).set_index("rater")
    admin_failures = admin_qc["attention_rated"] - admin_qc["attention_passed"]
    assert admin_failures.to_dict() == report["failures"].to_dict() == {"ann": 0, "bo": 1, "cy": 1}
    assert admin_qc["attention_rated"].to_dict() == report["items"].to_dict()


def test_revoked_raters_and_failed_attention_checks_leave_the_analysis_as_asked(tmp_path, manifest):
    db = tmp_path / "exclude.duckdb"
    study.create_study(manifest, db, ["ann", "bo", "cy"], qc_retest=0, qc_attention=1, seed=4)
    rate_everything(db, {"cy": {"style": 1}})
    store.revoke_rater(db, "bo")
    per_rater = len(store.list_assignments(db).query("rater == 'ann'"))

    def counts(name: str, **options) -> tuple[dict, str]:
        out = analyze(AnalyzeConfig(db=db, out=tmp_path / name, bootstrap=100, **options))
        return json.loads((out / "results.json").read_text(encoding="utf-8"))["counts"], (out / "report.html").read_text(encoding="utf-8")

    default, html = counts("default")
    assert default["n_raters"] == 2 and default["revoked_raters"] == ["bo"] and default["n_revoked_ratings_removed"] == per_rater
    assert f"their {per_rater} ratings were removed (--include-revoked keeps them)" in html
    assert default["n_attention_failures"] == 1 and default["attention_excluded_raters"] == []
    kept, html = counts("kept", include_revoked=True)
    assert kept["n_raters"] == 3 and kept["n_revoked_ratings_removed"] == 0 and "their ratings are included" in html
    strict, html = counts("strict", exclude_failed_attention=1)
    assert strict["n_raters"] == 1 and strict["attention_excluded_raters"] == ["cy"] and strict["n_attention_excluded_ratings"] == per_rater
    assert f"1 (cy); {per_rater} ratings removed (--exclude-failed-attention 1)" in html


# ---- studies with more than two arms ----------------------------------------------------------


def test_a_three_arm_study_orders_every_arm_and_is_analysed_per_arm(tmp_path, capsys):
    arms = ("base", "lora@0.5", "lora@1.0")
    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=3, seeds=(11, 12), arms=arms, size=64)
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    unit_of = {r["image_id"]: (r["prompt_id"], r["seed"]) for r in records}
    raters = tmp_path / "raters.txt"
    raters.write_text("ann\nbo\ncy\n", encoding="utf-8")
    db = tmp_path / "study.duckdb"
    assert cli_main(["study", "create", "--manifest", str(manifest), "--db", str(db), "--raters", str(raters),
                     "--qc-retest", "2", "--qc-attention", "1", "--seed", "3"]) == 0
    assignments = store.list_assignments(db)
    for _rater, own in assignments.groupby("rater"):
        own = own.sort_values("position")
        assert sorted(own.loc[own["kind"] == "main", "image_id"]) == sorted(unit_of)  # all 18 images, every arm once
        units = [unit_of[i] for i in own["image_id"]]
        assert all(a != b for a, b in zip(units, units[1:])), "two images of one (prompt, seed) back to back"
        assert len(own) == 18 + 2 + 1
    with studydb.connect(db) as con:
        assert sorted(a for (a,) in con.execute("SELECT DISTINCT arm FROM images").fetchall()) == sorted(arms)

    # Rated through the app's save path, the analysis has one Table 2 column per arm and the Friedman test.
    rng = np.random.default_rng(0)
    rows = []
    for item in assignments.itertuples():
        scores = {d: int(rng.integers(1, 6)) for d in DIMENSION_KEYS}
        if item.kind == "attention":
            scores = dict.fromkeys(DIMENSION_KEYS, int(item.expected))
        rows.append({"rater": item.rater, "position": item.position, **scores})
    store.add_ratings(db, rows)
    capsys.readouterr()
    assert cli_main(["analyze", "--db", str(db), "--out", str(tmp_path / "out"), "--bootstrap", "200", "--no-mixed-model",
                     "--arm-order", "lora@0.5,lora@1.0"]) == 0
    assert "| Dimension | base | lora@0.5 | lora@1.0 |" in capsys.readouterr().out
    friedman = pd.read_csv(tmp_path / "out" / "friedman.csv")
    assert (friedman.loc[friedman["unit"] == "prompts", "n_units"] == 3).all()
    assert (friedman.loc[friedman["unit"] == "images", "n_units"] == 6).all()


def test_a_manifest_with_a_unit_missing_an_arm_is_refused_naming_it(tmp_path, capsys):
    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=2, seeds=(5,), arms=("base", "a", "b"), size=64)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    dropped = next(line for line in lines if json.loads(line)["arm"] == "b" and json.loads(line)["prompt_id"] == "p001")
    manifest.write_text("\n".join(line for line in lines if line != dropped) + "\n", encoding="utf-8")
    raters = tmp_path / "raters.txt"
    raters.write_text("ann\n", encoding="utf-8")
    db = tmp_path / "study.duckdb"
    assert cli_main(["study", "create", "--manifest", str(manifest), "--db", str(db), "--raters", str(raters)]) == 2
    err = capsys.readouterr().err
    assert "every (prompt, seed) needs one image in each arm (a, b, base); prompt 'p001' seed 5: no b" in err
    assert "Traceback" not in err and not db.exists()
