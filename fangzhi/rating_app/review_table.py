"""The list of a rater's items (or comparisons) that both rating pages show, and the row the rater picks from it."""

from __future__ import annotations

import streamlit as st


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
