"""Rating app under load: N simulated raters save at the same time against the real Streamlit server.

Each simulated rater speaks Streamlit's own websocket protocol (the protobuf BackMsg/ForwardMsg the
browser sends and receives), signs in with its invitation token, starts, and then repeatedly
answers the four questions and presses Save & next. The time measured per save runs from sending
the Save click until the next item's script run has finished on the wire and its image has been
downloaded over HTTP: everything a browser needs to draw the next item, except drawing it.

    python bench/rating_bench.py [--raters 20] [--saves 10] [--think-seconds 2] [--out results/bench/rating_app.json]

Two runs: "paced" (each rater pauses 0.5–1.5 × think-seconds before a save, ten times denser than
real raters) and "burst" (no pauses: all raters hammer Save). Meanwhile the benchmark process
exports all ratings every 2 s, as `fangzhi study export` would while the app serves (it reads the
app's snapshot). Afterwards the snapshot, and once the app has stopped the database itself, must
hold exactly the saved items, no more, no fewer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

from fangzhi import studydb
from fangzhi.dimensions import DIMENSIONS
from fangzhi.rating_app import media_access, sample, serve, store, study

EXPORT_EVERY_SECONDS = 2.0
IMAGE_SRC = re.compile(rf'src="({media_access.ROUTE}/[^"]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("streamlit exited during start-up")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("streamlit did not become healthy")


class SimulatedRater:
    """One browser tab, as far as the server can tell: with the browser's cookie, which images are handed out to."""

    def __init__(self, base_url: str, token: str):
        self.base_url = base_url
        self.query_string = f"token={token}"
        self.widgets: dict[str, object] = {}  # label -> element proto (radio/button) of the last page
        self.image_urls: list[str] = []
        self.fetched: set[str] = set()
        self.cookie = ""

    def load_page(self) -> None:
        """What the page does before it opens the websocket: ask /_stcore/health, whose answer sets the XSRF cookie the app's images are bound to."""
        with urllib.request.urlopen(f"{self.base_url}/_stcore/health", timeout=30) as response:
            self.cookie = "; ".join(c.split(";", 1)[0] for c in response.headers.get_all("Set-Cookie") or [])

    async def rerun(self, ws, states: list[WidgetState]) -> None:
        message = BackMsg()
        message.rerun_script.query_string = self.query_string
        message.rerun_script.widget_states.widgets.extend(states)
        await ws.send(message.SerializeToString())
        await self.read_page(ws)

    async def read_page(self, ws) -> None:
        """Collect widgets and images until a script run finishes without asking for another run."""
        self.widgets, self.image_urls = {}, []
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(await ws.recv())
            kind = forward.WhichOneof("type")
            if kind == "new_session":
                self.widgets, self.image_urls = {}, []
            elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                element = forward.delta.new_element
                which = element.WhichOneof("type")
                if which in ("radio", "button"):
                    widget = getattr(element, which)
                    self.widgets[widget.label] = widget
                elif which == "html":
                    self.image_urls += IMAGE_SRC.findall(element.html.body)
                elif which == "exception":
                    raise RuntimeError(f"the app raised: {element.exception.message}")
            elif kind == "script_finished" and forward.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
                return

    def download_new_images(self) -> list[int]:
        sizes = []
        for url in self.image_urls:
            if url not in self.fetched:  # a browser caches images by URL (one per session and image)
                request = urllib.request.Request(f"{self.base_url}/{url}", headers={"Cookie": self.cookie})
                sizes.append(len(urllib.request.urlopen(request, timeout=30).read()))
                self.fetched.add(url)
        return sizes

    def button(self, label: str) -> WidgetState:
        return WidgetState(id=self.widgets[label].id, trigger_value=True)

    def answers(self, score: int) -> list[WidgetState]:
        labels = {f"**{d.name_zh}**" for d in DIMENSIONS}
        return [WidgetState(id=w.id, string_value=str(score)) for label, w in self.widgets.items() if label in labels]

    async def run(self, saves: int, think_seconds: float, results: dict) -> None:
        ws_url = self.base_url.replace("http", "ws", 1) + "/_stcore/stream"
        await asyncio.to_thread(self.load_page)
        async with websockets.connect(ws_url, subprotocols=["streamlit"], max_size=None, additional_headers={"Cookie": self.cookie}) as ws:
            await self.rerun(ws, [])
            await self.rerun(ws, [self.button("开始评分")])
            first_item_images = await asyncio.to_thread(self.download_new_images)
            results["first_item_bytes"].append(sum(first_item_images))
            for k in range(saves):
                await asyncio.sleep(think_seconds * random.uniform(0.5, 1.5))
                started = time.perf_counter()
                await self.rerun(ws, self.answers(1 + k % 5) + [self.button("保存并继续")])
                item_bytes = await asyncio.to_thread(self.download_new_images)
                results["latencies"].append(time.perf_counter() - started)
                results["item_image_bytes"] += item_bytes


async def run_raters(base_url: str, tokens: list[str], saves: int, think_seconds: float, db: Path | None = None) -> dict:
    """All raters at once; meanwhile (with `db`) another process exports the ratings every EXPORT_EVERY_SECONDS."""
    results = {"latencies": [], "item_image_bytes": [], "first_item_bytes": [], "export_seconds": [], "exports_from_snapshot": 0}
    raters = asyncio.gather(*(SimulatedRater(base_url, token).run(saves, think_seconds, results) for token in tokens))
    while db is not None and not raters.done():
        started = time.perf_counter()
        _, read = await asyncio.to_thread(studydb.export_ratings, db, db.with_name("export.parquet"))
        results["export_seconds"].append(time.perf_counter() - started)
        results["exports_from_snapshot"] += read.from_snapshot
        await asyncio.wait([raters], timeout=EXPORT_EVERY_SECONDS)
    await raters
    return results


def summarize(results: dict) -> dict:
    latencies_ms = [1000 * s for s in results["latencies"]]
    return {
        "saves_measured": len(latencies_ms),
        "median_ms": round(statistics.median(latencies_ms), 1),
        "p95_ms": round(percentile(latencies_ms, 95), 1),
        "max_ms": round(max(latencies_ms), 1),
        "exports_during_load": len(results["export_seconds"]),
        "exports_from_snapshot": results["exports_from_snapshot"],
        "export_max_seconds": round(max(results["export_seconds"]), 3) if results["export_seconds"] else None,
    }


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--saves", type=int, default=10, help="saves per rater")
    parser.add_argument("--size", type=int, default=512, help="generated image size in pixels")
    parser.add_argument(
        "--think-seconds", type=float, default=2.0,
        help="mean pause before each save in the paced run (real raters take ~20 s per item; 2 s is 10x denser)",
    )
    parser.add_argument("--out", default="results/bench/rating_app.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="rating_bench_"))
    manifest = sample.write_sample_manifest(workdir / "generation", n_prompts=6, seeds=(11, 12), size=args.size)
    references = sample.write_sample_references(workdir / "references", count=3, size=args.size)
    db = workdir / "study.duckdb"
    names = [f"rater{i:02d}" for i in range(args.raters)]
    links = study.create_study(manifest, db, names, reference_images=references, qc_retest=0, qc_attention=0)
    tokens = [token for _, token, _ in links]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(serve.streamlit_command("127.0.0.1", port), env=serve.streamlit_env(db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(base_url, server)
        # One rater alone first, so first-request costs (imports, image encoding cache) are not counted.
        asyncio.run(run_raters(base_url, tokens[:1], 1, 0.0))
        # Paced: raters think before each save. Burst: every rater saves again the moment the next item is there.
        paced = asyncio.run(run_raters(base_url, tokens, args.saves, args.think_seconds, db))
        burst = asyncio.run(run_raters(base_url, tokens, args.saves, 0.0, db))
        time.sleep(2 * store.SNAPSHOT_INTERVAL_SECONDS)
        in_snapshot = studydb.read_study(db)  # from this process, while the app is serving
    finally:
        server.terminate()
        server.wait(timeout=30)
    in_db = studydb.read_study(db)  # the app has let go of the file
    rated = len(in_db.ratings())

    expected_rated = 2 * args.raters * args.saves + 1
    image_bytes = paced["item_image_bytes"] + burst["item_image_bytes"]
    report = {
        "benchmark": "rating_app_save_to_next_item",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "python": sys.version.split()[0],
        # Other work on the machine slows every number here; a load above the core count means it was busy.
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "raters": args.raters,
        "saves_per_rater": args.saves,
        "image_size": args.size,
        "paced": {"think_seconds_mean": args.think_seconds, **summarize(paced)},
        "burst": {"think_seconds_mean": 0.0, **summarize(burst)},
        "item_image_bytes_median": int(statistics.median(image_bytes)),
        "item_image_bytes_max": max(image_bytes),
        "first_item_bytes_with_references_median": int(statistics.median(paced["first_item_bytes"])),
        "rated_items_in_snapshot_while_serving": len(in_snapshot.ratings()),
        "snapshot_read_while_serving": in_snapshot.from_snapshot,
        "rated_items_in_db": rated,
        "rated_items_expected": expected_rated,
        "targets": {"paced_p95_ms": 300, "burst_p95_ms": 600, "image_bytes": 400_000},
    }
    report["meets_targets"] = (
        report["paced"]["p95_ms"] < 300 and report["burst"]["p95_ms"] < 600 and report["item_image_bytes_max"] < 400_000
        and rated == expected_rated == report["rated_items_in_snapshot_while_serving"]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not rated == expected_rated == report["rated_items_in_snapshot_while_serving"]:
        sys.exit(f"lost or duplicated ratings: {rated} in the database, {report['rated_items_in_snapshot_while_serving']} in the snapshot, expected {expected_rated}")


if __name__ == "__main__":
    main()
