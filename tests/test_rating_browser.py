"""End to end in a real browser: Debian's chromium, driven by Playwright, against `fangzhi rate`'s server.

A rater opens their link, rates three items, reloads, resumes at the fourth; the database then
holds exactly those scores (read from this process while the app is still serving). Every page
state, media response and websocket frame is scanned for anything that would unblind the study.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fangzhi import studydb
from fangzhi.dimensions import DIMENSION_KEYS, DIMENSIONS
from fangzhi.rating_app import sample, serve, store, study

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).is_file() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); in CI this test fails instead", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_app(tmp_path):
    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=3)
    references = sample.write_sample_references(tmp_path / "references")
    db = tmp_path / "study.duckdb"
    [(_, token, _)] = study.create_study(manifest, db, ["alice"], reference_images=references, qc_retest=1, qc_attention=1)
    port = free_port()
    log = (tmp_path / "streamlit.log").open("w")
    server = subprocess.Popen(serve.streamlit_command("127.0.0.1", port), env=serve.streamlit_env(db), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield {"url": url, "token": token, "db": db, "manifest": manifest, "server": server}
    server.terminate()
    server.wait(timeout=20)


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


def test_rater_rates_reloads_resumes_and_nothing_leaks(live_app):
    from playwright.sync_api import expect, sync_playwright

    frames: list[bytes] = []
    media: list[tuple[str, str, bytes]] = []
    dom_snapshots: list[str] = []
    visible_texts: list[str] = []
    chosen: list[dict[str, int]] = []

    def on_websocket(ws) -> None:
        for event in ("framereceived", "framesent"):
            ws.on(event, lambda payload: frames.append(payload if isinstance(payload, bytes) else payload.encode()))

    media_urls: list[str] = []

    def on_response(response) -> None:
        if urllib.parse.urlparse(response.url).path.startswith("/media/"):  # Streamlit's media, not its static files
            media_urls.append(response.url)

    def snapshot(page) -> None:
        dom_snapshots.append(page.content())
        visible_texts.append(page.inner_text("body"))
        # Fetched again here: event handlers may not call back into Playwright.
        while media_urls:
            response = page.request.get(media_urls.pop())
            media.append((response.url, response.headers.get("content-type", ""), response.body()))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        page.on("websocket", on_websocket)
        page.on("response", on_response)
        page.goto(f"{live_app['url']}/?token={live_app['token']}")
        page.get_by_role("button", name="开始评分").click()

        for k in range(3):
            page.get_by_text(f"第 {k + 1} 张").wait_for()
            # The new item's questions are in place (not the last item's, still answered, while the run streams in).
            expect(page.get_by_test_id("stForm").get_by_test_id("stRadio")).to_have_count(4)
            expect(page.get_by_test_id("stForm").locator("input[type=radio]:checked")).to_have_count(0)
            page.locator("img").first.wait_for()
            snapshot(page)
            if page.get_by_text("注意力检查").count():
                asked = int(re.search(r"选择 (\d) 分", page.inner_text("body")).group(1))
                scores = {key: asked for key in DIMENSION_KEYS}
            else:
                scores = {key: 1 + (k + i) % 5 for i, key in enumerate(DIMENSION_KEYS)}
            for dimension in DIMENSIONS:
                question = page.get_by_test_id("stRadio").filter(has_text=dimension.name_zh)
                question.get_by_test_id("stRadioOption").nth(scores[dimension.key] - 1).click()
            page.get_by_role("button", name="保存并继续").click()
            page.get_by_text(f"已完成 {k + 1} / ").first.wait_for()
            chosen.append(scores)

        page.reload()
        page.get_by_role("button", name="开始评分").click()
        page.get_by_text("第 4 张").wait_for()
        page.locator("img").first.wait_for()
        snapshot(page)
        # Read everything from this (second) process while the app is serving: from its snapshot.
        assert live_app["server"].poll() is None
        time.sleep(2 * store.SNAPSHOT_INTERVAL_SECONDS)
        read = studydb.read_study(live_app["db"])
        ratings = read.ratings()
        browser.close()

    assert read.from_snapshot and read.saves == 3 and len(ratings) == 3
    expected_items = read.rows.head(3)
    assert list(ratings["image_id"]) == list(expected_items["image_id"])
    assert list(ratings["kind"]) == list(expected_items["kind"])
    for (_, row), scores in zip(ratings.iterrows(), chosen):
        assert {key: row[key] for key in DIMENSION_KEYS} == scores
    live_app["server"].terminate()  # the app lets go of the file at shutdown
    assert live_app["server"].wait(timeout=20) == 0
    with studydb.connect(live_app["db"]) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 12
        assert con.execute("SELECT count(*), sum(saves) FROM item_notes").fetchone() == (3, 3)
        assert con.execute("SELECT count(*) FROM score_audit").fetchone()[0] == 12

    # Leak check: DOM, websocket frames, media.
    assert frames and media and dom_snapshots
    # Positive control: the scan does see what the app sends (the shown narrative is in the frames).
    assert "黄昏时分宁静的水乡".encode() in b"".join(frames)
    everything = [("dom", s.encode()) for s in dom_snapshots] + [("frame", f) for f in frames] + [("media", body) for _, _, body in media]
    for secret in forbidden_strings(live_app["manifest"]):
        for source, blob in everything:
            assert secret.encode() not in blob, f"{secret!r} reached the browser in a {source}"
    for text in visible_texts:
        assert not re.search(r"\b(base|lora|seed|arm)\b", text, flags=re.IGNORECASE), text
    item_images = {body for url, content_type, body in media if Image.open(io.BytesIO(body)).size == (512, 512)}
    assert len(item_images) == len(set(store.list_assignments(live_app["db"]).head(4)["image_id"]))
    for url, content_type, body in media:
        assert content_type == "image/jpeg", url
        image = Image.open(io.BytesIO(body))
        assert not {"parameters", "exif", "icc_profile", "comment"} & set(image.info), (url, image.info.keys())
        assert len(body) < 400_000
        assert re.fullmatch(r".*/media/[0-9a-f]+\.jpg", url), url
