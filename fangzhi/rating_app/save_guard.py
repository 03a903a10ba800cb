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


def save_page_answers(con, tables: store.AnswerTables, rater_id: int, position: int, answers: dict[str, Any], comment: str,
                      save: Callable[[float], None], saved_answers: Callable[[], dict[str, Any]]) -> bool:
    """On the page's Save: run `save(seconds spent on the item)` and return True, unless a question is unanswered or
    another tab saved the item since this page drew it. Then nothing is saved, the page's `notice` says which
    (`answer_all`, or `conflict` with `minutes` since the other save and `answers`, what it saved), and after a
    conflict the page's answers are kept as its draft, for a knowing second Save."""
    if any(answer is None for answer in answers.values()):
        st.session_state.notice = ("answer_all", {})
        return False
    drafts = st.session_state.setdefault("drafts", {})
    with rater_locks()[rater_id]:
        versions = st.session_state.setdefault("loaded_versions", {})
        current = store.item_version(con, rater_id, position, tables)
        if versions.get(position) not in (None, current):
            versions[position] = current
            drafts[position] = (answers, comment)
            ago = (datetime.now(timezone.utc) - current.changed_at).total_seconds()
            st.session_state.notice = ("conflict", {"minutes": max(0, round(ago / 60)), "answers": saved_answers()})
            return False
        seconds = time.monotonic() - st.session_state.setdefault("shown_at", {}).pop(position, time.monotonic())
        save(seconds)
        versions.pop(position, None)
    drafts.pop(position, None)
    return True
