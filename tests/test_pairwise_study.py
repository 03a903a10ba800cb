"""Pairwise (side-by-side) studies: the schema, the design each rater gets, the page via AppTest, and study -> votes -> analysis."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from fangzhi import studydb
from fangzhi.cli import main as cli_main
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import media, media_access, pairwise_page, pairwise_store, sample, study
from fangzhi.rating_app.pairwise_design import balanced_sides
from fangzhi.rating_app.serve import DB_ENV
from fangzhi.studydb.schema import BLANK_SIDE

APP = Path(study.__file__).with_name("app.py")
ARMS_3 = ("base", "lora_a", "lora_b")
ARMS_6 = ("base", "a1", "a2", "a3", "a4", "a5")


@pytest.fixture(scope="module")
def manifest3(tmp_path_factory) -> Path:
    return sample.write_sample_manifest(tmp_path_factory.mktemp("gen3"), n_prompts=3, arms=ARMS_3, size=96)


@pytest.fixture(scope="module")
def manifest6(tmp_path_factory) -> Path:
    return sample.write_sample_manifest(tmp_path_factory.mktemp("gen6"), n_prompts=4, arms=ARMS_6, size=64)


@pytest.fixture
def pairwise_db(tmp_path, manifest3) -> tuple[Path, dict[str, str]]:
    db = tmp_path / "pairwise.duckdb"
    links = study.create_study(manifest3, db, ["alice", "bob"], qc_retest=2, qc_attention=2, seed=3, mode="pairwise")
    return db, {name: token for name, token, _ in links}


def rater_id(db: Path, name: str) -> int:
    with studydb.connect(db) as con:
        return con.execute("SELECT rater_id FROM raters WHERE name = ?", [name]).fetchone()[0]


# ---- schema -----------------------------------------------------------------------------------


def test_schema_checks_choices_one_row_per_dimension_and_audits_revisions(pairwise_db):
    db, _ = pairwise_db
    alice = rater_id(db, "alice")
    with studydb.connect(db) as con:
        assert con.execute("SELECT mode FROM study_mode").fetchone() == ("pairwise",)
        assert con.execute("SELECT version FROM schema_version").fetchone() == (studydb.SCHEMA_VERSION,)
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO choices VALUES (?, 0, 'style', 'both', current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO choices VALUES (?, 0, 'colour', 'left', current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):  # no such comparison
            con.execute("INSERT INTO choices VALUES (?, 999, 'style', 'left', current_timestamp)", [alice])
        con.execute("INSERT INTO choices VALUES (?, 0, 'style', 'left', current_timestamp)", [alice])
        with pytest.raises(duckdb.ConstraintException):  # one row per rater × comparison × dimension
            con.execute("INSERT INTO choices VALUES (?, 0, 'style', 'right', current_timestamp)", [alice])
        image = con.execute("SELECT image_id FROM images LIMIT 1").fetchone()[0]
        with pytest.raises(duckdb.ConstraintException):  # a blank side only on attention items
            con.execute("INSERT INTO comparisons VALUES (?, 500, 'p000', 1, NULL, ?, 'main')", [alice, image])
        with pytest.raises(duckdb.ConstraintException):  # an image against itself
            con.execute("INSERT INTO comparisons VALUES (?, 501, 'p000', 1, ?, ?, 'main')", [alice, image, image])
        con.execute("DELETE FROM choices")
    choices = dict.fromkeys(DIMENSION_KEYS, "left")
    pairwise_store.save_choices(db, alice, 1, choices)
    pairwise_store.save_choices(db, alice, 1, choices)  # the same answers again: an upsert, no new audit rows
    pairwise_store.save_choices(db, alice, 1, {**choices, "beauty": "tie"})
    with studydb.connect(db) as con:
        assert con.execute("SELECT count(*) FROM choices").fetchone() == (4,)
        assert con.execute("SELECT count(*) FROM choice_audit WHERE old_choice IS NULL").fetchone() == (4,)
        assert con.execute("SELECT dimension, old_choice, new_choice FROM choice_audit WHERE old_choice IS NOT NULL").fetchall() == [("beauty", "left", "tie")]
        assert con.execute("SELECT saves FROM comparison_notes").fetchone() == (3,)
    with pytest.raises(FangzhiError, match="left, right, tie"):
        pairwise_store.save_choices(db, alice, 1, {**choices, "style": "both"})


def test_an_absolute_study_of_schema_version_2_is_migrated_and_stays_absolute(tmp_path, manifest3):
    db = tmp_path / "absolute.duckdb"
    study.create_study(manifest3, db, ["alice"], qc_retest=0, qc_attention=0, seed=1)
    with studydb.connect(db) as con:  # make it the file version 2 wrote: no mode, no pairwise tables
        con.execute("DROP TABLE comparison_notes; DROP TABLE choice_audit; DROP SEQUENCE choice_audit_seq; DROP TABLE choices; DROP TABLE comparisons; DROP TABLE study_mode")
        con.execute("UPDATE schema_version SET version = 2")
    old = studydb.read_study(db)  # read-only, no migration needed
    assert old.mode == "absolute" and len(old.rows) == 18  # 3 prompts × 2 seeds × 3 arms
    with studydb.connect(db) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(studydb.SCHEMA_VERSION,)]
        assert con.execute("SELECT mode FROM study_mode").fetchall() == [("absolute",)]
    assert studydb.read_study(db).mode == "absolute"


# ---- the design -------------------------------------------------------------------------------


@pytest.mark.parametrize("arms, manifest_name", [(ARMS_3, "manifest3"), (ARMS_6, "manifest6")])
def test_each_rater_sees_every_arm_equally_often_on_balanced_sides_and_no_unit_back_to_back(tmp_path, request, arms, manifest_name):
    manifest = request.getfixturevalue(manifest_name)
    db = tmp_path / "design.duckdb"
    study.create_study(manifest, db, ["r1", "r2", "r3"], qc_retest=3, qc_attention=3, seed=11, mode="pairwise")
    comparisons = pairwise_store.list_comparisons(db)
    units = comparisons.loc[comparisons["kind"] == "main", ["prompt", "seed"]].drop_duplicates()
    per_unit = len(arms) * (len(arms) - 1) // 2 if len(arms) <= 4 else len(arms)
    for rater, own in comparisons.groupby("rater"):
        own = own.sort_values("position")
        assert list(own["position"]) == list(range(len(own)))
        main = own[own["kind"] == "main"]
        assert len(main) == len(units) * per_unit
        appearances = Counter(main["left_arm"]) + Counter(main["right_arm"])
        assert set(appearances) == set(arms) and len(set(appearances.values())) == 1, appearances
        for arm in arms:
            assert abs((main["left_arm"] == arm).sum() - (main["right_arm"] == arm).sum()) <= 1, (rater, arm)
        unit = list(zip(own["prompt"], own["seed"]))
        assert all(a != b for a, b in zip(unit, unit[1:])), "two comparisons of one prompt × seed back to back"
        for _, retest in own[own["kind"] == "retest"].iterrows():  # sides swapped, after the main comparison
            first = main[(main["prompt"] == retest["prompt"]) & (main["seed"] == retest["seed"])
                         & (main["left_arm"] == retest["right_arm"]) & (main["right_arm"] == retest["left_arm"])]
            assert len(first) == 1 and first["position"].item() < retest["position"]
        attention = own[own["kind"] == "attention"]
        assert len(attention) == 3
        blank_left = (attention["left_arm"] == BLANK_SIDE).to_numpy()
        assert ((attention["right_arm"] == BLANK_SIDE).to_numpy() != blank_left).all()
        assert 1 <= blank_left.sum() <= 2, "the blank side alternates"
    orders = {rater: list(own["left_arm"] + own["right_arm"]) for rater, own in comparisons.groupby("rater")}
    assert len({tuple(o) for o in orders.values()}) == 3, "each rater has their own order"
    again = tmp_path / "again.duckdb"
    study.create_study(manifest, again, ["r1", "r2", "r3"], qc_retest=3, qc_attention=3, seed=11, mode="pairwise")
    pd.testing.assert_frame_equal(pairwise_store.list_comparisons(again), comparisons)


def test_a_rater_added_later_gets_a_pairwise_plan(pairwise_db):
    db, _ = pairwise_db
    name, token, link = study.add_rater(db, "carol")
    plan = pairwise_store.list_comparisons(db)
    carol, alice = plan[plan["rater"] == "carol"], plan[plan["rater"] == "alice"]
    assert len(carol) == len(alice) and Counter(carol["kind"]) == Counter(alice["kind"])
    with studydb.connect(db) as con:
        assert con.execute("SELECT count(*) FROM assignments").fetchone() == (0,)


def test_balanced_sides_on_random_multigraphs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 9))
        edges = []
        for _ in range(int(rng.integers(1, 60))):
            a, b = rng.choice(n, size=2, replace=False)
            edges.append((int(a), int(b)))
        left = balanced_sides(edges, n, rng)
        balance = np.zeros(n, dtype=int)
        for (a, b), a_left in zip(edges, left):
            balance[a if a_left else b] += 1
            balance[b if a_left else a] -= 1
        assert np.abs(balance).max() <= 1, (edges, balance)


def test_pairwise_needs_two_arms(tmp_path):
    one_arm = sample.write_sample_manifest(tmp_path / "gen", n_prompts=2, arms=("base",), size=32)
    with pytest.raises(FangzhiError, match="at least two arms"):
        study.create_study(one_arm, tmp_path / "x.duckdb", ["a"], mode="pairwise")
    assert not (tmp_path / "x.duckdb").exists()


# ---- the page ---------------------------------------------------------------------------------


@pytest.fixture
def pairwise_app(pairwise_db, monkeypatch):
    db, tokens = pairwise_db
    monkeypatch.setenv(DB_ENV, str(db))
    monkeypatch.delenv("FANGZHI_ADMIN_PASSWORD", raising=False)
    yield db, tokens
    st.cache_resource.clear()


def open_app(token: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["token"] = token
    return at.run()


def choose(at: AppTest, choices: dict[str, str], button: str = "save") -> AppTest:
    position = at.session_state["position"]
    for key, choice in choices.items():
        at.radio(key=f"{position}-{key}").set_value(choice)
    return at.button(key=f"{button}-{position}").click().run()


def test_pairwise_page_save_revise_and_blinding(pairwise_app):
    db, tokens = pairwise_app
    alice = rater_id(db, "alice")
    plan = pairwise_store.list_comparisons(db)
    plan = plan[plan["rater"] == "alice"].set_index("position")
    at = open_app(tokens["alice"])
    assert not at.exception
    assert "评分说明" in "\n".join(str(m.value) for m in [*at.markdown, *at.title])
    at.button(key="start").click().run()
    assert at.session_state["position"] == 0 and at.query_params["item"] == "1"
    # The radios are left / right / tie, labelled in the rater's language; ← → ↓ and 1 2 3 set these same values.
    assert at.radio(key="0-style").options == ["左图更好", "右图更好", "一样"]
    at = choose(at, {"style": "left", "match": "right", "detail": "tie", "beauty": "left"})
    assert at.session_state["position"] == 1
    assert pairwise_store.comparison_view(db, alice, 0).choices == {"style": "left", "match": "right", "detail": "tie", "beauty": "left"}
    # Saving with a question open saves nothing and says so.
    at.radio(key="1-style").set_value("right")
    at.button(key="save-1").click().run()
    assert at.session_state["position"] == 1 and "请回答全部四个问题" in "\n".join(w.value for w in at.warning)
    # Back to the first comparison: the saved choices are shown and can be revised.
    at.button(key="back-1").click().run()
    assert at.session_state["position"] == 0 and at.radio(key="0-style").value == "left"
    at = choose(at, {"style": "right"})
    assert pairwise_store.comparison_view(db, alice, 0).choices["style"] == "right"
    with studydb.connect(db) as con:
        assert con.execute("SELECT count(*) FROM choice_audit WHERE old_choice IS NOT NULL").fetchone() == (1,)
    # The page shows nothing that names an arm, an image id or a file.
    page = "\n".join(str(e.value) for e in [*at.markdown, *at.text, *at.caption, *at.title, *at.warning])
    with studydb.connect(db) as con:
        secrets_ = [a for (a,) in con.execute("SELECT DISTINCT arm FROM images").fetchall()] + [
            Path(p).stem for (p,) in con.execute("SELECT path FROM images").fetchall()
        ]
    assert not [s for s in secrets_ if s in page]
    # An attention item opened from its link shows two images; the sides as the page sends them are
    # re-encoded JPEGs of the study's one padded length, the blank one drawn at the other's size.
    attention = int(plan.index[plan["kind"] == "attention"][0])
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["token"] = tokens["alice"]
    at.query_params["item"] = str(attention + 1)
    at.run()
    served = [h.proto.body for h in at.get("html") if h.proto.body.startswith('<img class="fz-rated"') and f'src="{media_access.ROUTE}/' in h.proto.body]
    assert not at.exception and at.session_state["position"] == attention and len(served) == 2
    with studydb.connect(db) as con:
        paths = [p for (p,) in con.execute("SELECT path FROM images").fetchall()]
    length = max(len(media.encode_for_display(p)) for p in paths)
    parts = pairwise_page.AppParts(media.encode_for_display, lambda max_side: length, None, None, None, None)
    view = pairwise_store.comparison_view(db, alice, attention)
    served = [pairwise_page.side_image(parts, view, side, media.ITEM_MAX_SIDE) for side in pairwise_page.SIDES]
    assert len(served[0]) == len(served[1]) == length
    pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=float) for b in served]
    blank = 0 if plan.loc[attention, "left_arm"] == BLANK_SIDE else 1
    assert pixels[blank].std() < 2 and pixels[1 - blank].std() > 10
    assert pixels[0].shape == pixels[1].shape


# ---- study -> votes -> analysis ----------------------------------------------------------------


def test_cli_pairwise_study_to_analysis(tmp_path, manifest3, capsys):
    db = tmp_path / "study.duckdb"
    raters = tmp_path / "raters.txt"
    raters.write_text("r1\nr2\nr3\nr4\n", encoding="utf-8")
    assert cli_main(["study", "create", "--manifest", str(manifest3), "--db", str(db), "--raters", str(raters), "--mode", "pairwise",
                     "--qc-retest", "2", "--qc-attention", "2", "--seed", "7"]) == 0
    plan = pairwise_store.list_comparisons(db)
    # Simulated raters who prefer lora_b over lora_a over base (Bradley–Terry, on every dimension), answering attention
    # items correctly except r4's first one.
    strength = {"base": 0.0, "lora_a": 1.0, "lora_b": 2.0}
    rng = np.random.default_rng(0)
    rows, failed = [], False
    for c in plan.itertuples():
        if c.kind == "attention":
            right_answer = "right" if c.left_arm == BLANK_SIDE else "left"
            wrong = c.rater == "r4" and not failed
            failed = failed or wrong
            answer = {k: ("tie" if wrong else right_answer) for k in DIMENSION_KEYS}
        else:
            p_left = 1 / (1 + np.exp(strength[c.right_arm] - strength[c.left_arm]))
            answer = {k: "left" if rng.random() < p_left else "right" for k in DIMENSION_KEYS}
        rows.append({"rater": c.rater, "position": c.position, **answer})
    assert pairwise_store.add_votes(db, rows) == len(plan)
    # The votes export in the long format, with kind.
    assert cli_main(["study", "export", "--db", str(db), "--out", str(tmp_path / "votes.csv")]) == 0
    votes = pd.read_csv(tmp_path / "votes.csv")
    assert list(votes.columns[:8]) == ["rater", "prompt", "seed", "dimension", "left", "right", "choice", "kind"]
    assert len(votes) == 4 * len(plan)
    out = tmp_path / "analysis"
    capsys.readouterr()
    assert cli_main(["analyze", "--db", str(db), "--out", str(out), "--bootstrap", "200"]) == 0
    table = pd.read_csv(out / "pairwise_table.csv")
    style = table[table["dimension"] == "style"].set_index("arm")["elo"]
    assert style["base"] == 1000 and style["lora_b"] > style["lora_a"] > style["base"]
    attention = pd.read_csv(out / "pairwise_attention.csv").set_index("rater")
    assert attention["items"].tolist() == [2, 2, 2, 2] and attention.loc["r4", "failures"] == 1 and attention["failures"].sum() == 1
    results = pd.read_json(out / "pairwise_results.json", typ="series")
    assert results["counts"]["attention_failures"] == 1
    assert results["counts"]["n_main_votes"] == 4 * len(plan[plan["kind"] == "main"])
    assert any("1 failed of 8" in note for note in results["notes"])
    # A score-only option on a pairwise study is a clear error.
    capsys.readouterr()
    assert cli_main(["analyze", "--db", str(db), "--out", str(tmp_path / "other"), "--sd-over", "raters"]) == 2
    assert "is a pairwise study; --sd-over apply only to an absolute (1–5) study" in capsys.readouterr().err


def test_admin_page_of_a_pairwise_study_shows_its_progress_attention_votes_and_arms(pairwise_app, monkeypatch):
    db, _ = pairwise_app
    plan = pairwise_store.list_comparisons(db)
    alice = plan[plan["rater"] == "alice"]
    main = alice[alice["kind"] == "main"].head(3)
    attention = alice[alice["kind"] == "attention"].iloc[0]
    blank_side = "left" if attention["left_arm"] == BLANK_SIDE else "right"
    votes = [{"rater": "alice", "position": int(p), **dict.fromkeys(DIMENSION_KEYS, "left")} for p in main["position"]]
    votes.append({"rater": "alice", "position": int(attention["position"]), **dict.fromkeys(DIMENSION_KEYS, blank_side)})  # fails
    pairwise_store.add_votes(db, votes)
    monkeypatch.setenv("FANGZHI_ADMIN_PASSWORD", "correct horse")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["page"] = "admin"
    at.run()
    at.text_input[0].input("correct horse")
    at.button[0].click().run()
    assert not at.exception
    progress = at.dataframe[0].value.set_index("rater")
    assert progress.loc["alice", "done"] == 4 and progress.loc["bob", "done"] == 0
    assert progress.loc["alice", "total"] == len(alice)
    qc = at.dataframe[1].value.set_index("rater")
    assert qc.loc["alice", "attention_answered"] == 1 and qc.loc["alice", "attention_passed"] == 0
    assert qc.loc["bob", "attention_answered"] == 0
    assert {button.label for button in at.get("download_button")} == {"votes.csv", "votes.parquet"}
    assert len(at.dataframe) == 2  # blind: no summary by arm yet
    at.checkbox[0].check()
    next(b for b in at.button if b.label == "Unblind").click().run()
    summary = at.dataframe[2].value
    style = summary[summary["dimension"] == "style"].set_index("arm")
    expected_wins = main["left_arm"].value_counts()
    for arm in ARMS_3:
        shown = int(((main["left_arm"] == arm) | (main["right_arm"] == arm)).sum())
        assert style.loc[arm, "comparisons"] == shown and style.loc[arm, "wins"] == expected_wins.get(arm, 0)
    assert style["ties"].sum() == 0 and BLANK_SIDE not in style.index


def test_pairwise_save_over_another_tabs_save_asks_first(pairwise_app):
    db, tokens = pairwise_app
    alice = rater_id(db, "alice")
    first, second = open_app(tokens["alice"]), open_app(tokens["alice"])
    for tab in (first, second):
        tab.button(key="start").click().run()
    first = choose(first, dict.fromkeys(DIMENSION_KEYS, "left"))
    second = choose(second, dict.fromkeys(DIMENSION_KEYS, "right"))
    # The second tab's save is refused with a message naming the other tab's choices; its own stay on screen.
    assert pairwise_store.comparison_view(db, alice, 0).choices == dict.fromkeys(DIMENSION_KEYS, "left")
    warning = "\n".join(w.value for w in second.warning)
    assert second.session_state["position"] == 0 and "另一个标签页或窗口" in warning and "左图更好" in warning
    assert second.radio(key="0-style").value == "right"
    # Saving again overwrites, knowingly.
    second.button(key="save-0").click().run()
    assert pairwise_store.comparison_view(db, alice, 0).choices == dict.fromkeys(DIMENSION_KEYS, "right")
    assert second.session_state["position"] == 1


def test_pairwise_review_lists_every_comparison_blind_and_opens_any(pairwise_app):
    import base64

    db, tokens = pairwise_app
    total = len(pairwise_store.completed_comparisons(db, rater_id(db, "alice")))
    at = open_app(tokens["alice"])
    at.button(key="start").click().run()
    at = choose(at, {"style": "left", "match": "right", "detail": "tie", "beauty": "left"})
    at.radio(key="1-style").set_value("right")
    at.button(key="overview-1").click().run()
    assert not at.exception and at.session_state["view"] == "review" and at.query_params["view"] == "review"
    table = at.dataframe[0].value
    assert list(table["#"]) == list(range(1, total + 1))
    assert list(table["status"][:2]) == ["已答", "未答"]
    assert [table[key][0] for key in DIMENSION_KEYS] == ["左图更好", "右图更好", "一样", "左图更好"]
    assert all(table[key][1] == "" for key in DIMENSION_KEYS)
    # Thumbnails of both sides, blank sides included, all of one byte length: their size tells nothing.
    thumbnails = [base64.b64decode(cell.split(",", 1)[1]) for side in ("left", "right") for cell in table[side]]
    assert len({len(thumbnail) for thumbnail in thumbnails}) == 1
    at.number_input(key="open-number").set_value(2)
    next(b for b in at.button if b.label == "打开").click().run()
    # Back on comparison 2, with the choice made before leaving it.
    assert at.session_state["view"] == "item" and at.session_state["position"] == 1
    assert at.radio(key="1-style").value == "right"
