"""Start the Streamlit rating app on a study database (what `fangzhi rate` runs), and stop it cleanly.

Streamlit runs as a child in its own process group: SIGINT or SIGTERM to `fangzhi rate` stops that
whole group (Streamlit and anything it started), so the port is free again within seconds and no
orphan keeps serving; signals after the first (GNU timeout and systemd send more than one) change
nothing. Streamlit's `/_stcore/health` answers `ok` once the app can take raters; a reverse proxy or
systemd can poll it, and `fangzhi rate` prints a line when it first does. The study file, the host
and the port are checked before Streamlit starts, so a mistake in them is a message, not a server
that never works.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pydantic import Field, field_validator

from fangzhi.config import StrictModel
from fangzhi.errors import FangzhiError
from fangzhi.rating_app import study
from fangzhi.studydb.connection import require_study_file

# The app (app.py) with the route that serves its images to one session each.
APP_SCRIPT = Path(__file__).with_name("asgi.py")
# The app reads these from its environment, not from its command line, which Streamlit sends to the browser.
DB_ENV = "FANGZHI_RATING_DB"
BASE_URL_ENV = "FANGZHI_BASE_URL"
LINKS_ENV = "FANGZHI_LINKS_FILE"
HEALTH_PATH = "_stcore/health"
STOP_GRACE_SECONDS = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How soon a stop signal or Streamlit's own exit is noticed.
POLL_SECONDS = 0.2


class RateConfig(StrictModel):
    db: Path = Field(description="study database from `fangzhi study create`")
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for a network")
    port: int = Field(8501, ge=1, le=65535)
    base_url: str | None = Field(
        None, description="where raters reach the app (e.g. https://rating.example.org/study); for new raters' links "
        "and, when it has a path, the path the app is served under. Default http://localhost:PORT",
    )
    links_out: Path | None = Field(None, description="CSV that new raters' links are appended to (default: DB with .links.csv)")

    @field_validator("base_url")
    @classmethod
    def _http_with_host(cls, base_url: str | None) -> str | None:
        # Without a scheme urlparse reads the host as a path, and the app would serve under it.
        parts = urllib.parse.urlparse(base_url) if base_url else None
        if parts and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(
                f"--base-url {base_url}: give the address raters open, with http:// or https:// and a host, "
                "e.g. https://rating.example.org/study"
            )
        return base_url

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


def require_free_port(host: str, port: int) -> None:
    """Bind the address as Streamlit will, so that a busy port or a bad --host is a clear error before
    anything starts, not Streamlit's exit 1 or traceback (or a 'ready' line answered by the app already there)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            # As Streamlit: connections to an earlier server that are still closing do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((host, port))
    except socket.gaierror:
        raise FangzhiError(
            f"--host {host}: no such address; give a name or IP address of this machine (127.0.0.1, or 0.0.0.0 for every network)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FangzhiError(f"port {port} on {host} is in use; choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise FangzhiError(
                f"--host {host} is not an address of this machine; give one of its own, 127.0.0.1, or 0.0.0.0 for every network"
            ) from None
        if exc.errno == errno.EACCES:
            raise FangzhiError(f"port {port} on {host} needs administrator rights; choose a --port above 1023") from None
        raise FangzhiError(f"cannot listen on {host} port {port} ({exc.strerror}); check --host and --port") from None


def streamlit_env(db: str | Path, base_url: str | None = None, links_file: str | Path | None = None) -> dict[str, str]:
    db = require_study_file(Path(db).resolve(), "--db takes the .duckdb file that `fangzhi study create` wrote")
    env = {**os.environ, DB_ENV: str(db)}
    if base_url:
        env[BASE_URL_ENV] = base_url
    if links_file:
        env[LINKS_ENV] = str(Path(links_file).resolve())
    return env


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
    """Run the app in the foreground until it exits or SIGINT/SIGTERM/SIGHUP arrives; returns the exit status
    (0 when stopped by a signal). After a stop signal the process ignores further ones: it is on its way out."""
    env = streamlit_env(config.db, config.public_url, config.links_file)
    require_free_port(config.host, config.port)
    command = streamlit_command(config.host, config.port, config.url_path)
    local_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    local_url = f"http://{local_host}:{config.port}" + (f"/{config.url_path}" if config.url_path else "")
    print(f"starting the rating app on {config.host}:{config.port} ...", flush=True)
    # The handler only records the signal: an exception raised from it could land anywhere, also
    # between starting Streamlit and keeping its handle, or in the cleanup, and leave Streamlit running.
    stop_requested: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop_requested.append(signum)) for sig in STOP_SIGNALS}
    child = None
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
        announced = False
        while child.poll() is None and not stop_requested:
            if not announced and is_healthy(local_url):
                print(f"ready: raters' links start with {config.public_url}/ ; admin page {config.public_url}/?page=admin ; "
                      f"health check {local_url}/{HEALTH_PATH} (Ctrl+C stops)", flush=True)
                announced = True
            time.sleep(POLL_SECONDS)
        return 0 if stop_requested else child.returncode
    finally:
        if child is not None:
            stop_process_group(child)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if stop_requested else handler)
