"""Saves that never overwrite another tab's save unawares: one rule for the absolute and the pairwise pages.

A page remembers the version of the item's answers (their audit count and time) when it first draws
the item. A Save checks it under the rater's lock: if another tab or window has saved the item since,
nothing is saved, the page keeps its own choices and says what the other save holds, and a second
Save overwrites knowingly.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import streamlit as st

from fangzhi.rating_app import store


@st.cache_resource
def rater_locks() -> defaultdict[int, threading.Lock]:
    """One lock per rater, so a conflict check and the save it guards run as one step across tabs."""
    return defaultdict(threading.Lock)


def remember_version(con, tables: store.AnswerTables, rater_id: int, position: int) -> None:
    """Call when the page draws an item: the version a later Save of this page is checked against."""
    st.session_state.setdefault("loaded_versions", {}).setdefault(position, store.item_version(con, rater_id, position, tables))


def save_unless_changed(con, tables: store.AnswerTables, rater_id: int, position: int, save: Callable[[float], None],
                        saved_answers: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run `save(seconds on the item)` unless another tab saved the item since this page drew it.

    Returns None after saving, or the conflict for the page's message: `minutes` since the other save and
    `answers`, what it saved.
    """
    with rater_locks()[rater_id]:
        versions = st.session_state.setdefault("loaded_versions", {})
        current = store.item_version(con, rater_id, position, tables)
        if versions.get(position) not in (None, current):
            versions[position] = current
            ago = (datetime.now(timezone.utc) - current.changed_at).total_seconds()
            return {"minutes": max(0, round(ago / 60)), "answers": saved_answers()}
        seconds = time.monotonic() - st.session_state.setdefault("shown_at", {}).pop(position, time.monotonic())
        save(seconds)
        versions.pop(position, None)
    return None
