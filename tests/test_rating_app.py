"""Rating study: creation, the DuckDB store under concurrency, and the Streamlit app via AppTest (crashes, live reads: test_study_file.py)."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import streamlit as st
from pydantic import ValidationError
from PIL import Image, ImageFilter
from streamlit.testing.v1 import AppTest
from streamlit.web.server.starlette.starlette_app_utils import generate_xsrf_token_string

from fangzhi import studydb
from fangzhi.cli import main as cli_main
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import media, media_access, sample, store, study
from fangzhi.rating_app import serve
from fangzhi.rating_app.serve import BASE_URL_ENV, DB_ENV, RateConfig, streamlit_command
from ports import port_is_free

APP = Path(study.__file__).with_name("app.py")
ALL_FOUR = {key: 3 for key in DIMENSION_KEYS}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return sample.write_sample_manifest(tmp_path_factory.mktemp("generation"), n_prompts=3, size=256)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    return sample.write_sample_references(tmp_path_factory.mktemp("references"), count=2, size=256)


@pytest.fixture
def db_and_links(tmp_path, manifest, references):
    db = tmp_path / "study.duckdb"
    links = study.create_study(manifest, db, ["alice", "bob"], reference_images=references, qc_retest=2, qc_attention=1, seed=5)
    return db, links


def rater_id(db: Path, name: str) -> int:
    with studydb.connect(db) as con:
        return con.execute("SELECT rater_id FROM raters WHERE name = ?", [name]).fetchone()[0]


def count(db: Path, table: str) -> int:
    with studydb.connect(db) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---- study creation --------------------------------------------------------------------------


def test_every_rater_gets_every_image_once_plus_qc_and_no_pair_back_to_back(db_and_links, manifest):
    db, links = db_and_links
    images = [json.loads(line) for line in manifest.read_text().splitlines()]
    pair_of = {image["image_id"]: (image["prompt_id"], image["seed"]) for image in images}
    assignments = store.list_assignments(db)
    orders = {}
    for rater, own in assignments.groupby("rater"):
        own = own.sort_values("position")
        assert list(own["position"]) == list(range(len(images) + 2 + 1))
        main = own[own["kind"] == "main"]
        assert sorted(main["image_id"]) == sorted(pair_of)
        pairs = [pair_of[i] for i in own["image_id"]]
        assert all(a != b for a, b in zip(pairs, pairs[1:])), "two images of one pair back to back"
        for _, retest in own[own["kind"] == "retest"].iterrows():
            first = main.loc[main["image_id"] == retest["image_id"], "position"].item()
            assert first < retest["position"]
        attention = own[own["kind"] == "attention"]
        assert len(attention) == 1 and 1 <= attention["expected"].item() <= 5
        orders[rater] = list(own["image_id"])
    assert orders["alice"] != orders["bob"], "each rater should have their own random order"
    # Only hashes of the tokens are kept.
    raw = db.read_bytes()
    for _name, token, link in links:
        assert link.endswith(f"/?token={token}")
        assert token.encode() not in raw
    with studydb.connect(db) as con:
        hashes = {h for (h,) in con.execute("SELECT token_sha256 FROM raters").fetchall()}
    assert hashes == {store.hash_token(token) for _, token, _ in links}


def test_same_seed_gives_same_orders(tmp_path, manifest):
    study.create_study(manifest, tmp_path / "a.duckdb", ["x", "y"], seed=3)
    study.create_study(manifest, tmp_path / "b.duckdb", ["x", "y"], seed=3)
    first, second = store.list_assignments(tmp_path / "a.duckdb"), store.list_assignments(tmp_path / "b.duckdb")
    pd.testing.assert_frame_equal(first, second)


def test_bad_inputs_name_the_problem(tmp_path, manifest):
    lines = manifest.read_text().splitlines()
    broken = manifest.parent / "broken.jsonl"
    record = json.loads(lines[1])
    del record["narrative_zh"]
    broken.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    with pytest.raises(FangzhiError, match=r"broken.jsonl, line 2: missing field\(s\) narrative_zh"):
        study.create_study(broken, tmp_path / "s.duckdb", ["a"])
    leaky = manifest.parent / "leaky.jsonl"
    record = json.loads(lines[1])
    record["prompt_en"] += ", trigger phrase"
    leaky.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    with pytest.raises(FangzhiError, match="different prompt_en/narrative_zh"):
        study.create_study(leaky, tmp_path / "s.duckdb", ["a"])
    with pytest.raises(FangzhiError, match="listed twice: a"):
        study.create_study(manifest, tmp_path / "s.duckdb", ["a", "b", "a"])
    assert not (tmp_path / "s.duckdb").exists()
    study.create_study(manifest, tmp_path / "s.duckdb", ["a"])
    with pytest.raises(FangzhiError, match="already exists"):
        study.create_study(manifest, tmp_path / "s.duckdb", ["b"])
    # One pair only: its two images cannot avoid being neighbours.
    one_pair = manifest.parent / "one_pair.jsonl"
    one_pair.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(FangzhiError, match="back to back"):
        study.create_study(one_pair, tmp_path / "t.duckdb", ["a"], qc_retest=0, qc_attention=0)


def test_schema_constraints_hold_in_the_database(db_and_links):
    db, _ = db_and_links
    alice = rater_id(db, "alice")
    with studydb.connect(db) as con:
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO scores VALUES (?, 0, 'style', 6, current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO scores VALUES (?, 0, 'colour', 3, current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):  # no such assignment
            con.execute("INSERT INTO scores VALUES (?, 999, 'style', 3, current_timestamp)", [alice])
        con.execute("INSERT INTO scores VALUES (?, 0, 'style', 3, current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):  # one row per (rater, item, dimension)
            con.execute("INSERT INTO scores VALUES (?, 0, 'style', 4, current_timestamp)", [alice])
    with pytest.raises(FangzhiError, match="integer 1–5"):
        store.save_item(db, alice, 1, {**ALL_FOUR, "beauty": 0})


def test_revision_updates_the_row_and_keeps_the_audit_log(db_and_links):
    db, _ = db_and_links
    alice = rater_id(db, "alice")
    store.save_item(db, alice, 0, {"style": 2, "match": 3, "detail": 4, "beauty": 5}, "first", seconds=10)
    store.save_item(db, alice, 0, {"style": 2, "match": 1, "detail": 4, "beauty": 5}, "second", seconds=4)
    with studydb.connect(db) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 4
        audit = con.execute("SELECT dimension, old_score, new_score FROM score_audit ORDER BY audit_id").fetchall()
        note = con.execute("SELECT comment, seconds_spent, saves FROM item_notes").fetchall()
    assert audit == [("style", None, 2), ("match", None, 3), ("detail", None, 4), ("beauty", None, 5), ("match", 3, 1)]
    assert note == [("second", 14.0, 2)]


def test_read_ratings_and_qc_results(db_and_links):
    db, _ = db_and_links
    assignments = store.list_assignments(db)
    alice = assignments[assignments["rater"] == "alice"]
    attention = alice[alice["kind"] == "attention"].iloc[0]
    retest = alice[alice["kind"] == "retest"].iloc[0]
    original = alice[(alice["kind"] == "main") & (alice["image_id"] == retest["image_id"])].iloc[0]
    rows = [
        {"rater": "alice", "position": attention["position"], **{k: int(attention["expected"]) for k in DIMENSION_KEYS}},
        {"rater": "alice", "position": original["position"], "style": 4, "match": 4, "detail": 2, "beauty": 3},
        {"rater": "alice", "position": retest["position"], "style": 4, "match": 5, "detail": 2, "beauty": 1},
        {"rater": "bob", "position": 0, "style": 1, "match": 1, "detail": 1, "beauty": 1},
    ]
    assert store.add_ratings(db, rows) == 4
    # An item with only some dimensions scored is not a rating yet.
    with studydb.connect(db) as con:
        con.execute("INSERT INTO scores VALUES (?, 1, 'style', 3, current_timestamp)", [rater_id(db, "bob")])
    ratings = studydb.read_study(db).ratings()
    assert list(ratings.columns) == ["rater", "arm", "prompt", "seed", "image_id", "kind", "style", "match", "detail", "beauty", "expected", "revoked"]
    assert len(ratings) == 4
    assert set(ratings["arm"]) <= {"base", "lora"}
    retest_row = ratings[ratings["kind"] == "retest"].iloc[0]
    assert (retest_row["arm"], retest_row["prompt"], retest_row["seed"]) == (retest["arm"], retest["prompt"], retest["seed"])
    assert ratings["expected"].isna().sum() == 3
    qc = store.qc_results(ratings).set_index("rater")
    assert qc.loc["alice", "attention_passed"] == 1 and qc.loc["alice", "retest_pairs"] == 1
    # By hand: differences |4-4|, |5-4|, |2-2|, |1-3| = 0, 1, 0, 2.
    assert qc.loc["alice", "retest_exact_agreement"] == pytest.approx(0.5)
    assert qc.loc["alice", "retest_mean_abs_diff"] == pytest.approx(0.75)


def test_cli_create_and_export(tmp_path, manifest):
    names = tmp_path / "names.txt"
    names.write_text("艺术家甲\nartist b\n", encoding="utf-8")
    db = tmp_path / "cli.duckdb"
    assert cli_main(["study", "create", "--manifest", str(manifest), "--db", str(db), "--raters", str(names), "--lang", "en"]) == 0
    links = pd.read_csv(tmp_path / "cli.links.csv")
    assert list(links["rater"]) == ["艺术家甲", "artist b"]
    assert store.rater_for_token(db, links["token"][0]).name == "艺术家甲"
    store.add_ratings(db, [{"rater": "artist b", "position": 2, **ALL_FOUR}])
    assert cli_main(["study", "export", "--db", str(db), "--out", str(tmp_path / "r.parquet")]) == 0
    exported = pd.read_parquet(tmp_path / "r.parquet")
    assert len(exported) == 1 and exported["rater"][0] == "artist b"
    assert cli_main(["study", "export", "--db", str(db), "--out", str(tmp_path / "r.txt")]) == 2
    (tmp_path / "folder.csv").mkdir()
    for unwritable in (tmp_path / "folder.csv", "/proc/ratings.csv"):  # a folder; a place nobody can write
        assert cli_main(["study", "export", "--db", str(db), "--out", str(unwritable)]) == 2
    assert cli_main(["rate", "--db", str(tmp_path / "missing.duckdb")]) == 2


def test_cli_create_never_writes_over_links_and_reads_raters_files_as_windows_saves_them(tmp_path, manifest, capsys):
    create = lambda db, raters, *extra: cli_main(["study", "create", "--manifest", str(manifest), "--db", str(db), "--raters", str(raters), *extra])
    names = tmp_path / "names.txt"
    names.write_bytes("\ufeff艺术家甲\r\nartist b\r\n".encode("utf-8"))  # Notepad's UTF-8: a BOM and CRLF
    other_study_links = tmp_path / "other.links.csv"
    other_study_links.write_text("rater,token,link\nx,secret,http://localhost:8501/?token=secret\n")
    before = other_study_links.read_bytes()
    assert create(tmp_path / "a.duckdb", names, "--links-out", str(other_study_links)) == 2
    assert "other.links.csv: already exists" in capsys.readouterr().err
    assert other_study_links.read_bytes() == before and not (tmp_path / "a.duckdb").exists()

    assert create(tmp_path / "a.duckdb", names) == 0
    links_file = tmp_path / "a.links.csv"
    assert links_file.stat().st_mode & 0o777 == 0o600
    tokens = pd.read_csv(links_file)["token"]
    assert [store.rater_for_token(tmp_path / "a.duckdb", token).name for token in tokens] == ["艺术家甲", "artist b"]

    assert create(tmp_path / "c.duckdb", names, "--manifest", str(manifest.parent)) == 2  # the generation folder itself
    assert f"a folder; give its manifest, {manifest}" in capsys.readouterr().err

    assert create(tmp_path / "c.duckdb", tmp_path) == 2
    assert f"{tmp_path}: a folder; give the rater names file" in capsys.readouterr().err

    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("张三\n李四\n".encode("gbk"))  # Notepad's default on Chinese Windows
    assert create(tmp_path / "b.duckdb", gbk) == 2
    error = capsys.readouterr().err
    assert "gbk.txt, line 1: not UTF-8" in error and "GBK" in error and "Traceback" not in error
    assert not (tmp_path / "b.duckdb").exists()


def test_add_rater_later_and_revoke(db_and_links, manifest):
    db, _ = db_and_links
    name, token, link = study.add_rater(db, "carol")
    assert store.rater_for_token(db, token).name == "carol" and link.endswith(token)
    carol = store.list_assignments(db).query("rater == 'carol'")
    assert sorted(carol.loc[carol["kind"] == "main", "image_id"]) == sorted(json.loads(l)["image_id"] for l in manifest.read_text().splitlines())
    with pytest.raises(FangzhiError, match="already exists"):
        study.add_rater(db, "carol")
    store.revoke_rater(db, "carol")
    assert store.rater_for_token(db, token) is None
    with pytest.raises(FangzhiError, match="revoked"):
        store.save_item(db, rater_id(db, "carol"), 0, ALL_FOUR)


# ---- images --------------------------------------------------------------------------------


def test_images_are_re_encoded_without_metadata(manifest):
    source = next((manifest.parent / "images").iterdir())
    assert "arm:" in Image.open(source).info["parameters"]
    encoded = media.encode_for_display(source)
    image = Image.open(io.BytesIO(encoded))
    assert image.format == "JPEG" and image.size == (256, 256)
    assert not {"parameters", "exif", "icc_profile"} & set(image.info)
    for secret in (b"arm:", b"seed", b"base", b"lora", b"parameters", sample.SAMPLE_BASE_MODEL.encode()):
        assert secret not in encoded


def best_one_threshold_accuracy(lengths: list[int], is_lora: list[bool]) -> float:
    """The best accuracy any rule `length > t` (or `length <= t`) reaches at telling the arms apart."""
    best = 0.0
    for threshold in sorted(set(lengths)) + [min(lengths) - 1]:
        guess = [length > threshold for length in lengths]
        hits = sum(g == truth for g, truth in zip(guess, is_lora)) / len(lengths)
        best = max(best, hits, 1 - hits)
    return best


def test_served_byte_lengths_do_not_tell_the_arms_apart(tmp_path, manifest):
    # One arm made visibly smoother, so that its JPEGs are much smaller: the side channel at its worst.
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths, is_lora = [], []
    for record in records:
        image = Image.open(manifest.parent / record["file"])
        if record["arm"] == "lora":
            image = image.filter(ImageFilter.GaussianBlur(2))
        path = tmp_path / f"{record['image_id']}.png"
        image.save(path)
        paths.append(path)
        is_lora.append(record["arm"] == "lora")
    encoded = [media.encode_for_display(path) for path in paths]
    assert best_one_threshold_accuracy([len(e) for e in encoded], is_lora) == 1.0  # the scan can see a signal
    length = max(len(e) for e in encoded)
    served = [media.pad(e, length, b"session-key" + str(i).encode()) for i, e in enumerate(encoded)]
    assert best_one_threshold_accuracy([len(s) for s in served], is_lora) == 0.5  # chance: the arms are balanced
    for original, padded in zip(encoded, served):
        shown = Image.open(io.BytesIO(padded))
        assert shown.format == "JPEG" and shown.tobytes() == Image.open(io.BytesIO(original)).tobytes()
    # Another session's copy of one image differs byte for byte.
    assert media.pad(encoded[0], length, b"other-session0") != served[0]
    with pytest.raises(ValueError, match="cannot be padded"):
        media.pad(encoded[0], len(encoded[0]) - 1, b"k")


def test_image_tickets_are_redeemed_only_by_the_browser_they_were_issued_to():
    """The route's rule (the browser test checks it through the real server and Chromium)."""
    tickets = media_access.Tickets()
    alice_token, bob_token = os.urandom(16), os.urandom(16)
    # The cookie is masked afresh on every page load; the token under the mask is what counts.
    alice_cookies = [generate_xsrf_token_string(alice_token) for _ in range(2)]
    assert alice_cookies[0] != alice_cookies[1]
    ticket = tickets.issue(media_access.browser_key(alice_cookies[0]), b"jpeg bytes")
    assert tickets.body_for(ticket, media_access.browser_key(alice_cookies[1])) == b"jpeg bytes"
    assert tickets.body_for(ticket, media_access.browser_key(generate_xsrf_token_string(bob_token))) is None
    assert tickets.body_for(ticket, media_access.browser_key(None)) is None
    assert tickets.body_for(ticket, media_access.browser_key("not a cookie")) is None
    assert tickets.body_for("another-ticket", alice_token) is None
    # A ticket issued without a cookie is never redeemed.
    assert tickets.body_for(tickets.issue(b"", b"x"), media_access.browser_key("")) is None
    tickets.revoke([ticket])
    assert tickets.body_for(ticket, alice_token) is None


# ---- storage under load and crashes ---------------------------------------------------------


def test_twenty_concurrent_raters_lose_and_duplicate_nothing(tmp_path, manifest):
    db = tmp_path / "load.duckdb"
    names = [f"rater{i:02d}" for i in range(20)]
    study.create_study(manifest, db, names, qc_retest=0, qc_attention=0)
    items = len(manifest.read_text().splitlines())
    ids = [rater_id(db, name) for name in names]
    start = threading.Barrier(len(ids))
    errors = []

    def rate_all(rid: int) -> None:
        try:
            start.wait()
            for position in range(items):
                store.save_item(db, rid, position, {k: 1 + (rid + position) % 5 for k in DIMENSION_KEYS}, seconds=1.0)
            # every rater revises their first item once
            store.save_item(db, rid, 0, {k: 1 + (rid + 1) % 5 for k in DIMENSION_KEYS}, seconds=1.0)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rate_all, args=(rid,)) for rid in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert count(db, "scores") == 20 * items * 4
    assert count(db, "item_notes") == 20 * items
    assert count(db, "score_audit") == 20 * items * 4 + 20 * 4  # first saves, plus the revision of all four
    ratings = studydb.read_study(db).ratings()
    assert len(ratings) == 20 * items
    assert not ratings.duplicated(["rater", "image_id", "kind"]).any()


# ---- the Streamlit app ----------------------------------------------------------------------


@pytest.fixture
def app_env(db_and_links, monkeypatch):
    db, links = db_and_links
    monkeypatch.setenv(DB_ENV, str(db))
    monkeypatch.delenv("FANGZHI_ADMIN_PASSWORD", raising=False)
    yield db, {name: token for name, token, _ in links}
    st.cache_resource.clear()  # closes the app's connection to this study (and writes its last snapshot)


def open_app(token: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    if token is not None:
        at.query_params["token"] = token
    return at.run()


def answer(at: AppTest, scores: dict[str, int], button: str = "save") -> AppTest:
    position = at.session_state["position"]
    for key, score in scores.items():
        at.radio(key=f"{position}-{key}").set_value(score)
    return at.button(key=f"{button}-{position}").click().run()


def page_text(at: AppTest) -> str:
    parts = [e.value for e in [*at.markdown, *at.title, *at.subheader, *at.caption, *at.text, *at.info, *at.success, *at.error, *at.warning]]
    return "\n".join(str(p) for p in parts)


def test_app_login_rate_revise_and_resume(app_env):
    db, tokens = app_env
    alice = rater_id(db, "alice")
    at = open_app(tokens["alice"])
    assert not at.exception
    assert "评分说明" in page_text(at)
    at.button(key="start").click().run()
    assert at.session_state["position"] == 0 and at.query_params["item"] == "1"
    at = answer(at, {"style": 5, "match": 4, "detail": 3, "beauty": 2})
    assert at.session_state["position"] == 1
    # Saving with a question unanswered keeps the rater on the item and saves nothing.
    at.radio(key="1-style").set_value(2)
    at.button(key="save-1").click().run()
    assert at.session_state["position"] == 1 and "请回答全部四个问题" in page_text(at)
    at = answer(at, {"style": 1, "match": 1, "detail": 1, "beauty": 1})
    # Back keeps unsaved choices: leave item 3 half answered, go back twice, come forward again.
    at.radio(key="2-detail").set_value(4)
    at.button(key="back-2").click().run()
    at.button(key="back-1").click().run()
    assert at.session_state["position"] == 0
    assert at.radio(key="0-style").value == 5  # the saved answer is shown and can be revised
    at = answer(at, {"style": 5, "match": 4, "detail": 3, "beauty": 4})
    assert store.item_view(db, alice, 0).scores == {"style": 5, "match": 4, "detail": 3, "beauty": 4}
    assert count(db, "scores") == 8
    assert at.session_state["position"] == 2 and at.radio(key="2-detail").value == 4 and at.radio(key="2-style").value is None
    # A new session on the invitation link resumes at the first unrated item.
    again = open_app(tokens["alice"])
    again.button(key="start").click().run()
    assert again.session_state["position"] == 2
    assert "2 / " in page_text(again)
    # A new session on a link with an item (a reload, a second tab, a server restart) opens that item directly.
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["token"] = tokens["alice"]
    at.query_params["item"] = "2"
    at.run()
    assert at.session_state["position"] == 1 and at.radio(key="1-style").value == 1


def test_app_save_moves_on_and_next_item_starts_clean(app_env):
    db, tokens = app_env
    alice = rater_id(db, "alice")
    at = open_app(tokens["alice"])
    at.button(key="start").click().run()
    for key in ("style", "match", "detail", "beauty"):
        at.radio(key=f"0-{key}").set_value(3)
    at.button(key="save-0").click().run()
    assert not at.exception and at.session_state["position"] == 1
    assert all(at.radio(key=f"1-{key}").value is None for key in ("style", "match", "detail", "beauty"))
    assert "请回答全部四个问题" not in page_text(at)
    with studydb.connect(db) as con:
        assert con.execute("SELECT saves FROM item_notes WHERE rater_id = ? AND position = 0", [alice]).fetchone() == (1,)


def test_app_save_over_another_tabs_save_asks_first(app_env):
    db, tokens = app_env
    alice = rater_id(db, "alice")
    first, second = open_app(tokens["alice"]), open_app(tokens["alice"])
    for tab in (first, second):
        tab.button(key="start").click().run()
    first = answer(first, {"style": 5, "match": 5, "detail": 5, "beauty": 5})
    second = answer(second, {"style": 1, "match": 1, "detail": 1, "beauty": 1})
    # The second tab's save is refused with a message naming the other save; its choices stay on screen.
    assert store.item_view(db, alice, 0).scores == {"style": 5, "match": 5, "detail": 5, "beauty": 5}
    assert second.session_state["position"] == 0 and "另一个标签页或窗口" in page_text(second)
    assert second.radio(key="0-style").value == 1
    # Saving again overwrites, knowingly.
    second.button(key="save-0").click().run()
    assert store.item_view(db, alice, 0).scores == {"style": 1, "match": 1, "detail": 1, "beauty": 1}
    assert second.session_state["position"] == 1


def test_app_finishing_shows_thank_you_then_review_revises_any_item(app_env):
    db, tokens = app_env
    bob = rater_id(db, "bob")
    total = len(store.completed_positions(db, bob))
    store.add_ratings(db, [{"rater": "bob", "position": p, **ALL_FOUR} for p in range(1, total)])
    at = open_app(tokens["bob"])
    at.button(key="start").click().run()
    assert at.session_state["position"] == 0
    at = answer(at, ALL_FOUR)
    assert at.session_state["view"] == "done"
    assert "感谢您的参与" in page_text(at)
    at.button(key="review").click().run()
    review = at.dataframe[0].value
    assert len(review) == total and list(review["#"]) == list(range(1, total + 1))
    assert all(str(url).startswith("data:image/jpeg;base64,") for url in review["image"])
    at.number_input(key="open-number").set_value(3)
    at.button[0].click().run()
    assert at.session_state["position"] == 2 and at.radio(key="2-style").value == 3
    at = answer(at, {**ALL_FOUR, "style": 5})
    # Revising after finishing returns to the review page, not to the thank-you page.
    assert at.session_state["view"] == "review" and at.dataframe[0].value["style"][2] == "5"
    with studydb.connect(db) as con:
        assert con.execute("SELECT old_score, new_score FROM score_audit WHERE rater_id = ? AND position = 2 AND dimension = 'style' ORDER BY audit_id", [bob]).fetchall() == [(None, 3), (3, 5)]


def test_app_bad_and_revoked_tokens_get_no_access(app_env):
    db, tokens = app_env
    at = open_app("not-a-real-token")
    assert "评分码无效或已被停用" in page_text(at)
    assert not at.radio and [b.label for b in at.button] == ["进入"]  # the login form only
    store.revoke_rater(db, "bob")
    at = open_app(tokens["bob"])
    assert "评分码无效或已被停用" in page_text(at)
    assert not at.radio and "position" not in at.session_state
    # Typing a valid code signs in and puts the token in the URL for reloads.
    at = open_app()
    at.text_input[0].input(tokens["alice"])
    at.button[0].click().run()
    assert at.query_params["token"] == tokens["alice"]
    assert "评分人：alice" in page_text(at)


def test_app_shows_texts_and_names_literally(tmp_path, monkeypatch, references):
    hostile = "# 标题 ![x](http://127.0.0.1:9/t.png) :red[红] *word* <img src=x onerror=alert(1)> $x^2$"
    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=2, size=64)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in records:
        record["narrative_zh"] = record["prompt_en"] = record["prompt"] = hostile
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    db = tmp_path / "study.duckdb"
    [(_, token, _)] = study.create_study(manifest, db, [hostile], qc_retest=0, qc_attention=0)
    monkeypatch.setenv(DB_ENV, str(db))
    at = open_app(token)
    at.button(key="start").click().run()
    texts = [t.value for t in at.text]
    assert hostile in texts and f"评分人：{hostile}" in texts
    # Nothing from the study reaches an element that renders Markdown or HTML.
    rendered = [m.value for m in at.markdown] + [c.value for c in at.caption] + [h.proto.body for h in at.get("html")]
    assert not any("标题" in r or "word" in r for r in rendered)


def test_app_language_switch(app_env):
    _, tokens = app_env
    at = open_app(tokens["alice"])
    assert "评分说明" in page_text(at)
    at.segmented_control(key="lang").set_value("en").run()
    assert "Instructions" in page_text(at)
    at.button(key="start").click().run()
    assert at.radio(key="0-match").label == "**Image–text match**"
    assert "Matches the text exactly" in at.radio(key="0-match").proto.captions


def test_app_admin_needs_the_password(app_env, monkeypatch):
    db, _ = app_env
    monkeypatch.setenv(BASE_URL_ENV, "https://rating.example.org/study")
    store.add_ratings(db, [{"rater": "alice", "position": 0, **ALL_FOUR}])
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["page"] = "admin"
    at.run()
    assert "disabled" in page_text(at)
    monkeypatch.setenv("FANGZHI_ADMIN_PASSWORD", "correct horse")
    at.run()
    at.text_input[0].input("wrong").run()
    at.button[0].click().run()
    assert "Wrong password" in page_text(at) and not at.dataframe
    at.text_input[0].input("correct horse")
    at.button[0].click().run()
    assert not at.exception
    progress = at.dataframe[0].value
    assert list(progress["rater"]) == ["alice", "bob"] and list(progress["done"]) == [1, 0]
    assert "Hidden until you unblind" in page_text(at)
    assert len(at.dataframe) == 2  # progress and QC, no summary by arm
    at.checkbox[0].check()
    next(b for b in at.button if b.label == "Unblind").click().run()
    assert len(at.dataframe) == 3 and store.study_settings(db).unblinded
    # A rater added here gets a link on the configured base URL, appended to the links file (mode 600).
    next(t for t in at.text_input if t.label == "New rater's name").input("carol")
    next(b for b in at.button if b.label == "Add rater").click().run()
    links_file = db.with_suffix(".links.csv")
    rows = links_file.read_text().splitlines()
    assert rows[0] == "rater,token,link" and rows[-1].startswith("carol,")
    assert rows[-1].split(",")[2].startswith("https://rating.example.org/study/?token=")
    assert links_file.stat().st_mode & 0o777 == 0o600
    assert any(c.value == rows[-1].split(",")[2] for c in at.code)


def test_app_admin_sign_in_locks_after_wrong_passwords(app_env, monkeypatch):
    monkeypatch.setenv("FANGZHI_ADMIN_PASSWORD", "correct horse")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["page"] = "admin"
    at.run()
    for _ in range(3):
        at.text_input[0].input("guess")
        at.button[0].click().run()
    assert "locked for 1 s" in page_text(at)
    # While locked even the right password is refused, without being checked.
    at.text_input[0].input("correct horse")
    at.button[0].click().run()
    assert "Too many wrong passwords" in page_text(at) and not at.dataframe
    time.sleep(1.1)
    at.text_input[0].input("correct horse")
    at.button[0].click().run()
    assert at.dataframe


def test_app_error_state_is_in_the_raters_language(tmp_path, monkeypatch):
    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=2, size=64)
    db = tmp_path / "study.duckdb"
    [(_, token, _)] = study.create_study(manifest, db, ["alice"], qc_retest=0, qc_attention=0)
    monkeypatch.setenv(DB_ENV, str(db))
    at = open_app(token)
    for image in (manifest.parent / "images").iterdir():  # the images vanish from the disk under a running app
        image.unlink()
    at.button(key="start").click().run()
    assert not at.exception and "出错了" in page_text(at) and "上一次“保存并继续”" in page_text(at)


def test_rate_config_base_url_sets_the_path_and_links_file(tmp_path):
    config = RateConfig(db=tmp_path / "study.duckdb", port=8600, base_url="https://rating.example.org/study/")
    assert config.public_url == "https://rating.example.org/study" and config.url_path == "study"
    assert config.links_file == tmp_path / "study.links.csv"
    assert RateConfig(db=tmp_path / "s.duckdb", port=8600).public_url == "http://localhost:8600"
    command = streamlit_command("0.0.0.0", 8600, config.url_path)
    assert command[command.index("--server.baseUrlPath") + 1] == "study"
    with pytest.raises(ValidationError):
        RateConfig(db=tmp_path / "s.duckdb", port=0)


# ---- `fangzhi rate`: what it refuses before starting, and how it stops ------------------------


class StreamlitStarted(Exception):
    pass


@pytest.fixture
def no_streamlit(monkeypatch):
    """`fangzhi rate` in this process, with starting Streamlit replaced by raising StreamlitStarted."""

    def popen(*args, **kwargs):
        raise StreamlitStarted(args)

    monkeypatch.setattr(serve.subprocess, "Popen", popen)


@pytest.fixture
def duckdb_file(tmp_path) -> Path:
    """A DuckDB file, which is all `rate` checks of the study before it starts."""
    db = tmp_path / "study.duckdb"
    duckdb.connect(str(db)).close()
    return db


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--db", "{csv}"], ["ratings.csv: not a rating study", "--db takes the .duckdb file"]),
        (["--host", "bogus.invalid"], ["--host bogus.invalid: no such address"]),
        (["--host", "192.0.2.1"], ["--host 192.0.2.1 is not an address of this machine"]),  # TEST-NET-1: nobody's
        (["--base-url", "rating.example.org/study"], ["--base-url rating.example.org/study: ", "http:// or https://"]),
        (["--base-url", "ftp://rating.example.org"], ["--base-url ftp://rating.example.org: "]),
        (["--base-url", "https://"], ["--base-url https://: "]),
    ],
    ids=["csv-as-db", "unknown-host", "foreign-host", "base-url-without-scheme", "base-url-ftp", "base-url-without-host"],
)
def test_rate_refuses_what_could_never_serve_before_starting_anything(tmp_path, duckdb_file, no_streamlit, capsys, flags, expected):
    csv = tmp_path / "ratings.csv"
    csv.write_text("rater,arm,prompt,seed,style,match,detail,beauty\n")
    args = ["rate", "--db", str(duckdb_file), *(flag.format(csv=csv) for flag in flags)]
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert all(part in error for part in expected), error
    assert "--ratings" not in error and "Traceback" not in error  # `rate` has no --ratings


def test_rate_refuses_a_busy_port_but_not_one_whose_connections_are_closing(duckdb_file, no_streamlit, capsys):
    with socket.socket() as taken:  # as another app (another `fangzhi rate`) serving there
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            assert cli_main(["rate", "--db", str(duckdb_file), "--host", host, "--port", str(port)]) == 2
            error = capsys.readouterr().err
            assert f"port {port} on {host} is in use; choose another --port" in error, error

    # A server stopped a moment ago leaves its closed connections in TIME_WAIT; Streamlit may reuse the port.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first, as it does on shutdown
        client.close()
    with pytest.raises(StreamlitStarted):
        cli_main(["rate", "--db", str(duckdb_file), "--port", str(port)])


def processes(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose /proc/PID/stat field after the name (0 state, 1 parent, 2 group) is `value`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[field]) == value:
            found.append(int(stat.parent.name))
    return found


def test_rate_stops_its_whole_group_however_many_stop_signals_arrive_and_whenever(tmp_path, manifest):
    db = tmp_path / "study.duckdb"
    study.create_study(manifest, db, ["alice"], qc_retest=0, qc_attention=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, err = tmp_path / "rate.out", tmp_path / "rate.err"
    # In its own group, as under GNU timeout, which signals the process and then its group.
    rate = subprocess.Popen(
        [sys.executable, "-m", "fangzhi", "rate", "--db", str(db), "--port", str(port)],
        stdout=out.open("w"), stderr=err.open("w"), start_new_session=True,
    )
    streamlit_group = None
    try:
        deadline = time.monotonic() + 90
        while "ready:" not in out.read_text():
            assert rate.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        [streamlit_group] = processes(1, rate.pid)  # Streamlit leads its own group
        os.kill(rate.pid, signal.SIGTERM)
        os.killpg(rate.pid, signal.SIGTERM)
        # Then more of every kind until it has exited, so that some land while it stops Streamlit.
        for stop in itertools.cycle(serve.STOP_SIGNALS):
            if rate.poll() is not None or time.monotonic() > deadline:
                break
            os.kill(rate.pid, stop)
            time.sleep(0.01)
        assert rate.wait(timeout=1) == 0
        assert "Traceback" not in err.read_text(), err.read_text()
        assert processes(2, streamlit_group) == []
        assert port_is_free(port)
    finally:
        if rate.poll() is None:
            rate.kill()
            rate.wait()
        for orphan in processes(2, streamlit_group) if streamlit_group else ():
            os.kill(orphan, signal.SIGKILL)
