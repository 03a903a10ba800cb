"""Benchmark: the pairwise preference analysis of 1,000,000 votes (target: under 5 s for the whole function).

4 arms (all 6 pairs) × 4 dimensions × 10 raters × 4,000 prompt × seed units (400 prompts × 10 seeds) =
960,000 first votes, plus 40,000 swapped-side repeats = 1,000,000 rows, simulated and written as CSV first
(not timed). Timed: `analyze_pairwise(csv, out)` as one call (read + validate + counts, sign tests,
Bradley–Terry with 2,000 unit-bootstrap resamples, agreement, plot, CSV/Markdown/LaTeX/JSON/HTML), the same
on the in-memory table, the whole process (`python -c` importing fangzhi and running the call, so
interpreter start and imports are included), and a process that only imports the module.

    .venv/bin/python bench/pairwise_bench.py

Writes results/bench/pairwise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fangzhi.evaluate.pairwise import analyze_pairwise
from fangzhi.evaluate.pairwise_power import simulate_pairwise_votes

ARMS = ("base", "lora@0.5", "lora@0.75", "lora@1.0")
ELO = {"base": 1000.0, "lora@0.5": 1030.0, "lora@0.75": 1060.0, "lora@1.0": 1050.0}


def timed_process(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400, help="prompts (400 × 10 seeds gives 1,000,000 votes)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", default="results/bench", help="folder for the JSON")
    args = parser.parse_args()

    n_raters, seeds = 10, 10
    votes = simulate_pairwise_votes(n_raters, args.prompts, seeds, arms=ARMS, elo=ELO, tie_share=0.25, unit_sd=40.0, repeat_share=1 / 24, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "votes.csv"
        votes.to_csv(path, index=False)

        load_before = os.getloadavg()[0]
        start, start_cpu = time.perf_counter(), time.process_time()
        result = analyze_pairwise(path, Path(tmp) / "from_file", n_boot=args.bootstrap, seed=0, title_note="benchmark")
        file_seconds = time.perf_counter() - start
        file_cpu_seconds = time.process_time() - start_cpu

        start = time.perf_counter()
        analyze_pairwise(votes, Path(tmp) / "from_frame", n_boot=args.bootstrap, seed=0, title_note="benchmark")
        frame_seconds = time.perf_counter() - start

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
        call = f"from fangzhi.evaluate.pairwise import analyze_pairwise; analyze_pairwise({str(path)!r}, {str(Path(tmp) / 'process')!r}, n_boot={args.bootstrap})"
        process_seconds = timed_process(call, env)
        # The import alone: `fangzhi.evaluate`'s package __init__ imports the CLIP modules (torch, diffusers).
        import_seconds = timed_process("import fangzhi.evaluate.pairwise", env)

    strengths = result.strengths.loc[result.strengths["dimension"] == "style"]
    summary = {
        "benchmark": "pairwise_bench",
        "n_votes": len(votes),
        "design": {"arms": list(ARMS), "raters": n_raters, "prompts": args.prompts, "seeds_per_prompt": seeds, "repeat_share": 1 / 24},
        "analyze_pairwise_from_csv_seconds": round(file_seconds, 3),
        "analyze_pairwise_from_csv_cpu_seconds": round(file_cpu_seconds, 3),
        "analyze_pairwise_from_dataframe_seconds": round(frame_seconds, 3),
        "whole_process_seconds": round(process_seconds, 3),
        "import_only_process_seconds": round(import_seconds, 3),
        # Other jobs on the machine inflate wall time; the 1-minute load average shows how busy it was.
        "load_average_1min_before": round(load_before, 2),
        "target_seconds": 5.0,
        "meets_target": file_seconds < 5.0,
        "bootstrap_resamples": args.bootstrap,
        "style_elo": dict(zip(strengths["arm"], strengths["elo"].round(1))),
        "simulated_elo": ELO,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(), "processor": platform.processor()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairwise.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
