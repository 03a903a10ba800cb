"""The rater's pages of a pairwise (side-by-side) study; the app script (`app.py`) calls `rater_flow` for such a study.

One comparison fits one screen: the two images side by side at equal size (stacked, left first, on a
phone), the text shown literally, the reference strip (a click or Z shows a painting full size beside
both sides, ← → switch paintings, Esc returns), and for each of the four questions left /
right / equal. The keyboard: 1 2 3 (the app's page script, which answers the highlighted question and
moves on) and ← → ↓ (mapped onto 1 2 3 here), Enter saves.

Blinding is that of the absolute page: each side is re-encoded and padded to the study's one length
with filler from the session's key (`media`), widget keys are the rater's own position numbers, and
the sides' arms and paths never leave the server. The blank image of an attention item is drawn here,
at the size of the image beside it, and padded like any other.
"""

from __future__ import annotations

import base64
import html
import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st
from PIL import Image

from fangzhi.dimensions import DIMENSIONS
from fangzhi.rating_app import i18n, item_form, media, pairwise_store, save_guard, store
from fangzhi.rating_app.pairwise_store import CHOICE_TABLES, CHOICES

BLANK_GREY = (128, 128, 128)
SIDES = ("left", "right")
# What this page remembers about the signed-in rater in their session.
RATER_STATE = ("rater_id", "view", "position", "shown_at", "drafts", "loaded_versions", "notice")

PAIR_CSS = """
<style>
.st-key-pair-left img, .st-key-pair-right img { max-height: calc(100vh - 35.5rem); width: 100%; object-fit: contain; }
.st-key-questions [data-testid="stRadio"] [role="radiogroup"] { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
@media (max-width: 640px) { .st-key-pair-left img, .st-key-pair-right img { max-height: 42vh; } }
</style>
"""

# ← → ↓ answer like 1 2 3: handed on to the app's page script as those keys (this listener, on the
# window, runs before the page script's on the document).
PAIR_KEYS_SCRIPT = r"""
<script>
(() => {
  if (window.fangzhiPairKeys) return;
  window.fangzhiPairKeys = true;
  const digit = {ArrowLeft: '1', ArrowRight: '2', ArrowDown: '3'};
  window.addEventListener('keydown', (e) => {
    const t = e.target;
    // In the zoom view ← → switch paintings (the page script's own keys).
    if (!document.querySelector('.fz-pair') || document.querySelector('.fz-zoom') || !(e.key in digit) || e.ctrlKey || e.metaKey || e.altKey) return;
    if (t && (t.tagName === 'TEXTAREA' || t.isContentEditable || (t.tagName === 'INPUT' && t.type !== 'radio'))) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    document.dispatchEvent(new KeyboardEvent('keydown', {key: digit[e.key], bubbles: true}));
  }, true);
})();
</script>
"""


@dataclass(frozen=True)
class AppParts:
    """What this page uses of the app script (which cannot be imported: it runs its page on import)."""

    display_bytes: Callable[[str, int], bytes]  # cached re-encoding of an image file
    padded_length: Callable[[int], int]  # the study's one byte length at a given size
    go_to: Callable[..., None]  # show a view; the URL follows
    next_position: Callable[[list[bool], int], int | None]  # the first open item after a position, wrapping
    media_url: Callable[[tuple, Callable[[], bytes]], str]  # this session's ticket address of an image
    release_media: Callable[[set[tuple]], None]  # revoke the session's tickets except these


@st.cache_data(show_spinner=False, max_entries=64)
def blank_jpeg(size: tuple[int, int], max_side: int) -> bytes:
    """A uniform grey image, encoded exactly as the rated images are."""
    buffer = io.BytesIO()
    Image.new("RGB", size, BLANK_GREY).save(buffer, format="PNG")
    buffer.seek(0)
    return media.encode_for_display(buffer, max_side)


def side_image(parts: AppParts, comparison: pairwise_store.ComparisonView, side: str, max_side: int) -> bytes:
    """One side's pixels as this session receives them: padded to the study's length with session-keyed filler."""
    path = comparison.left_path if side == "left" else comparison.right_path
    if path is None:
        other = comparison.right_path if side == "left" else comparison.left_path
        with Image.open(other) as beside:
            jpeg = blank_jpeg(beside.size, max_side)
    else:
        jpeg = parts.display_bytes(path, max_side)
    key = st.session_state.setdefault("media_key", secrets.token_bytes(16))
    return media.pad(jpeg, parts.padded_length(max_side), key + f"{max_side}/{comparison.position}/{side}".encode())


def instructions_page(parts: AppParts, complete: list[bool], lang: str) -> None:
    st.title(i18n.text("instructions_title", lang))
    names = "\n".join(f"- **{i18n.dimension_name(d.key, lang)}**" for d in DIMENSIONS)
    st.markdown(i18n.text("pair_instructions", lang, dimensions=names))
    st.text(i18n.text("pair_progress", lang, done=sum(complete), total=len(complete)))
    if st.button(i18n.text("start", lang), type="primary", key="start"):
        parts.go_to("item", next((p for p, done in enumerate(complete) if not done), 0))
        st.rerun()


def review_page(con, parts: AppParts, rater: store.Rater, complete: list[bool], lang: str, finished: bool = False) -> None:
    """Every comparison with its two sides as thumbnails, whether it is answered and the choices; any can be opened."""
    if finished:
        st.title(i18n.text("thanks_title", lang))
        st.success(i18n.text("pair_thanks", lang))
    st.subheader(i18n.text("pair_review_title", lang))
    st.text(i18n.text("pair_progress", lang, done=sum(complete), total=len(complete)))
    first_open = next((position for position, done in enumerate(complete) if not done), None)
    if first_open is not None and st.button(i18n.text("continue", lang), type="primary", key="continue"):
        parts.go_to("item", first_open)
        st.rerun()
    views = [pairwise_store.comparison_view(con, rater.rater_id, position) for position in range(len(complete))]
    labels = {choice: i18n.text(f"pair_choice_{choice}", lang) for choice in CHOICES}

    def thumbnail(view: pairwise_store.ComparisonView, side: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(side_image(parts, view, side, media.THUMBNAIL_MAX_SIDE)).decode("ascii")

    table = {
        "#": [view.position + 1 for view in views],
        **{side: [thumbnail(view, side) for view in views] for side in SIDES},
        "status": [i18n.text("pair_status_done" if done else "pair_status_open", lang) for done in complete],
        **{d.key: [labels.get(view.choices.get(d.key), "") for view in views] for d in DIMENSIONS},
    }
    columns = {
        "#": st.column_config.NumberColumn("#", width="small"),
        **{side: st.column_config.ImageColumn(i18n.text(f"pair_{side}", lang), width="small") for side in SIDES},
        "status": st.column_config.TextColumn(i18n.text("column_status", lang), width="small"),
        **{d.key: st.column_config.TextColumn(i18n.dimension_name(d.key, lang)) for d in DIMENSIONS},
    }
    chosen = item_form.picked_row(table, columns, i18n.text("pair_open", lang), i18n.text("open", lang))
    if chosen is not None:
        parts.go_to("item", chosen)
        st.rerun()


def apply_navigation(con, parts: AppParts, rater_id: int) -> str | None:
    """Act on the Save, Back or All-comparisons click that started this run (before the page is drawn); returns which was clicked."""
    form = item_form.submitted()
    if form is None:
        return None
    position = form.position
    if form.clicked != "save":
        item_form.keep_draft(form)
        if form.clicked == "overview":
            parts.go_to("review")
        elif position == 0:
            parts.go_to("start")
        else:
            parts.go_to("item", position - 1)
        return form.clicked
    saved = save_guard.save_page_answers(
        con, CHOICE_TABLES, rater_id, position, form.answers, form.comment,
        lambda seconds: pairwise_store.save_choices(con, rater_id, position, form.answers, form.comment, seconds),
        lambda: pairwise_store.comparison_view(con, rater_id, position).choices,
    )
    if not saved:
        return form.clicked
    following = parts.next_position(pairwise_store.completed_comparisons(con, rater_id), position)
    if following is None:
        parts.go_to("done")
    else:
        parts.go_to("item", following)
    return form.clicked


def comparison_page(con, parts: AppParts, rater: store.Rater, complete: list[bool], references: tuple[str, ...], lang: str) -> None:
    position = st.session_state.position
    comparison = pairwise_store.comparison_view(con, rater.rater_id, position)
    st.session_state.setdefault("shown_at", {}).setdefault(position, time.monotonic())
    save_guard.remember_version(con, CHOICE_TABLES, rater.rater_id, position)
    draft, draft_comment = st.session_state.get("drafts", {}).get(position, ({}, None))
    saved_signature = ",".join(comparison.choices.get(d.key, "") for d in DIMENSIONS)
    st.html(PAIR_CSS)
    st.html(PAIR_KEYS_SCRIPT, unsafe_allow_javascript=True)
    # The app's page script finds the item, its questions and its Save button by these.
    st.html(
        f'<div class="fz-item fz-pair" data-rater="{rater.rater_id}" data-item="{position}" data-first="{DIMENSIONS[0].key}" '
        f'data-saved="{saved_signature}" data-restored="{html.escape(i18n.text("draft_restored", lang))}"></div>'
    )
    st.text(i18n.text("pair_counter", lang, k=position + 1, n=len(complete)) + " · " + i18n.text("pair_progress", lang, done=sum(complete), total=len(complete)))
    item_form.prompt_texts(comparison.narrative_zh, comparison.prompt_en, lang)
    columns = st.columns(2, gap="medium")
    for side, column in zip(SIDES, columns):
        with column, st.container(key=f"pair-{side}"):
            st.caption(i18n.text(f"pair_{side}", lang))
            url = parts.media_url(("pair", position, side), lambda side=side: side_image(parts, comparison, side, media.ITEM_MAX_SIDE))
            st.html(f'<img class="fz-rated" data-label="{html.escape(i18n.text(f"pair_{side}", lang))}" src="{url}" alt="">')
    shown = {("pair", position, side) for side in SIDES} | item_form.reference_keys(references)
    if references:
        item_form.reference_strip(references, parts.media_url, parts.display_bytes, i18n.text("pair_reference", lang), lang)
    parts.release_media(shown)
    labels = {choice: i18n.text(f"pair_choice_{choice}", lang) for choice in CHOICES}
    notice, fields = st.session_state.pop("notice", (None, {}))
    if notice == "answer_all":
        st.warning(i18n.text("answer_all", lang))
    elif notice == "conflict":
        saved = fields["answers"]
        choices = ", ".join(f"{i18n.dimension_name(d.key, lang)} {labels[saved[d.key]]}" for d in DIMENSIONS if d.key in saved)
        st.warning(i18n.text("pair_conflict", lang, minutes=fields["minutes"], choices=choices or "—"))
    with item_form.form(position), st.container(key="questions"):
        # The four questions in a row below the images (stacked on a phone), so that one comparison fits one screen.
        for dimension, column in zip(DIMENSIONS, st.columns(len(DIMENSIONS), gap="small")):
            previous = draft.get(dimension.key) or comparison.choices.get(dimension.key)
            column.radio(
                f"**{i18n.dimension_name(dimension.key, lang)}**", options=list(CHOICES), format_func=labels.get,
                index=CHOICES.index(previous) if previous else None, horizontal=True, key=f"{position}-{dimension.key}",
            )
        comment = draft_comment if draft_comment is not None else comparison.comment
        item_form.form_end(position, comment, i18n.text("pair_overview", lang), lang)
    item_form.keyboard_hint(i18n.text("pair_keyboard_hint", lang))


def rater_flow(con, parts: AppParts, rater: store.Rater, references: tuple[str, ...], lang: str) -> None:
    """The signed-in rater's pages: instructions, one comparison at a time, and the thank-you page."""
    if st.session_state.get("rater_id") != rater.rater_id:
        parts.release_media(set())
        for key in RATER_STATE:
            st.session_state.pop(key, None)
        st.session_state.rater_id = rater.rater_id
    complete = pairwise_store.completed_comparisons(con, rater.rater_id)
    # As on the absolute page: a session's first run knows its widgets' values only once they are
    # drawn, so it acts on a click after drawing the page, then reruns.
    fresh = "view" not in st.session_state
    if fresh:
        item = st.query_params.get("item", "")
        if item.isdigit() and 1 <= int(item) <= len(complete):
            parts.go_to("item", int(item) - 1)
        else:
            view = st.query_params.get("view")
            parts.go_to(view if view in ("done", "review") else "start")
    elif apply_navigation(con, parts, rater.rater_id) == "save":
        complete = pairwise_store.completed_comparisons(con, rater.rater_id)
    view = st.session_state.view
    if view != "item":
        parts.release_media(set())
    if view == "start":
        instructions_page(parts, complete, lang)
    elif view in ("done", "review"):
        review_page(con, parts, rater, complete, lang, finished=view == "done")
    else:
        comparison_page(con, parts, rater, complete, references, lang)
        if fresh and apply_navigation(con, parts, rater.rater_id):
            st.rerun()
