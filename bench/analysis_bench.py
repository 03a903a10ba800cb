"""Benchmark: `fangzhi analyze` on 1,000,000 ratings in the wide format, end to end (target: under 5 s).

10 raters × 2 arms × 500 prompts × 100 seeds = 1,000,000 rows, simulated and written as CSV first
(not timed). Timed: the whole command `python -m fangzhi analyze --ratings FILE --out DIR` in a fresh
process (interpreter start, imports, reading + validating the CSV, Table 2, paired tests at three
units with 10,000 bootstrap resamples each, reliability within arms and pooled, the mixed-model step,
breakdowns, plots, JSON, HTML), with its peak memory; then the same analysis in this process with
imports already done, to separate import time from work.

    .venv/bin/python bench/analysis_bench.py [--seeds 100]

Writes results/bench/analysis_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fangzhi.evaluate.analyze import AnalyzeConfig, analyze
from fangzhi.evaluate.power import simulate_ratings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="seeds per prompt (100 gives 1,000,000 ratings)")
    parser.add_argument("--out", default="results/bench", help="folder for the JSON")
    args = parser.parse_args()

    n_raters, n_prompts = 10, 500
    ratings = simulate_ratings(n_raters, n_prompts, args.seeds, arms=("base", "lora"), effect=0.2, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ratings.csv"
        ratings.to_csv(path, index=False)

        load_before = os.getloadavg()[0]
        command = [sys.executable, "-m", "fangzhi", "analyze", "--ratings", str(path), "--out", str(Path(tmp) / "cli"), "--title-note", "benchmark"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        command_seconds = time.perf_counter() - start
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds do not grow when other jobs share the cores, so they compare across busy runs.
        command_cpu_seconds = child.ru_utime + child.ru_stime
        peak_mb = child.ru_maxrss / 1024

        imports_command = [sys.executable, "-c", "import fangzhi.cli, fangzhi.evaluate.analyze"]
        start = time.perf_counter()
        subprocess.run(imports_command, check=True)
        import_seconds = time.perf_counter() - start

        config = AnalyzeConfig(ratings=path, out=Path(tmp) / "analysis", bootstrap=10_000, seed=0, title_note="benchmark")
        start, start_cpu = time.perf_counter(), time.process_time()
        analyze(config)
        analyze_seconds = time.perf_counter() - start
        analyze_cpu_seconds = time.process_time() - start_cpu
        report_mb = (Path(tmp) / "analysis" / "report.html").stat().st_size / 1e6

    result = {
        "benchmark": "analysis_bench",
        "n_ratings": len(ratings),
        "design": {"raters": n_raters, "arms": 2, "prompts": n_prompts, "seeds_per_prompt": args.seeds},
        "command": "python -m fangzhi analyze --ratings FILE --out DIR",
        "command_seconds": round(command_seconds, 3),
        "command_cpu_seconds": round(command_cpu_seconds, 3),
        "command_peak_rss_mb": round(peak_mb),
        "python_start_and_imports_seconds": round(import_seconds, 3),
        "analyze_function_seconds": round(analyze_seconds, 3),
        "analyze_function_cpu_seconds": round(analyze_cpu_seconds, 3),
        # Other jobs on the machine inflate wall time; the 1-minute load average shows how busy it was.
        "load_average_1min_before": round(load_before, 2),
        "target_seconds": 5.0,
        "meets_target": command_seconds < 5.0,
        "bootstrap_resamples": 10_000,
        "report_html_mb": round(report_mb, 2),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(), "processor": platform.processor()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis_bench.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
