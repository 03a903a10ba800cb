"""Peak temporary disk the test suite needs: CI machines have little free disk, and a test that fills it fails.

Runs pytest (the arguments after `--`, default: the SD v1.5-size tests, the largest writers) with its temporary
folders under one directory of our own, samples that directory's size every half second, and writes
results/bench/test_disk.json with the peak and what was left when pytest ended.

    python bench/test_disk.py                    # the sd15-random tests
    python bench/test_disk.py -- -m "not slow"   # any pytest selection
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench"
SD15_TESTS = ["tests/test_sd15_random.py", "tests/test_single_file.py::test_sd15_single_file_with_ldm_key_names_loads_offline"]


def tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # removed between listing and stat: a test cleaning up
    return total


def measure(pytest_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fangzhi-disk-") as scratch:
        # pytest's own default root, under a folder we can measure; keeps its retention policy (no --basetemp).
        env = dict(os.environ, PYTEST_DEBUG_TEMPROOT=scratch)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], tree_bytes(Path(scratch)))

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], env=env)
        stop.set()
        sampler.join()
        left = tree_bytes(Path(scratch))
    return {
        "pytest_args": pytest_args,
        "exit_code": result.returncode,
        "peak_gb": round(max(peak[0], left) / 1e9, 2),
        "left_after_gb": round(left / 1e9, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the sd15-random tests)")
    parser.add_argument("--out", default=str(RESULTS / "test_disk.json"))
    args = parser.parse_args()
    report = measure(args.pytest_args or SD15_TESTS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.exit(report["exit_code"])


if __name__ == "__main__":
    main()
