"""The pairwise page in a real browser (Debian's chromium via Playwright, as tests/test_rating_browser.py): the two images
side by side at equal size on a desktop and stacked on a phone, three comparisons answered by keyboard alone
(← → ↓ and 1 2 3, Enter saves), a reference painting zoomed beside both sides (stacked on a phone), and every page state, media response and websocket frame scanned for anything
that would tell which side is which arm. Screenshots go to results/screens/pairwise_*.png."""

from __future__ import annotations

import subprocess
import time
import urllib.parse

import pytest

from fangzhi import studydb
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.rating_app import sample, serve, store, study

from test_rating_browser import DESKTOP, PHONE, browser, forbidden_strings, free_port, shot, wait_until_healthy  # noqa: F401 (browser: a fixture)

ARMS = ("base", "lora_a", "lora_b")
ADMIN_PASSWORD = "side by side"
SIDE_IMAGES = ".st-key-pair-left img, .st-key-pair-right img"


@pytest.fixture(scope="module")
def pairwise_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairwise_browser")
    manifest = sample.write_sample_manifest(folder / "generation", n_prompts=3, arms=ARMS)
    references = sample.write_sample_references(folder / "references", count=3)
    db = folder / "study.duckdb"
    links = study.create_study(manifest, db, ["alice", "bob"], reference_images=references, qc_retest=1, qc_attention=1, mode="pairwise")
    port = free_port()
    log_path = folder / "streamlit.log"
    env = {**serve.streamlit_env(db), "FANGZHI_ADMIN_PASSWORD": ADMIN_PASSWORD}
    server = subprocess.Popen(serve.streamlit_command("127.0.0.1", port), env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, server, log_path)
    yield {"db": db, "manifest": manifest, "url": url, "tokens": {name: token for name, token, _ in links}, "server": server}
    if server.poll() is None:
        server.terminate()
        server.wait(timeout=20)


def wait_for_comparison(page, position: int) -> None:
    page.locator(f'.fz-pair[data-item="{position}"]').wait_for(state="attached")
    page.locator(f".st-key-{position}-{DIMENSION_KEYS[0]}").wait_for(state="attached")
    page.wait_for_function(f"() => [...document.querySelectorAll('{SIDE_IMAGES}')].filter((i) => i.complete && i.naturalWidth > 0).length === 2")
    page.wait_for_function("() => document.querySelectorAll('.st-key-questions [data-testid=stRadio]').length === 4")


def test_pairwise_page_by_keyboard_equal_sides_and_nothing_leaks(pairwise_app, browser):  # noqa: F811
    frames: list[bytes] = []
    media_urls: list[str] = []
    media: list[tuple[str, bytes]] = []
    side_urls: list[tuple[str, str]] = []
    doms: list[str] = []

    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("websocket", lambda ws: [ws.on(e, lambda p: frames.append(p if isinstance(p, bytes) else p.encode())) for e in ("framereceived", "framesent")])
    page.on("response", lambda r: media_urls.append(r.url) if urllib.parse.urlparse(r.url).path.startswith(("/media/", "/fz-media/")) else None)

    def snapshot() -> None:
        doms.append(page.content())
        side_urls.append(tuple(urllib.parse.urlparse(urllib.parse.urljoin(page.url, page.locator(f".st-key-pair-{s} img").get_attribute("src"))).path for s in ("left", "right")))
        while media_urls:
            response = page.request.get(media_urls.pop())
            if response.status == 200:
                media.append((urllib.parse.urlparse(response.url).path, response.body()))

    page.goto(f"{pairwise_app['url']}/?token={pairwise_app['tokens']['alice']}")
    page.get_by_role("button", name="开始评分").click()
    keys = [["ArrowLeft", "ArrowRight", "ArrowDown", "1"], ["2", "3", "ArrowLeft", "ArrowRight"], ["ArrowDown", "ArrowDown", "2", "1"]]
    expected = [["left", "right", "tie", "left"], ["right", "tie", "left", "right"], ["tie", "tie", "right", "left"]]
    for k, presses in enumerate(keys):
        wait_for_comparison(page, k)
        left, right = (page.locator(f".st-key-pair-{s} img").bounding_box() for s in ("left", "right"))
        # Side by side, at the same size and height.
        assert left["x"] + left["width"] <= right["x"] and abs(left["y"] - right["y"]) < 2
        assert abs(left["width"] - right["width"]) < 2 and abs(left["height"] - right["height"]) < 2
        if k == 0:
            shot(page, "pairwise_desktop")
            # Z: the first reference painting full size beside both sides; ← → switch paintings and answer nothing.
            page.keyboard.press("z")
            captions = page.locator(".fz-zoom figcaption")
            assert captions.all_inner_texts() == ["左图", "右图", "参考作品 1 / 3"]
            zoomed = page.locator(".fz-zoom-rated img").evaluate_all("(images) => images.map((i) => i.src)")
            assert zoomed == [page.locator(f".st-key-pair-{s} img").evaluate("(i) => i.src") for s in ("left", "right")]
            page.keyboard.press("ArrowRight")
            assert captions.all_inner_texts()[-1] == "参考作品 2 / 3"
            page.wait_for_function("() => [...document.querySelectorAll('.fz-zoom img')].every((i) => i.complete && i.naturalWidth > 0)")
            shot(page, "pairwise_zoom")
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("3")
            assert captions.all_inner_texts()[-1] == "参考作品 1 / 3"
            page.keyboard.press("Escape")
            assert page.locator(".fz-zoom").count() == 0
            assert page.locator(".st-key-questions input[type=radio]:checked").count() == 0
        # One comparison, one screen: the images, the four questions and Save without scrolling.
        save = page.get_by_role("button", name="保存并继续").bounding_box()
        assert save["y"] + save["height"] <= DESKTOP["height"] and left["height"] > 300
        snapshot()
        for key in presses:
            page.keyboard.press(key)
        assert page.locator(".st-key-questions input[type=radio]:checked").count() == 4
        page.keyboard.press("Enter")
    wait_for_comparison(page, 3)
    snapshot()
    context.close()

    # On a phone the two images stack, left first.
    phone = browser.new_context(viewport=PHONE).new_page()
    phone.set_default_timeout(30_000)
    phone.goto(f"{pairwise_app['url']}/?token={pairwise_app['tokens']['bob']}&item=1")
    wait_for_comparison(phone, 0)
    left, right = (phone.locator(f".st-key-pair-{s} img").bounding_box() for s in ("left", "right"))
    assert left["y"] + left["height"] <= right["y"] + 1 and abs(left["width"] - right["width"]) < 2
    shot(phone, "pairwise_phone")
    # A tap on a reference: the three paintings stacked, each within the screen.
    phone.locator(".fz-reference").nth(2).click()
    figures = [phone.locator(".fz-zoom figure").nth(i).bounding_box() for i in range(3)]
    assert all(a["y"] + a["height"] <= b["y"] + 1 for a, b in zip(figures, figures[1:]))
    assert figures[-1]["y"] + figures[-1]["height"] <= PHONE["height"]
    assert phone.locator(".fz-zoom figcaption").all_inner_texts()[-1] == "参考作品 3 / 3"
    phone.wait_for_function("() => [...document.querySelectorAll('.fz-zoom img')].every((i) => i.complete && i.naturalWidth > 0)")
    shot(phone, "pairwise_phone_zoom")
    phone.get_by_role("button", name="关闭（Esc）").click()
    assert phone.locator(".fz-zoom").count() == 0
    phone.context.close()

    time.sleep(2 * store.SNAPSHOT_INTERVAL_SECONDS)
    read = studydb.read_study(pairwise_app["db"])  # while the app serves: its snapshot
    assert read.from_snapshot and read.mode == "pairwise"
    own = read.rows[read.rows["rater"] == "alice"].sort_values("position").head(3)
    assert [[row[key] for key in DIMENSION_KEYS] for _, row in own.iterrows()] == expected
    assert pairwise_app["server"].poll() is None

    # Leak scan: nothing in the DOM, websocket frames or media names an arm, an image, a file or a seed.
    assert frames and media and doms
    assert "黄昏时分宁静的水乡".encode() in b"".join(frames)  # positive control
    everything = [("dom", d.encode()) for d in doms] + [("frame", f) for f in frames] + [("media", body) for _, body in media]
    for secret in forbidden_strings(pairwise_app["manifest"]):
        for source, blob in everything:
            assert secret.encode() not in blob, f"{secret!r} reached the browser in a {source}"
    lengths = dict(media)
    for left_url, right_url in side_urls:
        if left_url in lengths and right_url in lengths:
            assert len(lengths[left_url]) == len(lengths[right_url])
    assert any(left in lengths and right in lengths for left, right in side_urls)


def test_two_tabs_on_one_comparison_and_the_admin_page(pairwise_app, browser):  # noqa: F811
    context = browser.new_context(viewport=DESKTOP)
    tabs = [context.new_page() for _ in range(2)]
    for tab in tabs:
        tab.set_default_timeout(30_000)
        tab.goto(f"{pairwise_app['url']}/?token={pairwise_app['tokens']['bob']}&item=2")
        wait_for_comparison(tab, 1)
    first, second = tabs
    for key in ["1"] * 4 + ["Enter"]:
        first.keyboard.press(key)
    wait_for_comparison(first, 2)
    # The second tab, opened before that save, is told about it instead of overwriting it, and keeps its own choices.
    for key in ["2"] * 4 + ["Enter"]:
        second.keyboard.press(key)
    warning = second.get_by_text("另一个标签页或窗口")
    warning.wait_for()
    assert "左图更好" in warning.inner_text() and second.locator('.fz-pair[data-item="1"]').count() == 1
    assert second.locator(".st-key-questions input[type=radio]:checked").count() == 4
    shot(second, "pairwise_two_tabs")
    time.sleep(2 * store.SNAPSHOT_INTERVAL_SECONDS)
    rows = studydb.read_study(pairwise_app["db"]).rows
    saved = rows[(rows["rater"] == "bob") & (rows["position"] == 1)].iloc[0]
    assert [saved[key] for key in DIMENSION_KEYS] == ["left"] * 4
    second.keyboard.press("Enter")  # a second Save overwrites, knowingly
    wait_for_comparison(second, 2)
    # The list of all comparisons: both sides as thumbnails, and the one just saved shown as answered.
    second.get_by_role("button", name="全部比较").click()
    second.get_by_text("我的选择").wait_for()
    second.wait_for_timeout(1000)  # the table draws its thumbnails on a canvas
    shot(second, "pairwise_review")
    assert second.get_by_text("已完成 1 / 20 组").count() == 1

    admin = context.new_page()
    admin.set_default_timeout(30_000)
    admin.goto(f"{pairwise_app['url']}/?page=admin")
    admin.get_by_label("Admin password").fill(ADMIN_PASSWORD)
    admin.get_by_role("button", name="Sign in").click()
    admin.get_by_role("button", name="votes.csv").wait_for()
    assert admin.get_by_text("Quality control").count() == 1
    shot(admin, "pairwise_admin")
    context.close()
