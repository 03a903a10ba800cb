"""Benchmark: the whole ratings analysis on 1,000,000 ratings in the wide format (target: under 5 s).

10 raters × 2 arms × 500 prompts × 100 seeds = 1,000,000 rows, simulated and written as CSV first
(not timed). Timed: reading + validating the CSV, and the full `analyze` run (wall and CPU seconds) (table, paired tests with
10,000 bootstrap resamples, reliability, breakdowns, plots, JSON, HTML) from the file.

    .venv/bin/python bench/analysis_bench.py [--rows-scale 1.0]

Writes results/bench/analysis_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from fangzhi.evaluate.analyze import AnalyzeConfig, analyze
from fangzhi.evaluate.power import simulate_ratings
from fangzhi.evaluate.ratings import read_ratings_file


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

        start = time.perf_counter()
        clean, _ = read_ratings_file(path)
        read_seconds = time.perf_counter() - start

        config = AnalyzeConfig(ratings=path, out=Path(tmp) / "analysis", bootstrap=10_000, seed=0, title_note="benchmark")
        load_before = os.getloadavg()[0]
        start, start_cpu = time.perf_counter(), time.process_time()
        analyze(config)
        analyze_seconds = time.perf_counter() - start
        analyze_cpu_seconds = time.process_time() - start_cpu
        report_mb = (Path(tmp) / "analysis" / "report.html").stat().st_size / 1e6

    result = {
        "benchmark": "analysis_bench",
        "n_ratings": len(clean),
        "design": {"raters": n_raters, "arms": 2, "prompts": n_prompts, "seeds_per_prompt": args.seeds},
        "read_validate_seconds": round(read_seconds, 3),
        "analyze_total_seconds": round(analyze_seconds, 3),
        "analyze_cpu_seconds": round(analyze_cpu_seconds, 3),
        # Other jobs on the machine inflate wall time; the 1-minute load average shows how busy it was.
        "load_average_1min_before": round(load_before, 2),
        "target_seconds": 5.0,
        "meets_target": analyze_seconds < 5.0,
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
