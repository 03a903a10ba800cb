"""The blind rating app (a Streamlit script). Start it with `fangzhi rate --db study.duckdb`.

Raters open their invitation link (`/?token=...`) or type their code; the admin opens `/?page=admin`.
The study database's path comes from the environment variable FANGZHI_RATING_DB (never a script
argument: Streamlit sends its command line to the browser).

What reaches the browser about an item: freshly encoded JPEG pixels (named by Streamlit after their
content hash), the prompt's Chinese narrative and English text (the same for both arms), and widget
keys built from the rater's own position numbers. Arms, image ids, file names, seeds and model names
stay on the server.
"""

from __future__ import annotations

import hmac
import io
import os
import sys
import time

import streamlit as st

from fangzhi.dimensions import DIMENSIONS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import i18n, media, store, study
from fangzhi.rating_app.serve import DB_ENV

ADMIN_PASSWORD_ENV = "FANGZHI_ADMIN_PASSWORD"
SCORES = list(range(SCORE_MIN, SCORE_MAX + 1))


# The app's one connection to the study for the server's lifetime (closed at shutdown, or when the cache is cleared).
@st.cache_resource(show_spinner=False, on_release=lambda server: server.close())
def study_server(db: str) -> store.StudyServer:
    return store.StudyServer(db)


@st.cache_data(show_spinner=False, max_entries=512)
def display_bytes(path: str, max_side: int) -> bytes:
    return media.encode_for_display(path, max_side)


def admin_password() -> str | None:
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ[ADMIN_PASSWORD_ENV]
    try:
        return st.secrets.get("admin_password")
    except FileNotFoundError:  # no secrets.toml at all
        return None


def first_unrated(complete: list[bool]) -> int | None:
    return next((position for position, done in enumerate(complete) if not done), None)


def next_position(complete: list[bool], position: int) -> int | None:
    """The first unrated item after `position` (wrapping around); None when everything is rated.

    After revising an earlier item, Save & next thus returns the rater to where they left off.
    """
    order = list(range(position + 1, len(complete))) + list(range(position + 1))
    return next((p for p in order if not complete[p]), None)


# ---- rater pages -----------------------------------------------------------------------------


def login_page(lang: str, bad_token: bool) -> None:
    st.title(i18n.text("title", lang))
    if bad_token:
        st.error(i18n.text("bad_token", lang))
    st.write(i18n.text("login_intro", lang))
    with st.form("login"):
        code = st.text_input(i18n.text("code", lang), type="password")
        if st.form_submit_button(i18n.text("sign_in", lang)) and code.strip():
            # The token lives in the URL, so a reload keeps the rater signed in.
            st.query_params["token"] = code.strip()
            st.rerun()


def instructions_page(complete: list[bool], lang: str) -> None:
    st.title(i18n.text("title", lang))
    st.subheader(i18n.text("instructions_title", lang))
    st.markdown(i18n.text("instructions", lang, dimensions=i18n.dimension_overview(lang)))
    st.progress(sum(complete) / len(complete), text=i18n.text("progress", lang, done=sum(complete), total=len(complete)))
    if st.button(i18n.text("start", lang), type="primary", key="start"):
        st.session_state.started = True
        st.session_state.position = first_unrated(complete)
        st.rerun()


def thank_you_page(lang: str) -> None:
    st.title(i18n.text("thanks_title", lang))
    st.success(i18n.text("thanks", lang))
    if st.button(i18n.text("review", lang), key="review"):
        st.session_state.position = 0
        st.rerun()


def apply_navigation(con, rater_id: int) -> list[bool] | None:
    """Act on the Save & next or Back click that started this run, before the page is drawn.

    Done here rather than in on_click callbacks so that the save and drawing the next item share
    the run's one database connection (opening a DuckDB file costs ~12 ms).
    Returns the rater's completed positions after a save (the page needs them too), else None.
    """
    position = st.session_state.get("position")
    if position is None:
        return None
    shown_at = st.session_state.setdefault("shown_at", {})
    if st.session_state.get("back") and position > 0:
        shown_at.pop(position, None)
        st.session_state.position = position - 1
    elif st.session_state.get("save"):
        answers = {d.key: st.session_state.get(f"{position}-{d.key}") for d in DIMENSIONS}
        if any(score is None for score in answers.values()):
            st.session_state.missing_answers = True
            return None
        seconds = time.monotonic() - shown_at.pop(position, time.monotonic())
        store.save_item(con, rater_id, position, answers, st.session_state.get(f"{position}-comment", ""), seconds)
        complete = store.completed_positions(con, rater_id)
        st.session_state.position = next_position(complete, position)
        return complete
    return None


def item_page(con, rater: store.Rater, complete: list[bool], references: tuple[str, ...], lang: str) -> None:
    position = st.session_state.position
    total = len(complete)
    item = store.item_view(con, rater.rater_id, position)
    st.session_state.setdefault("shown_at", {}).setdefault(position, time.monotonic())

    st.progress(sum(complete) / total, text=i18n.text("progress", lang, done=sum(complete), total=total))
    image_column, side_column = st.columns([3, 2], gap="medium")
    with image_column:
        st.caption(i18n.text("item_counter", lang, k=position + 1, n=total))
        st.image(display_bytes(item.image_path, media.ITEM_MAX_SIDE), output_format="JPEG", width="stretch")
    with side_column:
        st.markdown(f"**{i18n.text('text_zh', lang)}**")
        st.markdown(item.narrative_zh)
        with st.expander(i18n.text("prompt_en", lang)):
            st.markdown(item.prompt_en)
        if references:
            st.markdown(f"**{i18n.text('reference', lang)}**")
            # Sent at their encoded size ("stretch" never makes Streamlit re-encode them on each run).
            reference_columns = st.columns(2)
            for index, path in enumerate(references):
                reference_columns[index % 2].image(display_bytes(path, media.REFERENCE_MAX_SIDE), output_format="JPEG", width="stretch")

    if item.kind == "attention":
        st.info(i18n.text("attention", lang, score=item.expected))
    if st.session_state.pop("missing_answers", False):
        st.warning(i18n.text("answer_all", lang))
    with st.form(f"item-{position}"):
        for dimension in DIMENSIONS:
            previous = item.scores.get(dimension.key)
            st.radio(
                f"**{i18n.dimension_name(dimension.key, lang)}**",
                options=SCORES,
                captions=list(i18n.ANCHORS[dimension.key][lang]),
                index=SCORES.index(previous) if previous else None,
                horizontal=True,
                key=f"{position}-{dimension.key}",
            )
        st.text_area(i18n.text("comment", lang), value=item.comment, max_chars=2000, key=f"{position}-comment")
        back_column, save_column = st.columns(2)
        back_column.form_submit_button(i18n.text("back", lang), disabled=position == 0, key="back")
        save_column.form_submit_button(i18n.text("save_next", lang), type="primary", shortcut="Ctrl+Enter", key="save")
    st.caption(i18n.text("keyboard_hint", lang))


def rater_flow(con, references: tuple[str, ...], lang: str) -> None:
    token = st.query_params.get("token", "")
    rater = store.rater_for_token(con, token) if token else None
    if rater is None:
        # Forget whoever was signed in before: a bad or revoked token shows nothing of theirs.
        for key in ("rater_id", "started", "position", "shown_at"):
            st.session_state.pop(key, None)
        login_page(lang, bad_token=bool(token))
        return
    if st.session_state.get("rater_id") != rater.rater_id:
        for key in ("started", "position", "shown_at"):
            st.session_state.pop(key, None)
        st.session_state.rater_id = rater.rater_id
    st.sidebar.write(i18n.text("signed_in_as", lang, name=rater.name))

    complete = apply_navigation(con, rater.rater_id) if st.session_state.get("started") else None
    if complete is None:
        complete = store.completed_positions(con, rater.rater_id)
    if not st.session_state.get("started"):
        instructions_page(complete, lang)
    elif st.session_state.position is None:
        thank_you_page(lang)
    else:
        item_page(con, rater, complete, references, lang)


# ---- admin page ------------------------------------------------------------------------------


def admin_page(con, unblinded: bool) -> None:
    st.title("Rating study: admin")
    expected = admin_password()
    if not expected:
        st.error(f"The admin page is disabled: set the environment variable {ADMIN_PASSWORD_ENV} or `admin_password` in Streamlit secrets.")
        return
    if not st.session_state.get("admin"):
        with st.form("admin-login"):
            entered = st.text_input("Admin password", type="password")
            if st.form_submit_button("Sign in"):
                if hmac.compare_digest(entered.encode("utf-8"), expected.encode("utf-8")):
                    st.session_state.admin = True
                    st.rerun()
                st.error("Wrong password.")
        return

    st.subheader("Progress")
    st.dataframe(store.rater_progress(con), hide_index=True)
    ratings = store.read_ratings(con)
    st.subheader("Quality control")
    st.dataframe(store.qc_results(ratings), hide_index=True)

    st.subheader("Export")
    parquet = io.BytesIO()
    ratings.to_parquet(parquet, index=False)
    csv_column, parquet_column = st.columns(2)
    csv_column.download_button("ratings.csv", ratings.to_csv(index=False).encode("utf-8"), "ratings.csv", "text/csv")
    parquet_column.download_button("ratings.parquet", parquet.getvalue(), "ratings.parquet", "application/octet-stream")

    st.subheader("Raters")
    with st.form("add-rater", clear_on_submit=True):
        name = st.text_input("New rater's name")
        base_url = st.text_input("Link base URL", value=study.DEFAULT_BASE_URL)
        if st.form_submit_button("Add rater") and name.strip():
            new_name, _token, link = study.add_rater(con, name, base_url)
            st.success(f"Invitation link for {new_name} (shown once, keep it): {link}")
    progress = store.rater_progress(con)
    active = progress.loc[~progress["revoked"], "rater"].tolist()
    with st.form("revoke-rater"):
        victim = st.selectbox("Revoke access of", active, index=None)
        if st.form_submit_button("Revoke") and victim:
            store.revoke_rater(con, victim)
            st.rerun()

    st.subheader("Summary by arm")
    if unblinded:
        st.dataframe(store.arm_summary(ratings))
        return
    st.write("Hidden until you unblind the study. Unblinding is recorded and cannot be undone.")
    with st.form("unblind"):
        sure = st.checkbox("I want to unblind this study")
        if st.form_submit_button("Unblind") and sure:
            store.set_unblinded(con)
            st.rerun()


# ---- the script ------------------------------------------------------------------------------


def main() -> None:
    db = os.environ.get(DB_ENV)
    st.set_page_config(page_title="Rating · 评分", layout="wide")
    if not db:
        st.error(f"No study database: start the app with `fangzhi rate --db study.duckdb` (or set {DB_ENV}).")
        return
    try:
        server = study_server(db)
    except FangzhiError as exc:  # e.g. another program holds the file; the next page load tries again
        print(f"fangzhi rate: {exc}", file=sys.stderr, flush=True)  # the details (server paths) stay in the server's log
        st.error("The rating study cannot be opened right now; please try again in a minute. · 评分系统暂时无法打开，请稍后再试。")
        return
    with server.cursor() as con:
        settings = store.study_settings(con)
        lang = st.sidebar.radio(
            i18n.text("language", settings.default_lang),
            options=list(i18n.LANGUAGES),
            format_func=i18n.LANGUAGE_NAMES.get,
            index=i18n.LANGUAGES.index(settings.default_lang),
            horizontal=True,
            key="lang",
        )
        if st.query_params.get("page") == "admin":
            admin_page(con, settings.unblinded)
        else:
            rater_flow(con, settings.reference_paths, lang)


main()
