"""`fangzhi demo` end to end at toy size: every artifact exists and agrees with the others."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import yaml

from fangzhi.cli import main
from fangzhi.config import load_config
from fangzhi.demo import DemoConfig

ROOT = Path(__file__).resolve().parent.parent


def small_config(tmp_path: Path) -> Path:
    config = {
        "out": str(tmp_path / "demo"),  # no `base`: the tiny base goes to OUT/base
        "train": {"data": {"resolution": 64, "repeats": 1}, "lora": {"rank": 4, "alpha": 4}, "max_steps": 6, "learning_rate": 1e-3},
        "generate": {"limit_prompts": 3, "seeds": [0, 1], "steps": 3, "width": 64, "height": 64},
        "study": {"raters": ["ana", "bo"], "qc_retest": 1, "qc_attention": 1},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_demo_artifacts_are_complete_and_consistent(tmp_path: Path, capsys):
    config = small_config(tmp_path)
    assert main(["demo", "--config", str(config), "--simulate-ratings"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "demo"
    assert f"fangzhi rate --db {out / 'study.duckdb'}" in printed and "fangzhi analyze --db" in printed

    for artifact in ("base/model_index.json", "lora/pytorch_lora_weights.safetensors", "lora/loss.png", "clip/clip_scores.csv", "clip/clip_table.md",
                     "rater_links.csv", "report.md", "analysis/report.html", "analysis/table2.md"):
        assert (out / artifact).is_file(), artifact

    manifest = read_jsonl(out / "images" / "manifest.jsonl")
    assert len(manifest) == 3 * 2 * 2  # prompts x seeds x arms
    assert {row["arm"] for row in manifest} == {"base", "lora"}
    for row in manifest:
        assert (out / "images" / row["file"]).is_file()
    assert len(list((out / "images" / "contact_sheets").glob("*.png"))) == 3

    with duckdb.connect(str(out / "study.duckdb"), read_only=True) as con:
        db_images = {row[0] for row in con.execute("SELECT image_id FROM images").fetchall()}
        raters = {row[0] for row in con.execute("SELECT name FROM raters").fetchall()}
        unrated = con.execute(
            "SELECT count(*) FROM assignments a WHERE NOT EXISTS (SELECT 1 FROM scores s WHERE s.rater_id = a.rater_id AND s.position = a.position)"
        ).fetchone()[0]
    assert db_images == {row["image_id"] for row in manifest}
    assert raters == {"ana", "bo"} and unrated == 0

    clip_ids = {line.split(",")[0] for line in (out / "clip" / "clip_scores.csv").read_text().splitlines()[1:]}
    assert clip_ids == db_images

    table = (out / "analysis" / "table2.md").read_text()
    assert "simulated" in table.lower()
    assert "simulated" in (out / "report.md").read_text().lower()
    results = json.loads((out / "analysis" / "results.json").read_text())
    assert "simulated" in json.dumps(results).lower()


def test_rerun_reuses_finished_stages_and_fresh_starts_over(tmp_path: Path, capsys):
    config = small_config(tmp_path)
    assert main(["demo", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["demo", "--config", str(config)]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("reused") == 6, rerun
    lora = tmp_path / "demo" / "lora" / "pytorch_lora_weights.safetensors"
    before = lora.stat().st_mtime_ns
    first_links = (tmp_path / "demo" / "rater_links.csv").read_bytes()
    assert main(["demo", "--config", str(config), "--fresh"]) == 0
    assert "reused" not in capsys.readouterr().out
    assert lora.stat().st_mtime_ns != before
    # The first study is kept aside with its links (its database cannot give them again).
    [kept_links] = (tmp_path / "demo").glob("rater_links-*.csv")
    assert kept_links.read_bytes() == first_links != (tmp_path / "demo" / "rater_links.csv").read_bytes()
    assert len(list((tmp_path / "demo").glob("study-*.duckdb"))) == 1


def test_without_the_flag_no_rating_is_invented(tmp_path: Path):
    config = small_config(tmp_path)
    assert main(["demo", "--config", str(config)]) == 0
    with duckdb.connect(str(tmp_path / "demo" / "study.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 0
    assert not (tmp_path / "demo" / "analysis").exists()


def test_tiny_yaml_spells_out_the_embedded_defaults():
    assert load_config(DemoConfig, ROOT / "configs" / "tiny.yaml") == DemoConfig()


def test_paper_config_fails_fast_without_gpu_or_weights(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--config", str(ROOT / "configs" / "paper.yaml")]) == 2
    err = capsys.readouterr().err
    assert "GPU" in err or "stable-diffusion-v1-5" in err
    assert not (tmp_path / "results").exists(), "nothing is written before the check"


def test_stage_commands_read_their_section_of_a_study_config():
    from fangzhi.generate.config import GenerateConfig
    from fangzhi.train import TrainConfig

    paper = ROOT / "configs" / "paper.yaml"
    train = load_config(TrainConfig, paper, section="train")
    generate = load_config(GenerateConfig, paper, section="generate")
    assert train.base == generate.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (train.epochs, train.batch_size, train.data.resolution, train.optimizer) == (15, 2, 512, "adamw8bit")
    assert (generate.steps, generate.guidance_scale, generate.width, generate.seeds) == (35, 7.0, 512, [0, 1, 2, 3])


def test_pairwise_demo_analyses_simulated_votes_on_the_generated_images(tmp_path: Path, capsys):
    config = small_config(tmp_path)
    assert main(["demo", "--config", str(config), "--mode", "pairwise"]) == 2
    assert "--mode pairwise needs --simulate-ratings" in capsys.readouterr().err
    assert main(["demo", "--config", str(config), "--mode", "pairwise", "--simulate-ratings"]) == 0
    out = tmp_path / "demo"
    manifest = read_jsonl(out / "images" / "manifest.jsonl")
    votes = (out / "pairwise" / "simulated_votes.csv").read_text().splitlines()
    assert votes[0] == "rater,prompt,seed,dimension,left,right,choice"
    units = {(row["prompt_id"], row["seed"]) for row in manifest}
    first_votes = 2 * len(units) * 1 * 4  # raters x units x arm pairs x dimensions
    assert len(votes) - 1 == first_votes + round(0.1 * first_votes)
    assert {(line.split(",")[1], int(line.split(",")[2])) for line in votes[1:]} == units
    table = (out / "pairwise_analysis" / "pairwise_table.md").read_text()
    assert "(simulated)" in table and "base = 1000" in table
    report = (out / "report.md").read_text()
    assert "SIMULATED side-by-side votes" in report and "1000 (reference)" in report
    assert not (out / "analysis").exists()
