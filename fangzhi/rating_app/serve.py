"""Start the Streamlit rating app on a study database (what `fangzhi rate` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fangzhi.errors import FangzhiError

APP_SCRIPT = Path(__file__).with_name("app.py")
# The app reads the database path from here, not from its command line, which Streamlit sends to the browser.
DB_ENV = "FANGZHI_RATING_DB"


def streamlit_command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.address", host,
        "--server.port", str(port),
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
    ]


def streamlit_env(db: str | Path) -> dict[str, str]:
    db = Path(db).resolve()
    if not db.is_file():
        raise FangzhiError(f"{db}: no rating study here (create one with `fangzhi study create`)")
    return {**os.environ, DB_ENV: str(db)}


def serve(db: str | Path, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the app in the foreground until interrupted; returns Streamlit's exit status."""
    return subprocess.call(streamlit_command(host, port), env=streamlit_env(db))
