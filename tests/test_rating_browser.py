"""End to end in a real browser: Debian's chromium, driven by Playwright, against the rating app's server.

At 1440×900 and 390×844: the item and its first question on one screen, also right after Save;
five items rated by keyboard alone; a double click on Save; one link in two tabs; Markdown and HTML
in the prompt texts and a rater's name shown literally, with a local HTTP server that must receive
nothing; the review page revising item 3; `fangzhi rate` stopped by SIGTERM (port free at once) and
started again, with the rater's unsaved choices still there; a reference painting zoomed beside the
rated image; image URLs that work only in the browser they were served to. Every page state, image
response and websocket frame is scanned for anything that would unblind the study.

Screenshots go to results/screens/ for a person to look at; Save → next item times measured in the
browser go to results/screens/save_to_next_item.json.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fangzhi import studydb
from fangzhi.dimensions import DIMENSION_KEYS, DIMENSIONS
from fangzhi.rating_app import sample, serve, store, study
from ports import free_port, port_is_free

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENS = Path(__file__).resolve().parents[1] / "results" / "screens"
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
RATERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]

if not Path(CHROMIUM).is_file() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); in CI this test fails instead", allow_module_level=True)


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not serve.is_healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the app did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


class TrackingServer:
    """A local web server that records every request: markup in the study's texts must never make the browser call it."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def tracker():
    server = TrackingServer()
    yield server
    server.httpd.shutdown()


def hostile(tracker_url: str) -> str:
    return f" # 标题 ![x]({tracker_url}/md.png) :red[红] *word* <img src='{tracker_url}/html.png'> $x^2$"


def make_study(folder: Path, tracker) -> dict:
    manifest = sample.write_sample_manifest(folder / "generation", n_prompts=3)
    # Every prompt's texts end in Markdown, HTML and LaTeX that would fetch from the tracker if rendered.
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in records:
        record["narrative_zh"] += hostile(tracker.url)
        record["prompt_en"] += hostile(tracker.url)
        record["prompt"] = record["prompt_en"] + (", fangzhi style" if record["arm"] != "base" else "")
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    references = sample.write_sample_references(folder / "references", count=8)
    db = folder / "study.duckdb"
    names = RATERS + ["**mallory**" + hostile(tracker.url)]
    links = study.create_study(manifest, db, names, reference_images=references, qc_retest=1, qc_attention=1)
    return {"db": db, "manifest": manifest, "tokens": {name: token for name, token, _ in links}, "folder": folder}


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, tracker):
    return make_study(tmp_path_factory.mktemp("browser"), tracker)


@pytest.fixture(scope="module")
def live_app(study_db):
    port = free_port()
    log_path = study_db["folder"] / "streamlit.log"
    log = log_path.open("w")
    server = subprocess.Popen(serve.streamlit_command("127.0.0.1", port), env=serve.streamlit_env(study_db["db"]), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, server, log_path)

    def stop() -> None:
        """The app lets go of the study file when it stops; only then may this process open it."""
        if server.poll() is None:
            server.terminate()
            # A graceful stop; the server (uvicorn) then ends by raising the signal again.
            assert server.wait(timeout=20) in (0, -signal.SIGTERM)

    yield {**study_db, "url": url, "server": server, "stop": stop}
    stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SCREENS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def playwright_request(browser):
    """HTTP requests from no browser session at all (no cookies, no websocket)."""
    context = browser.new_context()
    yield context.request
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENS / f"{name}.png"))


def open_rater(browser, url: str, token: str, viewport=DESKTOP, context=None):
    page = (context or browser.new_context(viewport=viewport)).new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{url}/?token={token}")
    page.get_by_role("button", name="开始评分").click()
    wait_for_item(page)
    return page


def wait_for_item(page, position: int | None = None) -> int:
    """Wait until an item page (the given one, if any) is drawn with its image loaded; returns its position."""
    selector = ".fz-item" if position is None else f'.fz-item[data-item="{position}"]'
    page.locator(selector).wait_for(state="attached")
    position = int(page.locator(".fz-item").get_attribute("data-item"))
    # This item's own questions (keyed by its position), not the last item's still on screen.
    page.locator(f".st-key-{position}-{DIMENSION_KEYS[0]}").wait_for(state="attached")
    page.wait_for_function("() => { const i = document.querySelector('.st-key-item-image img'); return i && i.complete && i.naturalWidth > 0; }")
    page.wait_for_function("() => document.querySelectorAll('.st-key-questions [data-testid=stRadio]').length === 4")
    return int(page.locator(".fz-item").get_attribute("data-item"))


def scores_for(page, default: dict[str, int]) -> dict[str, int]:
    """Attention-check items ask for a given score on every question."""
    asked = re.search(r"选择 (\d) 分", page.inner_text("body"))
    return {key: int(asked.group(1)) for key in DIMENSION_KEYS} if asked else default


def within_viewport(page, locator) -> bool:
    box = locator.bounding_box()
    height = page.viewport_size["height"]
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height + 1


def checked_count(page) -> int:
    return page.locator(".st-key-questions input[type=radio]:checked").count()


def stored_items(db: Path) -> pd.DataFrame:
    """The study's rows (one per rater × position) as another process reads them while the app serves: from its snapshot."""
    time.sleep(2 * store.SNAPSHOT_INTERVAL_SECONDS)
    read = studydb.read_study(db)
    assert read.from_snapshot
    return read.rows


def stored_item(db: Path, rater: str, position: int) -> dict:
    rows = stored_items(db)
    row = rows[(rows["rater"] == rater) & (rows["position"] == position)].iloc[0]
    return {"scores": {key: None if row[key] != row[key] else int(row[key]) for key in DIMENSION_KEYS}, "saves": row["saves"]}


# ---- one screen per item, and the keyboard ---------------------------------------------------


def test_desktop_one_screen_per_item_and_five_items_by_keyboard(live_app, browser):
    page = open_rater(browser, live_app["url"], live_app["tokens"]["bob"])
    questions = page.locator(".st-key-questions [data-testid=stRadio]")
    timings, chosen = [], []
    for k in range(5):
        assert wait_for_item(page) == k
        # The image, all four questions with their anchors and Save are on screen without scrolling.
        assert within_viewport(page, page.locator(".st-key-item-image img"))
        for q in range(4):
            assert within_viewport(page, questions.nth(q))
            assert within_viewport(page, questions.nth(q).get_by_test_id("stCaptionContainer").last)
        assert within_viewport(page, page.get_by_role("button", name="保存并继续"))
        # The highlighted question moves on with each digit.
        assert page.locator(".fz-current").count() == 1
        shot(page, f"desktop_item_{k + 1}")
        scores = scores_for(page, {key: 1 + (k + i) % 5 for i, key in enumerate(DIMENSION_KEYS)})
        for i, key in enumerate(DIMENSION_KEYS):
            assert page.locator(".fz-current").evaluate("(e, q) => e === q", questions.nth(i).element_handle())
            page.keyboard.press(str(scores[key]))
        assert checked_count(page) == 4
        if k == 0:
            shot(page, "desktop_item_1_answered_by_keyboard")
        started = time.perf_counter()
        page.keyboard.press("Enter")
        wait_for_item(page, k + 1)
        timings.append(time.perf_counter() - started)
        assert checked_count(page) == 0
        chosen.append(scores)
    assert page.evaluate("window.scrollY") == 0 and within_viewport(page, questions.first)
    shot(page, "desktop_after_five_saves")
    rows = stored_items(live_app["db"]).query("rater == 'bob'").sort_values("position")
    assert [{key: int(row[key]) for key in DIMENSION_KEYS} for _, row in rows.head(5).iterrows()] == chosen
    (SCREENS / "save_to_next_item.json").write_text(
        json.dumps({"viewport": "1440x900", "seconds": [round(t, 3) for t in timings], "median_seconds": round(statistics.median(timings), 3)})
    )


def test_digits_typed_before_the_next_item_is_drawn_go_to_it(live_app, browser):
    # A fast rater types the next item's scores right after Enter, before the page has drawn that item.
    page = open_rater(browser, live_app["url"], live_app["tokens"]["ivan"])
    typed = [[2, 3, 4, 5], [5, 4, 3, 2], [1, 5, 1, 5]]
    for scores in typed:
        for score in scores:
            page.keyboard.press(str(score))
        page.keyboard.press("Enter")
    wait_for_item(page, 3)
    assert checked_count(page) == 0  # nothing typed for item 4 reached it
    rows = stored_items(live_app["db"]).query("rater == 'ivan'").sort_values("position")
    assert [[int(row[key]) for key in DIMENSION_KEYS] for _, row in rows.head(3).iterrows()] == typed
    page.context.close()


def test_enter_in_the_comment_saves_but_not_while_an_input_method_composes(live_app, browser):
    page = open_rater(browser, live_app["url"], live_app["tokens"]["judy"])
    scores = scores_for(page, dict(zip(DIMENSION_KEYS, (4, 3, 5, 2))))
    for key in DIMENSION_KEYS:
        page.keyboard.press(str(scores[key]))
    comment = page.get_by_label("备注（可选）")
    comment.click()
    page.keyboard.type("远山淡墨")
    # Streamlit's English "Press Enter to submit form" is not shown; the length counter is.
    assert page.locator(".st-key-questions [data-testid=InputInstructions]").inner_text() == "4/2000"
    # Chinese input methods confirm a candidate with Enter while composing: that Enter saves nothing.
    comment.evaluate("(input) => input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true}))")
    page.wait_for_timeout(1500)
    assert page.locator('.fz-item[data-item="0"]').count() == 1
    page.keyboard.press("Enter")
    wait_for_item(page, 1)
    rows = stored_items(live_app["db"])
    row = rows[(rows["rater"] == "judy") & (rows["position"] == 0)].iloc[0]
    assert {key: int(row[key]) for key in DIMENSION_KEYS} == scores and row["comment"] == "远山淡墨" and row["saves"] == 1
    page.context.close()


def fonts_drawing(page, selector: str) -> set[str]:
    """The fonts the browser actually drew the text of `selector` with (not the CSS it asked for)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    return {font["familyName"] for font in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]}


def page_language(page) -> tuple[str, str]:
    return tuple(page.evaluate("[document.documentElement.lang, document.querySelector('[data-testid=stSkipToContent]').textContent]"))


def test_english_item_fits_one_screen_too(live_app, browser):
    page = open_rater(browser, live_app["url"], live_app["tokens"]["heidi"])
    # The page is Chinese as HTML sees it: Simplified Chinese glyphs (the CJK font's default is often Japanese),
    # a screen reader's Chinese voice, and Streamlit's skip link in Chinese.
    page.wait_for_function("() => document.documentElement.lang === 'zh-CN'")
    assert page_language(page) == ("zh-CN", "跳到主要内容")
    assert any("SC" in font for font in fonts_drawing(page, ".st-key-lang-zh [data-testid=stText]"))
    page.get_by_text("English", exact=True).click()
    page.get_by_text("Image 1 of").wait_for()
    page.wait_for_function("() => document.documentElement.lang === 'en'")
    assert page_language(page) == ("en", "Skip to main content")
    # On the English page the prompt's Chinese narrative is still drawn with Chinese glyphs.
    narrative_fonts = fonts_drawing(page, ".st-key-lang-zh [data-testid=stText]")
    assert any("SC" in font for font in narrative_fonts) and not any("JP" in font for font in narrative_fonts), narrative_fonts
    questions = page.locator(".st-key-questions [data-testid=stRadio]")
    assert within_viewport(page, page.locator(".st-key-item-image img"))
    for q in range(4):
        assert within_viewport(page, questions.nth(q).get_by_test_id("stCaptionContainer").last)
    assert within_viewport(page, page.get_by_role("button", name="Save & next"))
    shot(page, "desktop_item_english")
    page.context.close()


def test_phone_image_first_then_questions(live_app, browser):
    page = open_rater(browser, live_app["url"], live_app["tokens"]["erin"], viewport=PHONE)
    for k in range(2):
        image = page.locator(".st-key-item-image img")
        first_question = page.locator(".st-key-questions [data-testid=stRadio]").first
        assert within_viewport(page, image) and within_viewport(page, first_question)
        assert image.bounding_box()["y"] < first_question.bounding_box()["y"]
        # The reference paintings are one small strip, not a wall between image and questions.
        strip = page.locator(".st-key-references").bounding_box()
        assert strip["height"] < 80
        shot(page, f"phone_item_{k + 1}")
        for dimension in DIMENSIONS:
            page.get_by_test_id("stRadio").filter(has_text=dimension.name_zh).locator("label").filter(has_text="3").first.click()
        page.get_by_role("button", name="保存并继续").click()
        wait_for_item(page, k + 1)
    shot(page, "phone_after_save")
    # Choices not yet saved survive a reload (kept in the browser until the item is saved).
    for dimension in DIMENSIONS[:2]:
        page.get_by_test_id("stRadio").filter(has_text=dimension.name_zh).locator("label").filter(has_text="2").first.click()
    page.wait_for_timeout(300)  # the page script notes choices every 80 ms
    page.reload()
    wait_for_item(page, 2)
    page.get_by_text("已恢复您在本页尚未保存的选择").wait_for()
    assert checked_count(page) == 2
    # The next key goes to the first question left open, and the note stands above the questions.
    third = page.locator(".st-key-questions [data-testid=stRadio]").nth(2)
    page.wait_for_function("q => q.classList.contains('fz-current')", arg=third.element_handle())
    assert page.locator(".fz-restored + .st-key-questions, .fz-restored ~ .st-key-questions").count() == 1


def shown_size(locator) -> tuple[float, float]:
    """The size an <img> with object-fit: contain is drawn at inside its box."""
    return tuple(locator.evaluate(
        "i => { const r = i.getBoundingClientRect(), s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight);"
        " return [i.naturalWidth * s, i.naturalHeight * s]; }"
    ))


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_reference_painting_zooms_beside_the_rated_image(live_app, browser, viewport):
    page = open_rater(browser, live_app["url"], live_app["tokens"]["dave"], viewport=viewport)
    name = "desktop" if viewport is DESKTOP else "phone"
    page.get_by_role("button", name="参考作品 3 / 8").click()  # the thumbnails are named buttons
    zoom = page.locator(".fz-zoom")
    zoom.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('.fz-zoom img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, f"{name}_reference_zoom")
    # The keys that drive the zoom view are named only where there is a keyboard.
    assert page.get_by_text("按 Z 打开").is_visible() == (viewport is DESKTOP)
    rated, reference = zoom.locator(".fz-zoom-rated img"), zoom.locator(".fz-zoom-reference img")
    source = "i => i.src"
    assert rated.evaluate(source) == page.locator(".st-key-item-image img").evaluate(source)
    assert reference.evaluate(source) == page.locator(".fz-reference img").nth(2).evaluate(source)
    assert "3 / 8" in zoom.inner_text()
    # Sent at full size (the sample paintings are 512 px; larger ones are sent at 1024), and drawn large.
    assert reference.evaluate("i => i.naturalWidth") == 512
    (rated_box, reference_box) = (rated.bounding_box(), reference.bounding_box())
    if viewport is DESKTOP:  # side by side, each about half the screen
        assert reference_box["x"] >= rated_box["x"] + rated_box["width"]
        assert min(shown_size(rated)) >= 600 and min(shown_size(reference)) >= 600
    else:  # stacked, each the phone's width
        assert reference_box["y"] >= rated_box["y"] + rated_box["height"]
        assert min(shown_size(rated)) >= 340 and min(shown_size(reference)) >= 340
    assert within_viewport(page, rated) and within_viewport(page, reference)
    # The arrows move through the paintings; keys score nothing behind the view; Escape closes it.
    page.keyboard.press("ArrowRight")
    assert "4 / 8" in page.locator(".fz-zoom").inner_text()
    page.keyboard.press("3")
    page.keyboard.press("Escape")
    zoom.wait_for(state="detached")
    assert checked_count(page) == 0
    # From the keyboard too: Z opens the first painting.
    page.keyboard.press("z")
    assert "1 / 8" in page.locator(".fz-zoom").inner_text()
    page.keyboard.press("Escape")
    zoom.wait_for(state="detached")
    page.context.close()


# ---- saves that never surprise ---------------------------------------------------------------


def test_double_click_on_save_saves_once(live_app, browser):
    db = live_app["db"]
    page = open_rater(browser, live_app["url"], live_app["tokens"]["dave"])
    for key in DIMENSION_KEYS:
        page.keyboard.press("4")
    page.get_by_role("button", name="保存并继续").dblclick()
    try:
        wait_for_item(page, 1)
    finally:
        shot(page, "desktop_after_double_click")
    page.wait_for_timeout(1500)  # let the second click's run finish
    assert checked_count(page) == 0
    assert not page.get_by_test_id("stException").count() and "请回答全部四个问题" not in page.inner_text("body")
    assert stored_item(db, "dave", 0) == {"scores": dict.fromkeys(DIMENSION_KEYS, 4), "saves": 1}


def test_two_saves_reaching_the_server_back_to_back_save_once(live_app):
    """The page script drops a double click's second Save; the server must cope without it too
    (a slow network can deliver both): here both reruns are sent on the websocket at once."""
    import asyncio

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    db, name = live_app["db"], "heidi"
    query = f"token={live_app['tokens'][name]}"

    async def rerun(ws, states: list[WidgetState]) -> None:
        message = BackMsg()
        message.rerun_script.query_string = query
        message.rerun_script.widget_states.widgets.extend(states)
        await ws.send(message.SerializeToString())

    async def page(ws) -> tuple[dict[str, object], list[str]]:
        """Widgets by id (which ends in the widget's key) and texts, until a script run ends."""
        widgets, texts = {}, []
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(await ws.recv())
            kind = forward.WhichOneof("type")
            if kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                element = forward.delta.new_element
                which = element.WhichOneof("type")
                if which in ("radio", "button"):
                    widget = getattr(element, which)
                    widgets[widget.id] = widget
                elif which == "exception":
                    texts.append("EXCEPTION " + element.exception.message)
                elif which in ("alert", "text"):
                    texts.append(getattr(element, which).body)
            elif kind == "script_finished" and forward.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
                return widgets, texts

    def by_key(widgets, key: str):
        return next(w for wid, w in widgets.items() if wid.endswith(f"-{key}"))

    async def main() -> list[str]:
        url = live_app["url"].replace("http", "ws", 1) + "/_stcore/stream"
        async with websockets.connect(url, subprotocols=["streamlit"], max_size=None) as ws:
            await rerun(ws, [])
            widgets, _ = await asyncio.wait_for(page(ws), timeout=30)
            await rerun(ws, [WidgetState(id=by_key(widgets, "start").id, trigger_value=True)])
            widgets, _ = await asyncio.wait_for(page(ws), timeout=30)  # the first item, after the start page's st.rerun
            states = [WidgetState(id=by_key(widgets, f"0-{key}").id, string_value="3") for key in DIMENSION_KEYS]
            save = WidgetState(id=by_key(widgets, "save-0").id, trigger_value=True)
            await rerun(ws, states + [save])
            await rerun(ws, states + [save])
            texts = []
            for _ in range(2):
                try:
                    _, more = await asyncio.wait_for(page(ws), timeout=20)
                    texts += more
                except asyncio.TimeoutError:
                    break
            return texts

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        texts = pool.submit(asyncio.run, main()).result()
    assert not any(t.startswith("EXCEPTION") or "请回答全部四个问题" in t for t in texts), texts
    assert stored_item(db, name, 0) == {"scores": dict.fromkeys(DIMENSION_KEYS, 3), "saves": 1}


def test_two_tabs_on_one_link_never_overwrite_silently(live_app, browser):
    db = live_app["db"]
    context = browser.new_context(viewport=DESKTOP)
    first = open_rater(browser, live_app["url"], live_app["tokens"]["carol"], context=context)
    second = open_rater(browser, live_app["url"], live_app["tokens"]["carol"], context=context)
    wanted = scores_for(first, {key: 5 for key in DIMENSION_KEYS})
    for score in wanted.values():
        first.keyboard.press(str(score))
    first.keyboard.press("Enter")
    wait_for_item(first, 1)
    other = {key: 1 if wanted[key] != 1 else 2 for key in DIMENSION_KEYS}
    for score in other.values():
        second.keyboard.press(str(score))
    second.keyboard.press("Enter")
    second.get_by_text("另一个标签页或窗口").wait_for()
    shot(second, "desktop_two_tabs_conflict")
    assert stored_item(db, "carol", 0)["scores"] == wanted
    assert checked_count(second) == 4  # the second tab's choices are still there
    second.wait_for_timeout(1000)  # a person reads the notice first (and a second Save within 0.7 s counts as a double click)
    second.keyboard.press("Enter")  # saving again overwrites, knowingly
    wait_for_item(second, 1)
    assert stored_item(db, "carol", 0)["scores"] == other
    context.close()


def media_urls_of(page) -> list[str]:
    """Absolute URLs of the item image and the reference paintings on the page."""
    return page.evaluate("[...document.querySelectorAll('.st-key-item-image img, .fz-reference img')].map(i => i.src)")


def test_media_urls_belong_to_one_session_and_end_with_the_item(live_app, browser, playwright_request):
    first = open_rater(browser, live_app["url"], live_app["tokens"]["grace"])
    second = open_rater(browser, live_app["url"], live_app["tokens"]["grace"])  # another browser, same rater
    other_rater = open_rater(browser, live_app["url"], live_app["tokens"]["frank"])
    url_first, url_second = (p.evaluate("document.querySelector('.st-key-item-image img').src") for p in (first, second))
    body_first, body_second = (p.request.get(u).body() for p, u in ((first, url_first), (second, url_second)))
    # The same image, the same length, but not the same bytes, nor the same address.
    assert Image.open(io.BytesIO(body_first)).tobytes() == Image.open(io.BytesIO(body_second)).tobytes()
    assert len(body_first) == len(body_second) and url_first != url_second
    # Every image URL served to one browser gives nothing to another rater's session, another
    # browser of the same rater, or a request without a session; the browser it was served to gets it.
    urls = media_urls_of(first)
    assert len(urls) == 1 + 8 and not set(urls) & set(media_urls_of(second) + media_urls_of(other_rater))
    for url in urls:
        assert first.request.get(url).status == 200
        assert other_rater.request.get(url).status == 404
        assert second.request.get(url).status == 404
        assert playwright_request.get(url).status == 404
    other_rater.context.close()
    for score in "3333":
        first.keyboard.press(score)
    first.keyboard.press("Enter")
    wait_for_item(first, 1)
    first.keyboard.press("ArrowDown")  # any later run of the session
    first.wait_for_timeout(1000)
    # Once the session has moved on, its old item's URL gives nothing, even to its own browser;
    # the reference paintings stay.
    assert first.request.get(url_first).status == 404
    assert first.request.get(urls[1]).status == 200
    first.context.close()
    second.context.close()


# ---- the main walk: rate, reload, review, and nothing leaks ----------------------------------


def forbidden_strings(manifest: Path) -> list[str]:
    """Everything about an image that could unblind it: arms, ids, file names, seeds, models."""
    secrets = {"lora", "parameters", sample.SAMPLE_BASE_MODEL, Path(sample.SAMPLE_LORA_FILE).name, str(manifest.parent)}
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        secrets |= {record["image_id"], Path(record["file"]).name, str(record["seed"]), record["arm"]}
        if record["prompt"] != record["prompt_en"]:  # e.g. with the LoRA's trigger phrase
            secrets.add(record["prompt"])
    secrets.discard("base")  # too common a word for raw bytes; checked in the visible text below
    return sorted(secrets)


def test_rate_reload_review_and_nothing_leaks(live_app, browser, tracker):
    frames: list[bytes] = []
    media: list[tuple[str, str, bytes]] = []
    media_urls: list[str] = []
    item_image_urls: set[str] = set()
    dom_snapshots: list[str] = []
    visible_texts: list[str] = []
    chosen: list[dict[str, int]] = []
    db = live_app["db"]

    def on_websocket(ws) -> None:
        for event in ("framereceived", "framesent"):
            ws.on(event, lambda payload: frames.append(payload if isinstance(payload, bytes) else payload.encode()))

    def on_response(response) -> None:
        if urllib.parse.urlparse(response.url).path.startswith("/fz-media/"):  # the app's images, not static files
            media_urls.append(response.url)

    def snapshot(page) -> None:
        item_image_urls.add(urllib.parse.urlparse(page.locator(".st-key-item-image img").evaluate("i => i.src")).path)
        dom_snapshots.append(page.content())
        visible_texts.append(page.inner_text("body"))
        while media_urls:  # fetched again here: event handlers may not call back into Playwright
            response = page.request.get(media_urls.pop())
            if response.status == 200:  # the media of an item the session has moved on from are gone
                media.append((response.url, response.headers.get("content-type", ""), response.body()))

    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("websocket", on_websocket)
    page.on("response", on_response)
    page.goto(f"{live_app['url']}/?token={live_app['tokens']['alice']}")
    page.get_by_role("button", name="开始评分").click()
    for k in range(3):
        wait_for_item(page, k)
        snapshot(page)
        scores = scores_for(page, {key: 1 + (k + i) % 5 for i, key in enumerate(DIMENSION_KEYS)})
        for dimension in DIMENSIONS:
            question = page.get_by_test_id("stRadio").filter(has_text=dimension.name_zh)
            question.locator("label").filter(has_text=str(scores[dimension.key])).first.click()
        page.get_by_role("button", name="保存并继续").click()
        chosen.append(scores)
    wait_for_item(page, 3)
    # A reload (or a new tab on the same address) opens the same item, not the start page.
    page.reload()
    wait_for_item(page, 3)
    snapshot(page)
    # Texts from the study and the rater's own name are shown as typed.
    body = page.inner_text("body")
    assert hostile(tracker.url).strip() in body

    # The review page lists every item; item 3 is opened and revised.
    page.get_by_role("button", name="全部图像").click()
    page.get_by_test_id("stDataFrame").wait_for()
    shot(page, "desktop_review")
    page.get_by_label(re.compile("打开第几张")).fill("3")
    page.get_by_role("button", name="打开", exact=True).click()
    wait_for_item(page, 2)
    assert checked_count(page) == 4
    revised = {**chosen[2], "style": 5 if chosen[2]["style"] != 5 else 4}
    page.keyboard.press(str(revised["style"]))
    page.keyboard.press("Enter")
    wait_for_item(page, 3)  # back to where the rater left off
    snapshot(page)
    assert page.evaluate("document.querySelectorAll('.st-key-item-image img').length") == 1
    assert live_app["server"].poll() is None
    rows = stored_items(db)  # from this (second) process while the app is serving
    # The hostile rater name, on its own page.
    mallory = open_rater(browser, live_app["url"], live_app["tokens"]["**mallory**" + hostile(tracker.url)])
    assert "评分人：**mallory**" + hostile(tracker.url) in mallory.inner_text("body")
    shot(mallory, "desktop_literal_text")
    context.close()

    own = rows[rows["rater"] == "alice"].sort_values("position").head(3)
    for (_, row), scores in zip(own.iterrows(), [chosen[0], chosen[1], revised]):
        assert {key: int(row[key]) for key in DIMENSION_KEYS} == scores
    live_app["stop"]()
    with studydb.connect(db) as con:
        audit = con.execute(
            "SELECT old_score, new_score FROM score_audit JOIN raters USING (rater_id) WHERE name = 'alice' AND position = 2 AND dimension = 'style' ORDER BY audit_id"
        ).fetchall()
    assert audit == [(None, chosen[2]["style"]), (chosen[2]["style"], revised["style"])]
    assert tracker.requests == []  # no Markdown image, HTML image or anything else reached out

    # Leak check: DOM, websocket frames, media.
    assert frames and media and dom_snapshots
    assert "黄昏时分宁静的水乡".encode() in b"".join(frames)  # positive control: the scan sees what the app sends
    everything = [("dom", s.encode()) for s in dom_snapshots] + [("frame", f) for f in frames] + [("media", body) for _, _, body in media]
    for secret in forbidden_strings(live_app["manifest"]):
        for source, blob in everything:
            assert secret.encode() not in blob, f"{secret!r} reached the browser in a {source}"
    for text in visible_texts:
        assert not re.search(r"\b(base|lora|seed|arm)\b", text, flags=re.IGNORECASE), text
    item_images = [(url, body) for url, _, body in media if urllib.parse.urlparse(url).path in item_image_urls]
    for url, content_type, body in media:
        assert content_type == "image/jpeg", url
        image = Image.open(io.BytesIO(body))
        assert not {"parameters", "exif", "icc_profile", "comment"} & set(image.info), (url, image.info.keys())
        assert len(body) < 400_000
    # Every rated image arrives at the one padded length of the study.
    assert item_images, (item_image_urls, [url for url, _, _ in media])
    assert len({len(body) for _, body in item_images}) == 1


# ---- the server: SIGTERM, restart, and unsaved choices ---------------------------------------


def test_sigterm_frees_the_port_and_unsaved_choices_survive_a_restart(tmp_path, tracker, browser):
    study_db = make_study(tmp_path, tracker)
    db = study_db["db"]
    port = free_port()
    log_path = study_db["folder"] / "rate.log"
    command = [sys.executable, "-m", "fangzhi", "rate", "--db", str(db), "--port", str(port)]
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen(command, stdout=log_path.open("a"), stderr=subprocess.STDOUT))
        wait_until_healthy(f"http://127.0.0.1:{port}", started[-1], log_path)
        return started[-1]

    try:
        rate = start()
        page = open_rater(browser, f"http://127.0.0.1:{port}", study_db["tokens"]["frank"])
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        scores = scores_for(page, {"style": 2, "match": 3, "detail": 4, "beauty": 5})
        for score in scores.values():
            page.keyboard.press(str(score))
        rate.send_signal(signal.SIGTERM)
        assert rate.wait(timeout=15) == 0
        stopped = time.monotonic()
        while not port_is_free(port):
            assert time.monotonic() - stopped < 5, "the port is still taken 5 s after `fangzhi rate` stopped"
            time.sleep(0.1)
        # While the server is away the rater is told so, in their language.
        page.locator(".fz-banner").wait_for(timeout=15_000)
        assert "连接已断开" in page.locator(".fz-banner").inner_text()
        shot(page, "desktop_connection_lost")

        start()
        page.locator(".fz-banner").wait_for(state="detached", timeout=30_000)
        deadline = time.monotonic() + 30
        while not sockets and time.monotonic() < deadline:  # the page's own reconnection
            page.wait_for_timeout(200)
        wait_for_item(page, 0)
        page.wait_for_function("() => document.querySelectorAll('.st-key-questions input[type=radio]:checked').length === 4")
        shot(page, "desktop_after_restart")
        page.keyboard.press("Enter")
        wait_for_item(page, 1)
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=15)
    with studydb.connect(db) as con:
        rater = con.execute("SELECT rater_id FROM raters WHERE name = 'frank'").fetchone()[0]
        assert store.item_view(con, rater, 0).scores == scores
