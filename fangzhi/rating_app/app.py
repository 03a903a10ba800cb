"""The blind rating app (a Streamlit script). Start it with `fangzhi rate --db study.duckdb`.

Raters open their invitation link (`/?token=...`) or type their code; the admin opens `/?page=admin`.
The study database's path comes from the environment variable FANGZHI_RATING_DB (never a script
argument: Streamlit sends its command line to the browser).

What reaches the browser about an item: freshly encoded JPEG pixels padded to one length for the
whole study (at a random per-session address only that browser can fetch: media_access.py), the prompt's
Chinese narrative and English text (the same for both arms, shown as literal text), and widget keys
built from the rater's own position numbers. Arms, image ids, file names, seeds and model names
stay on the server.

One item fits one screen: the image on the left as tall as the window allows, the text and the four
questions on the right; on a phone they stack, image first. A small script in the page gives the
keyboard (digits score the highlighted question, Enter saves), brings each new item to the top,
keeps unsaved choices in the browser across a server restart, and says in the rater's language
when the connection is lost.
"""

from __future__ import annotations

import base64
import hmac
import html
import io
import os
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable

import streamlit as st
from streamlit.web.server.starlette.starlette_server_config import XSRF_COOKIE_NAME

from fangzhi.dimensions import DIMENSIONS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import i18n, media, media_access, pairwise_page, pairwise_store, item_form, save_guard, store, study
from fangzhi.rating_app.serve import BASE_URL_ENV, DB_ENV, LINKS_ENV

ADMIN_PASSWORD_ENV = "FANGZHI_ADMIN_PASSWORD"
SCORES = list(range(SCORE_MIN, SCORE_MAX + 1))
# Wrong admin passwords: after ADMIN_FREE_TRIES, each further one locks the page for twice as long.
ADMIN_FREE_TRIES = 3
ADMIN_MAX_LOCK_SECONDS = 600
# What the app remembers about the signed-in rater in their session.
RATER_STATE = ("rater_id", "view", "position", "shown_at", "drafts", "loaded_versions", "notice")

PAGE_CSS = """
<style>
/* One item, one screen: little chrome, no Streamlit header (its status texts are English only). */
header[data-testid="stHeader"] { display: none; }
/* Streamlit's input hints ("Press Enter to submit form") are English only; the item form's comment keeps its counter. */
[data-testid="InputInstructions"]:not(.st-key-questions [data-testid="InputInstructions"]) { display: none; }
[data-testid="stMainBlockContainer"] { padding: 0.6rem 1.5rem 1rem; max-width: 100%; }
[data-testid="stMainBlockContainer"] [data-testid="stVerticalBlock"] { gap: 0.45rem; }
.st-key-item-image img { max-height: calc(100vh - 13rem); width: 100%; object-fit: contain; }
.fz-references { display: flex; gap: 0.4rem; overflow-x: auto; }
.fz-reference { flex: 0 0 auto; padding: 0; border: 2px solid transparent; border-radius: 0.3rem; background: none; cursor: zoom-in; }
.fz-reference:focus-visible, .fz-reference:hover { border-color: #d9622b; }
.fz-reference img { display: block; height: 4.6rem; width: auto; }
/* The zoom view: the chosen reference painting beside the rated image, both as large as the window allows. */
.fz-zoom { position: fixed; inset: 0; z-index: 1000200; display: flex; gap: 1rem; box-sizing: border-box;
           padding: 2.8rem 1rem 1rem; background: rgba(18, 18, 18, 0.96); }
.fz-zoom figure { flex: 1 1 0; min-width: 0; min-height: 0; margin: 0; display: flex; flex-direction: column; }
.fz-zoom img { flex: 1 1 0; min-height: 0; width: 100%; object-fit: contain; }
.fz-zoom figcaption { color: #eee; font-size: 0.9rem; text-align: center; padding-top: 0.3rem; }
.fz-zoom-close { position: absolute; top: 0.5rem; right: 1rem; padding: 0.3rem 0.8rem; border: 1px solid #999;
                 border-radius: 0.3rem; background: #333; color: #fff; font-size: 0.9rem; cursor: pointer; }
@media (max-aspect-ratio: 1/1) { .fz-zoom { flex-direction: column; gap: 0.5rem; padding: 2.8rem 0.4rem 0.4rem; } }
.st-key-questions [data-testid="stRadio"] { padding: 0.15rem 0.4rem; border-radius: 0.4rem; }
.st-key-questions [data-testid="stRadio"] [data-testid="stCaptionContainer"] { font-size: 0.72rem; line-height: 1.15; }
/* Five equal columns, so every anchor gets the same width in either language. */
.st-key-questions [data-testid="stRadio"] [role="radiogroup"] { display: grid !important; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 0.2rem 0.7rem; align-items: start; }
.st-key-questions [data-testid="stRadio"].fz-current { outline: 3px solid #d9622b; outline-offset: 1px; background: #fff4ee; }
.fz-banner { position: fixed; top: 0; left: 0; right: 0; z-index: 1000100; padding: 0.8rem 1.2rem;
             background: #8a1c1c; color: #fff; font-size: 1rem; text-align: center; }
/* Streamlit's own connection dialog is English only; the page script shows the rater's language instead. */
div[role="dialog"]:has(.stConnectionErrorDialog), [data-testid="stConnectionErrorDialog"] { display: none !important; }
@media (max-width: 640px) {
  .st-key-keyboard-hint, .st-key-reference-keys { display: none; }  /* no keyboard on a phone */
  [data-testid="stMainBlockContainer"] { padding: 0.4rem 0.6rem 1rem; }
  .st-key-item-image img { max-height: 62vh; }
  .fz-reference img { height: 2.3rem; }
  .fz-references { gap: 0.2rem; }
  .st-key-questions [data-testid="stRadio"] [data-testid="stCaptionContainer"] { font-size: 0.62rem; }
  .st-key-questions [data-testid="stRadio"] [role="radiogroup"] { gap: 0.1rem 0.3rem; }
}
</style>
"""

# The page script: plain DOM code, installed once per browser tab (Streamlit keeps the element).
PAGE_SCRIPT = r"""
<script>
(() => {
  if (window.fangzhiPage) return;
  window.fangzhiPage = true;
  let current = 0, shownItem = null, restoredFor = null, failures = 0, lastAnswers = null;
  // Digits and Enter typed while the page is between items (a Save on its way, or the item's questions not
  // drawn yet) wait here, in order, and go to the item that appears: never to the item just saved. They are
  // dropped when, SAVE_WAIT_MS after the first of them, the server has finished its run and the item is still
  // there (the Save was refused), or after PENDING_MAX_MS whatever happens (a busy server, still drawing).
  let pending = [], pendingAt = 0, pendingAfter = null, lastSave = {at: 0, item: null};
  const SAVE_WAIT_MS = 1000, PENDING_MAX_MS = 10000;
  // Whether the server has finished its run: while it runs, an item can be drawn in part (some of its questions).
  // Without the attribute (another Streamlit), as if it had.
  const serverIdle = () => (document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState ?? 'notRunning') === 'notRunning';
  const marker = () => document.querySelector('.fz-item');
  const questions = () => [...document.querySelectorAll('.st-key-questions [data-testid="stRadio"]')];
  const choices = (q) => [...q.querySelectorAll('input[type="radio"]')];
  const draftKey = (m) => `fangzhi-draft-${m.dataset.rater}-${m.dataset.item}`;
  const answers = () => questions().map((q) => choices(q).findIndex((c) => c.checked));
  const choose = (q, index) => choices(q)[index].closest('label').click();
  function highlight() {
    questions().forEach((q, i) => q.classList.toggle('fz-current', i === current));
  }
  function rememberDraft() {
    const m = marker();
    if (m) localStorage.setItem(draftKey(m), JSON.stringify({saved: m.dataset.saved, answers: answers()}));
  }
  function restoreDraft(m) {
    // Choices made before a server restart or reload: put back unless the item was saved since.
    const draft = JSON.parse(localStorage.getItem(draftKey(m)) || 'null');
    if (!draft) return;
    if (draft.saved !== m.dataset.saved) { localStorage.removeItem(draftKey(m)); return; }
    if (answers().some((a) => a >= 0) || !draft.answers.some((a) => a >= 0)) return;
    questions().forEach((q, i) => { if (draft.answers[i] >= 0) choose(q, draft.answers[i]); });
    const open = draft.answers.findIndex((a) => a < 0);
    current = open < 0 ? 0 : open;
    const note = document.createElement('div');
    note.className = 'fz-restored';
    note.textContent = m.dataset.restored;
    note.style.cssText = 'color:#8a4b00;font-size:0.9rem;margin:0.2rem 0';
    // Above the questions as a whole (on the pairwise page they stand in columns).
    document.querySelector('.st-key-questions')?.before(note);
  }
  // The page in the rater's language: Streamlit's page says lang="en" and has an English skip link whatever it shows.
  function localize() {
    const page = document.querySelector('.fz-page');
    if (!page) return;
    const root = document.documentElement;
    if (root.lang !== page.dataset.lang) root.lang = page.dataset.lang;
    const skip = document.querySelector('[data-testid="stSkipToContent"]');
    if (skip && skip.textContent !== page.dataset.skip) skip.textContent = page.dataset.skip;
    document.querySelectorAll('.st-key-lang-zh:not([lang]), .st-key-lang-en:not([lang])').forEach((e) => {
      e.lang = e.classList.contains('st-key-lang-zh') ? 'zh-CN' : 'en';
    });
  }
  setInterval(() => {
    localize();
    const m = marker();
    // Wait until the questions on the page are this item's (their keys start with its position).
    if (m && !document.querySelector(`.st-key-${m.dataset.item}-${m.dataset.first}`)) return;
    const item = m ? `${m.dataset.rater}-${m.dataset.item}` : null;
    if (item !== shownItem) {
      shownItem = item;
      zoomView()?.remove();
      const open = answers().findIndex((a) => a < 0);
      current = open < 0 ? 0 : open;
      // A new item starts at the top of the page, not where the last one was scrolled to.
      window.scrollTo(0, 0);
      document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"]').forEach((e) => e.scrollTo(0, 0));
    }
    if (m && questions().length && restoredFor !== m) { restoredFor = m; restoreDraft(m); }
    // Streamlit's radios change without a DOM change event: compare with the last look instead.
    const now = answers();
    const sameQuestions = lastAnswers && lastAnswers.item === item && lastAnswers.values.length === now.length;
    // (A choice made; a new item's questions replacing the last one's are not one.)
    const chosen = sameQuestions ? now.findIndex((a, i) => a >= 0 && a !== lastAnswers.values[i]) : -1;
    if (m && chosen >= 0) {
      rememberDraft();
      if (chosen === current) current = Math.min(chosen + 1, now.length - 1);
    }
    lastAnswers = {item, values: now};
    const moved = pendingAfter === null || (m && m.dataset.item !== pendingAfter);
    if (pending.length && moved && ready()) {
      if (pending[0] === 'Enter') {
        // A tick after the choices it follows, so that the form sends them.
        pending.shift();
        pendingAfter = m.dataset.item;
        pendingAt = performance.now();
        clickSave();
      } else {
        while (pending.length && pending[0] !== 'Enter' && questions()[current]) {
          choose(questions()[current], Number(pending.shift()) - 1);
          current = Math.min(current + 1, questions().length - 1);
        }
      }
    } else if (pending.length && performance.now() - pendingAt > (serverIdle() ? SAVE_WAIT_MS : PENDING_MAX_MS)) {
      pending = [];
    }
    highlight();
  }, 80);
  const saving = (m) => lastSave.item === m.dataset.item && performance.now() - lastSave.at < SAVE_WAIT_MS;
  const clickSave = () => document.querySelector(`.st-key-save-${marker().dataset.item} button`)?.click();
  // Keeps a key for the item to come when the page is between items, or other keys are waiting already.
  function later(e) {
    if (ready() && !pending.length) return false;
    if (!pending.length) pendingAfter = saving(marker()) ? marker().dataset.item : null;
    pending.push(e.key);
    pendingAt = performance.now();
    e.preventDefault();
    e.stopPropagation();
    return true;
  }
  // Whether digits can score the item on the page now: it is drawn whole and no Save of it is on its way.
  function ready() {
    const m = marker();
    if (!m || shownItem !== `${m.dataset.rater}-${m.dataset.item}` || !document.querySelector(`.st-key-${m.dataset.item}-${m.dataset.first}`)) return false;
    return !saving(m) && serverIdle();
  }
  // The zoom view: a reference painting at full size beside the image or images being rated (stacked on a portrait screen).
  const zoomView = () => document.querySelector('.fz-zoom');
  const referenceButtons = () => [...document.querySelectorAll('.fz-reference')];
  function closeZoom() {
    const view = zoomView();
    if (!view) return;
    view.remove();
    referenceButtons()[Number(view.dataset.index)]?.focus();
  }
  function openZoom(index) {
    const buttons = referenceButtons(), rated = [...document.querySelectorAll('img.fz-rated')];
    const strip = document.querySelector('.fz-references');
    if (!buttons.length || !rated.length || !strip) return;
    index = (index + buttons.length) % buttons.length;
    zoomView()?.remove();
    const view = document.createElement('div');
    view.className = 'fz-zoom';
    view.dataset.index = index;
    view.setAttribute('role', 'dialog');
    view.setAttribute('aria-modal', 'true');
    const figure = (src, caption, name) => {
      const f = document.createElement('figure'), img = document.createElement('img'), c = document.createElement('figcaption');
      f.className = name;
      img.src = src;
      img.alt = caption;
      c.textContent = caption;
      f.append(img, c);
      return f;
    };
    const referenceCaption = strip.dataset.referenceLabel.replace('{k}', index + 1).replace('{n}', buttons.length);
    const close = document.createElement('button');
    close.className = 'fz-zoom-close';
    close.type = 'button';
    close.textContent = strip.dataset.closeLabel;
    close.addEventListener('click', closeZoom);
    view.append(...rated.map((image) => figure(image.src, image.dataset.label || strip.dataset.ratedLabel, 'fz-zoom-rated')),
                figure(buttons[index].querySelector('img').src, referenceCaption, 'fz-zoom-reference'), close);
    view.addEventListener('click', (e) => { if (e.target === view) closeZoom(); });
    document.body.append(view);
    close.focus();
  }
  document.addEventListener('click', (e) => {
    const button = e.target.closest && e.target.closest('.fz-reference');
    if (button) openZoom(referenceButtons().indexOf(button));
  });
  document.addEventListener('keydown', (e) => {
    const view = zoomView();
    if (!view) return;
    // While zoomed, keys look at paintings; none scores or saves behind the view.
    if (e.key === 'Escape') closeZoom();
    else if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') openZoom(Number(view.dataset.index) + (e.key === 'ArrowRight' ? 1 : -1));
    else if (e.key === 'Tab' || (e.key === 'Enter' && e.target.tagName === 'BUTTON')) return;
    e.preventDefault();
    e.stopImmediatePropagation();
  }, true);
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (!marker() || e.ctrlKey || e.metaKey || e.altKey) return;
    // Enter in the comment field saves, as everywhere on the item; but not the Enter that confirms an input
    // method's candidate (pinyin), which arrives while composing.
    if (e.key === 'Enter' && !e.isComposing && e.keyCode !== 229 && t && t.closest && t.closest(`.st-key-${marker().dataset.item}-comment`)) {
      clickSave();
      e.preventDefault();
      e.stopPropagation();
      return;
    }
    if (t && (t.tagName === 'TEXTAREA' || t.isContentEditable || (t.tagName === 'INPUT' && t.type !== 'radio'))) return;
    if (e.key === 'z' || e.key === 'Z') {
      openZoom(0);
      e.preventDefault();
    } else if (e.key >= '1' && e.key <= '5') {
      if (later(e)) return;
      const q = questions()[current];
      if (!q) return;
      choose(q, Number(e.key) - 1);
      current = Math.min(current + 1, questions().length - 1);
      highlight();
      e.preventDefault();
      e.stopPropagation();
    } else if (e.key === 'Enter' && !(t && t.tagName === 'BUTTON')) {
      if (later(e)) return;
      // Also when a choice has focus, where Streamlit's own shortcut does not fire.
      clickSave();
      e.preventDefault();
      e.stopPropagation();
    } else if (e.key === 'ArrowUp' || e.key === 'ArrowDown') {
      if (t && t.type === 'radio') return;  // the browser moves between choices
      current = Math.max(0, Math.min(questions().length - 1, current + (e.key === 'ArrowDown' ? 1 : -1)));
      highlight();
      e.preventDefault();
    }
  }, true);
  // A double click (or Enter pressed twice) saves once: another Save click on the same item
  // within SAVE_PAUSE_MS is dropped. (The server also ignores a Save for an item no longer shown.)
  const SAVE_PAUSE_MS = 700;
  document.addEventListener('click', (e) => {
    const button = e.target.closest && e.target.closest('[class*="st-key-save-"]');
    if (!button) return;
    const item = button.className.match(/st-key-save-(\d+)/)?.[1];
    if (item === lastSave.item && performance.now() - lastSave.at < SAVE_PAUSE_MS) {
      e.preventDefault();
      e.stopImmediatePropagation();
      return;
    }
    lastSave = {at: performance.now(), item};
  }, true);
  // An image being rated whose request failed (its media file replaced during a rerun) is asked for again.
  setInterval(() => document.querySelectorAll('img.fz-rated').forEach((img) => {
    if (!img.complete || img.naturalWidth > 0 || !img.src) return;
    const tries = Number(img.dataset.retries || 0);
    if (tries >= 5) return;
    img.dataset.retries = tries + 1;
    img.src = img.src.split('?')[0] + '?retry=' + (tries + 1);
  }), 500);
  // The connection, in the rater's language (Streamlit's own notice is English only).
  setInterval(async () => {
    let ok = false;
    try { ok = (await fetch('_stcore/health', {cache: 'no-store'})).ok; } catch (err) { ok = false; }
    failures = ok ? 0 : failures + 1;
    let banner = document.querySelector('.fz-banner');
    if (failures >= 2 && !banner) {
      banner = document.createElement('div');
      banner.className = 'fz-banner';
      banner.setAttribute('role', 'alert');
      banner.textContent = document.querySelector('.fz-page')?.dataset.offline || 'Connection lost / 连接已断开';
      document.body.append(banner);
    } else if (ok && banner) {
      banner.remove();
    }
  }, 1500);
})();
</script>
"""


# ---- shared, process-wide resources -----------------------------------------------------------


# The app's one connection to the study for the server's lifetime (closed at shutdown, or when the cache is cleared).
@st.cache_resource(show_spinner=False, on_release=lambda server: server.close())
def study_server(db: str) -> store.StudyServer:
    return store.StudyServer(db)


# A resource, not data: every session's image ticket then holds the one shared (immutable) bytes object, not a copy.
@st.cache_resource(show_spinner=False, max_entries=1024)
def display_bytes(path: str, max_side: int) -> bytes:
    return media.encode_for_display(path, max_side)


@st.cache_resource(show_spinner=False)
def padded_length(_con, db: str, max_side: int) -> int:
    """Every rated image (or thumbnail) of the study is sent at this one length: its largest encoding."""
    return max(len(display_bytes(path, max_side)) for path in store.study_image_paths(_con))


@st.cache_resource
def admin_attempts() -> dict:
    return {"failures": 0, "locked_until": 0.0, "lock": threading.Lock()}


def media_url(key: tuple, body: Callable[[], bytes]) -> str:
    """This session's address of an image: a ticket only this browser can redeem (media_access.py), one per session and image."""
    issued = st.session_state.setdefault("media_tickets", {})
    if key not in issued:
        browser = media_access.browser_key(st.context.cookies.get(XSRF_COOKIE_NAME))
        # Without the cookie (a client that refuses it) the ticket exists but no request can redeem it.
        issued[key] = media_access.TICKETS.issue(browser or b"", body())
    return f"{media_access.ROUTE}/{issued[key]}"


def release_media(keep: set[tuple]) -> None:
    """Revoke this session's tickets for images it no longer shows: their URLs then give nothing, to anyone."""
    issued = st.session_state.get("media_tickets", {})
    media_access.TICKETS.revoke([issued.pop(key) for key in list(issued) if key not in keep])


def rated_image(con, db: str, path: str, position: int, max_side: int) -> bytes:
    """The image as this rater's session receives it: padded to the study's length with session-keyed filler."""
    key = st.session_state.setdefault("media_key", secrets.token_bytes(16))
    return media.pad(display_bytes(path, max_side), padded_length(con, db, max_side), key + f"{max_side}/{position}".encode())


def admin_password() -> str | None:
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ[ADMIN_PASSWORD_ENV]
    try:
        return st.secrets.get("admin_password")
    except FileNotFoundError:  # no secrets.toml at all
        return None


def next_position(complete: list[bool], position: int) -> int | None:
    """The first unrated item after `position` (wrapping around); None when everything is rated.

    After revising an earlier item, Save & next thus returns the rater to where they left off.
    """
    order = list(range(position + 1, len(complete))) + list(range(position + 1))
    return next((p for p in order if not complete[p]), None)


def page_frame(lang: str) -> None:
    st.html(PAGE_CSS)
    st.html(
        f'<div class="fz-page" data-lang="{i18n.HTML_LANG[lang]}" data-skip="{html.escape(i18n.text("skip_to_content", lang))}" '
        f'data-offline="{html.escape(i18n.text("connection_lost", lang))}"></div>'
    )
    st.html(PAGE_SCRIPT, unsafe_allow_javascript=True)



def go_to(view: str, position: int | None = None) -> None:
    """Show `view` ('item', 'review', 'done' or 'start'); the URL follows, so a reload or a server restart lands here again."""
    st.session_state.view = view
    st.session_state.position = position
    if view == "item":
        st.query_params["item"] = str(position + 1)
        st.query_params.pop("view", None)
    else:
        st.query_params.pop("item", None)
        if view in ("review", "done"):
            st.query_params["view"] = view
        else:
            st.query_params.pop("view", None)


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
    if st.button(i18n.text("start", lang), type="primary", key="start", shortcut="Enter"):
        first_open = next_position(complete, len(complete) - 1)
        if first_open is None:
            go_to("review")
        else:
            go_to("item", first_open)
        st.rerun()


def thank_you_page(lang: str) -> None:
    st.title(i18n.text("thanks_title", lang))
    st.success(i18n.text("thanks", lang))
    if st.button(i18n.text("review", lang), key="review"):
        go_to("review")
        st.rerun()


def review_page(con, db: str, rater: store.Rater, lang: str) -> None:
    rows = store.review_rows(con, rater.rater_id)
    done = sum(len(row.scores) == len(DIMENSIONS) for row in rows)
    st.subheader(i18n.text("review_title", lang))
    st.text(i18n.text("progress", lang, done=done, total=len(rows)))
    first_open = next((row.position for row in rows if len(row.scores) < len(DIMENSIONS)), None)
    if first_open is not None and st.button(i18n.text("continue", lang), type="primary", key="continue"):
        go_to("item", first_open)
        st.rerun()

    def thumbnail(row: store.ReviewRow) -> str:
        jpeg = rated_image(con, db, row.image_path, row.position, media.THUMBNAIL_MAX_SIDE)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")

    table = {
        "#": [row.position + 1 for row in rows],
        "image": [thumbnail(row) for row in rows],
        "status": [i18n.text("status_done" if len(row.scores) == len(DIMENSIONS) else "status_open", lang) for row in rows],
        # As text, so that an unrated item's cells stay empty.
        **{d.key: [str(row.scores.get(d.key, "")) for row in rows] for d in DIMENSIONS},
    }
    columns = {
        "#": st.column_config.NumberColumn("#", width="small"),
        "image": st.column_config.ImageColumn(i18n.text("column_image", lang), width="small"),
        "status": st.column_config.TextColumn(i18n.text("column_status", lang), width="small"),
        **{d.key: st.column_config.TextColumn(i18n.dimension_name(d.key, lang)) for d in DIMENSIONS},
    }
    chosen = item_form.picked_row(table, columns, i18n.text("open_item", lang), i18n.text("open", lang))
    if chosen is not None:
        go_to("item", chosen)
        st.rerun()


def apply_navigation(con, rater_id: int, complete: list[bool]) -> str | None:
    """Act on the Save, Back or All-images click that started this run; returns which was clicked.

    Runs before the page is drawn, so that a save and drawing the next item take one run.
    """
    form = item_form.submitted()
    if form is None:
        return None
    position = form.position
    if form.clicked != "save":
        item_form.keep_draft(form)
        if form.clicked == "overview" or position == 0:
            go_to("review")
        else:
            go_to("item", position - 1)
        return form.clicked
    saved = save_guard.save_page_answers(
        con, store.SCORE_TABLES, rater_id, position, form.answers, form.comment,
        lambda seconds: store.save_item(con, rater_id, position, form.answers, form.comment, seconds),
        lambda: store.item_view(con, rater_id, position).scores,
    )
    if not saved:
        return form.clicked
    following = next_position(store.completed_positions(con, rater_id), position)
    if following is not None:
        go_to("item", following)
    else:
        go_to("review" if all(complete) else "done")  # the thank-you page once, when the last item is rated
    return form.clicked


def item_page(con, db: str, rater: store.Rater, complete: list[bool], references: tuple[str, ...], lang: str) -> None:
    position = st.session_state.position
    total = len(complete)
    item = store.item_view(con, rater.rater_id, position)
    st.session_state.setdefault("shown_at", {}).setdefault(position, time.monotonic())
    save_guard.remember_version(con, store.SCORE_TABLES, rater.rater_id, position)
    draft_scores, draft_comment = st.session_state.get("drafts", {}).get(position, ({}, None))
    saved_signature = ",".join(str(item.scores.get(d.key, "")) for d in DIMENSIONS)
    st.html(
        f'<div class="fz-item" data-rater="{rater.rater_id}" data-item="{position}" data-first="{DIMENSIONS[0].key}" data-saved="{saved_signature}" '
        f'data-restored="{html.escape(i18n.text("draft_restored", lang))}"></div>'
    )

    image_column, side_column = st.columns([11, 9], gap="medium")
    with image_column:
        with st.container(key="item-image"):
            url = media_url(("item", position), lambda: rated_image(con, db, item.image_path, position, media.ITEM_MAX_SIDE))
            st.html(f'<img class="fz-rated" src="{url}" alt="">')
        if references:
            item_form.reference_strip(references, media_url, display_bytes, i18n.text("reference", lang), lang)
        release_media({("item", position)} | item_form.reference_keys(references))
    with side_column:
        st.text(i18n.text("item_counter", lang, k=position + 1, n=total) + " · " + i18n.text("progress", lang, done=sum(complete), total=total))
        item_form.prompt_texts(item.narrative_zh, item.prompt_en, lang)
        if item.kind == "attention":
            st.info(i18n.text("attention", lang, score=item.expected))
        notice, fields = st.session_state.pop("notice", (None, {}))
        if notice == "answer_all":
            st.warning(i18n.text("answer_all", lang))
        elif notice == "conflict":
            scores = ", ".join(f"{i18n.dimension_name(d.key, lang)} {fields['answers'][d.key]}" for d in DIMENSIONS if d.key in fields["answers"])
            st.warning(i18n.text("conflict", lang, minutes=fields["minutes"], scores=scores or "—"))
        with item_form.form(position), st.container(key="questions"):
            for dimension in DIMENSIONS:
                previous = draft_scores.get(dimension.key) or item.scores.get(dimension.key)
                st.radio(
                    f"**{i18n.dimension_name(dimension.key, lang)}**",
                    options=SCORES,
                    captions=list(i18n.ANCHORS[dimension.key][lang]),
                    index=SCORES.index(previous) if previous else None,
                    horizontal=True,
                    key=f"{position}-{dimension.key}",
                )
            comment = draft_comment if draft_comment is not None else item.comment
            item_form.form_end(position, comment, i18n.text("overview", lang), lang)
        item_form.keyboard_hint(i18n.text("keyboard_hint", lang))


def restore_view(complete: list[bool]) -> None:
    """A new session (reload, second tab, server restart) continues where the URL says."""
    if "view" in st.session_state:
        return
    item = st.query_params.get("item", "")
    if item.isdigit() and 1 <= int(item) <= len(complete):
        go_to("item", int(item) - 1)
    elif st.query_params.get("view") in ("review", "done"):
        go_to(st.query_params["view"])
    else:
        go_to("start")


def rater_flow(con, db: str, rater: store.Rater | None, references: tuple[str, ...], lang: str) -> None:
    if rater is None:
        # Forget whoever was signed in before: a bad or revoked token shows nothing of theirs.
        release_media(set())
        for key in RATER_STATE:
            st.session_state.pop(key, None)
        login_page(lang, bad_token=bool(st.query_params.get("token")))
        return
    if st.session_state.get("rater_id") != rater.rater_id:
        release_media(set())
        for key in RATER_STATE:
            st.session_state.pop(key, None)
        st.session_state.rater_id = rater.rater_id

    complete = store.completed_positions(con, rater.rater_id)
    # A session's first run (after a reload, or a click that reached a restarted server) knows its
    # widgets' values only once they are drawn: it acts on a click after drawing the page, then reruns.
    fresh = "view" not in st.session_state
    restore_view(complete)
    if not fresh and apply_navigation(con, rater.rater_id, complete) == "save":
        complete = store.completed_positions(con, rater.rater_id)
    view = st.session_state.view
    if view != "item":
        release_media(item_form.reference_keys(references))
    if view == "start":
        instructions_page(complete, lang)
    elif view == "done":
        thank_you_page(lang)
    elif view == "review":
        review_page(con, db, rater, lang)
    else:
        item_page(con, db, rater, complete, references, lang)
        if fresh and apply_navigation(con, rater.rater_id, complete):
            st.rerun()


def top_bar(lang_default: str, rater_name: str | None) -> str:
    with st.container(horizontal=True, vertical_alignment="center", key="top-bar"):
        lang = st.segmented_control(
            "language", options=list(i18n.LANGUAGES), format_func=i18n.LANGUAGE_NAMES.get, default=lang_default,
            key="lang", label_visibility="collapsed",
        ) or lang_default
        if rater_name is not None:
            st.text(i18n.text("signed_in_as", lang, name=rater_name))
    return lang


# ---- admin page ------------------------------------------------------------------------------


def admin_login(expected: str) -> None:
    attempts = admin_attempts()
    with st.form("admin-login"):
        entered = st.text_input("Admin password", type="password")
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    with attempts["lock"]:
        wait = attempts["locked_until"] - time.monotonic()
        if wait > 0:
            st.error(f"Too many wrong passwords: try again in {wait:.0f} s.")
            return
        if hmac.compare_digest(entered.encode("utf-8"), expected.encode("utf-8")):
            attempts["failures"] = 0
            st.session_state.admin = True
            st.rerun()
        attempts["failures"] += 1
        if attempts["failures"] >= ADMIN_FREE_TRIES:
            lock = min(2 ** (attempts["failures"] - ADMIN_FREE_TRIES), ADMIN_MAX_LOCK_SECONDS)
            attempts["locked_until"] = time.monotonic() + lock
            st.error(f"Wrong password. The sign-in is locked for {lock} s.")
        else:
            st.error("Wrong password.")


def admin_page(con, db: str, settings: store.StudySettings) -> None:
    st.title("Rating study: admin")
    expected = admin_password()
    if not expected:
        st.error(f"The admin page is disabled: set the environment variable {ADMIN_PASSWORD_ENV} or `admin_password` in Streamlit secrets.")
        return
    if not st.session_state.get("admin"):
        admin_login(expected)
        return

    pairwise = settings.mode == "pairwise"
    answer_tables = pairwise_store.CHOICE_TABLES if pairwise else store.SCORE_TABLES
    st.subheader("Progress")
    st.dataframe(store.rater_progress(con, answer_tables), hide_index=True)
    if pairwise:
        answers, qc = store.read_votes_and_qc(con)
        name, summarise = "votes", pairwise_store.arm_summary
    else:
        answers = store.read_ratings(con)
        qc, name, summarise = store.qc_results(answers), "ratings", store.arm_summary
    st.subheader("Quality control")
    st.dataframe(qc, hide_index=True)

    st.subheader("Export")
    parquet = io.BytesIO()
    answers.to_parquet(parquet, index=False)
    csv_column, parquet_column = st.columns(2)
    csv_column.download_button(f"{name}.csv", answers.to_csv(index=False).encode("utf-8"), f"{name}.csv", "text/csv")
    parquet_column.download_button(f"{name}.parquet", parquet.getvalue(), f"{name}.parquet", "application/octet-stream")

    st.subheader("Raters")
    base_url = os.environ.get(BASE_URL_ENV) or study.DEFAULT_BASE_URL
    links_file = study.links_file(db, os.environ.get(LINKS_ENV))
    with st.form("add-rater", clear_on_submit=True):
        name = st.text_input("New rater's name")
        if st.form_submit_button("Add rater") and name.strip():
            try:
                link = study.add_rater(con, name, base_url)
            except FangzhiError as exc:  # e.g. the name is taken
                st.error(str(exc))
            else:
                study.append_links([link], links_file)
                st.text(f"Invitation link for {link[0]} (also appended to {links_file}):")
                st.code(link[2], language=None)
    progress = store.rater_progress(con, answer_tables)
    active = progress.loc[~progress["revoked"], "rater"].tolist()
    with st.form("revoke-rater"):
        victim = st.selectbox("Revoke access of", active, index=None)
        if st.form_submit_button("Revoke") and victim:
            store.revoke_rater(con, victim)
            st.rerun()

    st.subheader("Summary by arm")
    if settings.unblinded:
        st.dataframe(summarise(answers))
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
    st.set_page_config(page_title="Rating · 评分", layout="wide", initial_sidebar_state="collapsed")
    if not db:
        st.error(f"No study database: start the app with `fangzhi rate --db study.duckdb` (or set {DB_ENV}).")
        return
    lang = i18n.LANGUAGES[0]
    try:
        server = study_server(db)
    except FangzhiError as exc:  # e.g. another program holds the file; the next page load tries again
        print(f"fangzhi rate: {exc}", file=sys.stderr, flush=True)  # the details (server paths) stay in the server's log
        st.error("The rating study cannot be opened right now; please try again in a minute. · 评分系统暂时无法打开，请稍后再试。")
        return
    try:
        with server.cursor() as con:
            settings = store.study_settings(con)
            if st.query_params.get("page") == "admin":
                page_frame("en")  # the admin page is in English
                admin_page(con, db, settings)
                return
            token = st.query_params.get("token", "")
            rater = store.rater_for_token(con, token) if token else None
            lang = top_bar(settings.default_lang, rater.name if rater else None)
            page_frame(lang)
            if settings.mode == "pairwise" and rater is not None:
                parts = pairwise_page.AppParts(
                    display_bytes, lambda max_side: padded_length(con, db, max_side), go_to, next_position, media_url, release_media
                )
                pairwise_page.rater_flow(con, parts, rater, settings.reference_paths, lang)
            else:
                rater_flow(con, db, rater, settings.reference_paths, lang)
    except Exception:  # Streamlit's own error page is English only and may show server details
        traceback.print_exc()
        st.error(i18n.text("error", lang))


main()
