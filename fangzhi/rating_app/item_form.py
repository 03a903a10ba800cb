"""What both rating pages (one image, or two side by side) draw and read alike: the reference strip, the end of an
item's form (comment, Back / All / Save & next, the keyboard hint), the prompt's two texts, which of its buttons started
a run, and the list of all items."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from fangzhi.dimensions import DIMENSIONS
from fangzhi.rating_app import i18n, media

BUTTONS = ("save", "back", "overview")


@dataclass(frozen=True)
class Submitted:
    """The form of the item at `position` as the click sent it."""

    clicked: str  # one of BUTTONS
    position: int
    answers: dict[str, Any]  # per dimension; None where unanswered
    comment: str


def submitted() -> Submitted | None:
    """The item form's button that started this run, with the form's answers; None when no such click did.

    The buttons are keyed by the item's position, so a second click on one item's Save that arrives
    after the first has moved on (a double click) finds no button of the item now shown.
    """
    position = st.session_state.get("position")
    if st.session_state.get("view") != "item" or position is None:
        return None
    clicked = next((name for name in BUTTONS if st.session_state.get(f"{name}-{position}")), None)
    if clicked is None:
        return None
    answers = {d.key: st.session_state.get(f"{position}-{d.key}") for d in DIMENSIONS}
    return Submitted(clicked, position, answers, st.session_state.get(f"{position}-comment", ""))


def keep_draft(form: Submitted) -> None:
    """Leaving an item without saving keeps its choices for when the rater comes back."""
    st.session_state.setdefault("drafts", {})[form.position] = (form.answers, form.comment)
    st.session_state.get("shown_at", {}).pop(form.position, None)


def reference_keys(references: tuple[str, ...]) -> set[tuple]:
    """The media keys under which `reference_strip` issues the paintings' addresses."""
    return {("reference", path) for path in references}


def reference_strip(
    references: tuple[str, ...],
    media_url: Callable[[tuple, Callable[[], bytes]], str],
    display_bytes: Callable[[str, int], bytes],
    caption: str,
    lang: str,
) -> None:
    """The reference paintings as thumbnails (sent at zoom size); a click or Z opens the app's zoom view, which shows
    the chosen one beside every image on the page marked `fz-rated` (captioned by its `data-label`)."""
    with st.container(key="references"):
        buttons = "".join(
            f'<button type="button" class="fz-reference" aria-label="{html.escape(i18n.text("zoom_reference", lang, k=k, n=len(references)))}">'
            f'<img src="{media_url(("reference", path), lambda path=path: display_bytes(path, media.REFERENCE_MAX_SIDE))}" alt=""></button>'
            for k, path in enumerate(references, start=1)
        )
        labels = {"rated": i18n.text("zoom_rated", lang), "reference": i18n.text("zoom_reference", lang, k="{k}", n="{n}"), "close": i18n.text("zoom_close", lang)}
        st.html(
            f'<div class="fz-references" data-rated-label="{html.escape(labels["rated"])}" '
            f'data-reference-label="{html.escape(labels["reference"])}" data-close-label="{html.escape(labels["close"])}">{buttons}</div>'
        )
    st.caption(caption)
    with st.container(key="reference-keys"):
        st.caption(i18n.text("reference_keys", lang))


def form(position: int):
    """The item's form. Enter in its comment field saves (the app's page script): Streamlit's own Enter-to-submit
    would press the form's first button, Back, and tell the rater so in English."""
    return st.form(f"item-{position}", border=False, enter_to_submit=False)


def form_end(position: int, comment: str, overview_label: str, lang: str) -> None:
    """The comment field and the Back / All / Save & next buttons, inside the item's form."""
    st.text_input(i18n.text("comment", lang), value=comment, max_chars=2000, key=f"{position}-comment")
    with st.container(horizontal=True, gap="small"):
        st.form_submit_button(i18n.text("back", lang), key=f"back-{position}")
        st.form_submit_button(overview_label, key=f"overview-{position}")
        st.form_submit_button(i18n.text("save_next", lang), type="primary", shortcut="Enter", key=f"save-{position}")


def prompt_texts(narrative_zh: str, prompt_en: str, lang: str) -> None:
    """The prompt's Chinese narrative, and its English text folded away; literal text, never Markdown or HTML.

    Each sits in a container the page script marks with its language (`lang-zh`, `lang-en`), so that the Chinese
    gets Chinese glyphs on an English page too (browsers otherwise often pick a Japanese font's), and a screen
    reader reads each in its own language.
    """
    with st.container(key="item-text"):
        with st.container(key="lang-zh"):
            st.text(narrative_zh)
        with st.expander(i18n.text("prompt_en", lang)), st.container(key="lang-en"):
            st.text(prompt_en)


def keyboard_hint(text: str) -> None:
    with st.container(key="keyboard-hint"):
        st.caption(text)


def picked_row(table: dict[str, list], columns: dict, open_label: str, open_button: str) -> int | None:
    """Draw `table` (one row per item, thumbnails included) and an open-by-number form; returns the index of the
    row the rater picked in the table or by number, or None."""
    rows = len(table["#"])
    selection = st.dataframe(
        table, column_config=columns, hide_index=True, row_height=64, height=min(560, 40 + 65 * rows),
        on_select="rerun", selection_mode="single-row", key="review-table",
    )
    chosen = selection.selection.rows if selection else []
    with st.form("open-item", border=False):
        number = st.number_input(open_label, min_value=1, max_value=rows, step=1, value=None, key="open-number")
        if st.form_submit_button(open_button, type="primary") and number:
            chosen = [int(number) - 1]
    if not chosen:
        return None
    st.session_state.pop("review-table", None)  # the next visit starts with no row picked
    return chosen[0]
