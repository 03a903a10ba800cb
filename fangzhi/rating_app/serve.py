"""Start the Streamlit rating app on a study database (what `fangzhi rate` runs), and stop it cleanly.

Streamlit runs as a child in its own process group: SIGINT or SIGTERM to `fangzhi rate` stops that
whole group (Streamlit and anything it started), so the port is free again within seconds and no
orphan keeps serving. Streamlit's `/_stcore/health` answers `ok` once the app can take raters; a
reverse proxy or systemd can poll it, and `fangzhi rate` prints a line when it first does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pydantic import Field

from fangzhi.config import StrictModel
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import study

# The app (app.py) with the route that serves its images to one session each.
APP_SCRIPT = Path(__file__).with_name("asgi.py")
# The app reads these from its environment, not from its command line, which Streamlit sends to the browser.
DB_ENV = "FANGZHI_RATING_DB"
BASE_URL_ENV = "FANGZHI_BASE_URL"
LINKS_ENV = "FANGZHI_LINKS_FILE"
HEALTH_PATH = "_stcore/health"
STOP_GRACE_SECONDS = 5.0


class RateConfig(StrictModel):
    db: Path = Field(description="study database from `fangzhi study create`")
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for a network")
    port: int = Field(8501, ge=1, le=65535)
    base_url: str | None = Field(
        None, description="where raters reach the app (e.g. https://rating.example.org/study); for new raters' links "
        "and, when it has a path, the path the app is served under. Default http://localhost:PORT",
    )
    links_out: Path | None = Field(None, description="CSV that new raters' links are appended to (default: DB with .links.csv)")

    @property
    def public_url(self) -> str:
        return (self.base_url or f"http://localhost:{self.port}").rstrip("/")

    @property
    def url_path(self) -> str:
        return urllib.parse.urlparse(self.public_url).path.strip("/")

    @property
    def links_file(self) -> Path:
        return study.links_file(self.db, self.links_out)


def streamlit_command(host: str = "127.0.0.1", port: int = 8501, url_path: str = "") -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.address", host,
        "--server.port", str(port),
        "--server.baseUrlPath", url_path,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        # A traceback in the browser could show server paths; raters see only a generic error.
        "--client.showErrorDetails", "none",
        "--client.toolbarMode", "minimal",
        "--global.developmentMode", "false",
        # Streamlit otherwise runs a full gc.collect() after every script run: with pandas, duckdb and
        # PIL loaded that is ~60 ms of the GIL per Save & next, more than the run itself. Python's
        # automatic collection still runs.
        "--runner.postScriptGC", "false",
        # Images are handed only to the browser holding the session's XSRF cookie (media_access.py).
        "--server.enableXsrfProtection", "true",
    ]


def streamlit_env(db: str | Path, base_url: str | None = None, links_file: str | Path | None = None) -> dict[str, str]:
    db = Path(db).resolve()
    if not db.is_file():
        raise FangzhiError(f"{db}: no rating study here (create one with `fangzhi study create`)")
    env = {**os.environ, DB_ENV: str(db)}
    if base_url:
        env[BASE_URL_ENV] = base_url
    if links_file:
        env[LINKS_ENV] = str(Path(links_file).resolve())
    return env


class _StopRequested(Exception):
    pass


def _raise_stop(signum, _frame) -> None:
    raise _StopRequested(signum)


def stop_process_group(child: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to the child's whole group, SIGKILL to whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the child is gone; end any grandchild still in its group
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def is_healthy(local_url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{local_url}/{HEALTH_PATH}", timeout=2).read() == b"ok"
    except OSError:  # refused, reset, timed out (URLError is one too)
        return False


def serve(config: RateConfig) -> int:
    """Run the app in the foreground until it exits or SIGINT/SIGTERM arrives; returns the exit status."""
    env = streamlit_env(config.db, config.public_url, config.links_file)
    command = streamlit_command(config.host, config.port, config.url_path)
    local_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    local_url = f"http://{local_host}:{config.port}" + (f"/{config.url_path}" if config.url_path else "")
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in handled}
    child = None
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
        while child.poll() is None and not is_healthy(local_url):
            time.sleep(0.3)
        if child.poll() is None:
            print(f"ready: raters' links start with {config.public_url}/ ; admin page {config.public_url}/?page=admin ; "
                  f"health check {local_url}/{HEALTH_PATH} (Ctrl+C stops)", flush=True)
        return child.wait()
    except _StopRequested:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child is not None:
            stop_process_group(child)
