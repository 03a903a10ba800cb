"""`fangzhi demo`: the whole study in one command — base, LoRA, paired images, CLIP scores, rating study, report.

Each stage's output sits in its own folder under `out`, and a stage is rerun only when its settings
or an upstream stage changed (a hash of both is kept in `out/.stages/`). The embedded defaults are
the offline tiny run (configs/tiny.yaml spells them out); configs/paper.yaml is SD v1.5 with the
paper's settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, model_validator

from fangzhi.config import StrictModel, save_config
from fangzhi.data import DEMO_DATASET
from fangzhi.errors import FangzhiError
from fangzhi.generate.config import GenerateConfig
from fangzhi.train.config import TrainConfig

TINY_BASE = "results/demo/base"
# What --fresh leaves in place: rating studies and their invitation links (the study stage keeps an earlier one aside).
KEPT_BY_FRESH = ("study*.duckdb*", "rater_links*.csv")
DEMO_RATERS = ["rater-1", "rater-2", "rater-3", "rater-4"]


def _tiny_train() -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"resolution": 64, "repeats": 4, "random_flip": True},
            "lora": {"rank": 4, "alpha": 4},
            "epochs": 10,
            "learning_rate": 1e-3,
            "checkpoint_every": 40,
        }
    )


def _tiny_generate() -> GenerateConfig:
    return GenerateConfig.model_validate(
        {"seeds": [0, 1, 2, 3], "steps": 20, "width": 64, "height": 64}
    )


class ClipSettings(StrictModel):
    model: str | None = Field(default=None, description="open_clip model name; null builds a tiny random CLIP offline (numbers then only test the plumbing)")
    pretrained: str = Field(default="openai", description="open_clip pretrained tag, or a local checkpoint file/folder")
    reference_images: str = Field(default=str(DEMO_DATASET), description="style references for the style-similarity score")


class StudySettings(StrictModel):
    raters: list[str] = Field(default=DEMO_RATERS, description="rater names; each gets a secret invitation link")
    lang: str = Field(default="zh", description="default UI language of the rating app (zh or en)")
    qc_retest: int = Field(default=2, ge=0, description="items each rater sees twice (test–retest)")
    qc_attention: int = Field(default=1, ge=0, description="attention-check items per rater")
    reference_images: str = Field(default=str(DEMO_DATASET), description="paintings shown beside each item as the target style")


class DemoConfig(StrictModel):
    out: str = Field(default="results/demo", description="every artifact of the run goes here")
    base: str = Field(
        default=TINY_BASE,
        description="base model for training and generation (Hub id, folder or checkpoint); not given, with build_tiny_base and "
        "another `out`: OUT/base, so that the run's folder holds everything it made",
    )
    base_config: str | None = Field(default=None, description="for a single-file base: the diffusers folder or Hub id whose configs describe it")
    build_tiny_base: bool = Field(default=True, description="write the tiny offline base to `base` first (the offline demo)")
    require_gpu: bool = Field(default=False, description="stop before any work when no CUDA GPU is present (full-size runs)")
    train: TrainConfig = Field(default_factory=_tiny_train)
    generate: GenerateConfig = Field(default_factory=_tiny_generate)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    study: StudySettings = Field(default_factory=StudySettings)

    @model_validator(mode="after")
    def _one_base_for_every_stage(self) -> "DemoConfig":
        if self.build_tiny_base and "base" not in self.model_fields_set:
            self.base = str(Path(self.out) / "base")
        self.train.base, self.train.base_config = self.base, self.base_config
        self.generate.base, self.generate.base_config = self.base, self.base_config
        return self


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Runs named stages in order, reusing a stage whose key (its settings + upstream keys) is unchanged."""

    def __init__(self, out: Path, total: int) -> None:
        self.folder = out / ".stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.total = total
        self.done = 0
        self.upstream = ""

    def run(self, name: str, settings: Any, work: Callable[[], Any]) -> None:
        self.done += 1
        key = _digest(self.upstream, settings)
        marker = self.folder / f"{name}.json"
        started = time.perf_counter()
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            print(f"[{self.done}/{self.total}] {name}: reused (settings unchanged)", flush=True)
        else:
            print(f"[{self.done}/{self.total}] {name} ...", flush=True)
            marker.unlink(missing_ok=True)
            work()
            marker.write_text(json.dumps({"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            print(f"[{self.done}/{self.total}] {name}: done in {time.perf_counter() - started:.1f} s", flush=True)
        self.upstream = key


def check_prerequisites(cfg: DemoConfig) -> None:
    """Fail before any work when a full-size run cannot succeed here."""
    import torch

    from fangzhi.models import base_available

    if cfg.require_gpu and not torch.cuda.is_available():
        raise FangzhiError("this config needs a CUDA GPU (require_gpu: true) and none is visible; run it on a GPU machine, or run `fangzhi demo` without --config for the offline CPU demo")
    if not cfg.build_tiny_base:
        problem = base_available(cfg.base, cfg.base_config)
        if problem:
            raise FangzhiError(problem)


def run_demo(cfg: DemoConfig, simulate_ratings: bool = False, fresh: bool = False, mode: str = "absolute") -> Path:
    """Run every stage of the study; returns the output folder.

    `mode` 'pairwise' (with `simulate_ratings`) analyses SIMULATED side-by-side votes on the generated
    images instead of simulated 1–5 scores.
    """
    if mode not in ("absolute", "pairwise"):
        raise FangzhiError(f"demo mode {mode!r}: choose absolute or pairwise")
    if mode == "pairwise" and not simulate_ratings:
        raise FangzhiError(
            "demo --mode pairwise needs --simulate-ratings (it analyses simulated votes); for a real side-by-side study use `fangzhi study create --mode pairwise`"
        )
    check_prerequisites(cfg)
    out = Path(cfg.out)
    if fresh and out.exists():
        for made in out.iterdir():
            if not any(made.match(pattern) for pattern in KEPT_BY_FRESH):
                shutil.rmtree(made) if made.is_dir() else made.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stages = _Stages(out, total=7 if simulate_ratings else 6)
    lora_dir, images_dir = out / "lora", out / "images"
    manifest = images_dir / "manifest.jsonl"
    clip_csv = out / "clip" / "clip_scores.csv"
    study_db = out / "study.duckdb"

    def build_base() -> None:
        if cfg.build_tiny_base:
            from fangzhi.models import build_tiny_base

            build_tiny_base(cfg.base)

    def train_lora() -> None:
        from fangzhi.train import train

        shutil.rmtree(lora_dir, ignore_errors=True)
        train(cfg.train.model_copy(update={"output_dir": str(lora_dir), "resume": None}))

    def generate_images() -> None:
        from fangzhi.generate import generate
        from fangzhi.generate.config import LoraArm

        shutil.rmtree(images_dir, ignore_errors=True)
        generate(cfg.generate.model_copy(update={"out": str(images_dir), "loras": [LoraArm(path=str(lora_dir))]}))

    def score_clip() -> None:
        from fangzhi.evaluate.clip_score import ClipScoreConfig, run_clip_score
        from fangzhi.models.clip import build_tiny_clip

        model, pretrained = cfg.clip.model, cfg.clip.pretrained
        if model is None:
            model, pretrained = "tiny", str(build_tiny_clip(out / "clip" / "tiny-clip"))
        run_clip_score(ClipScoreConfig(manifest=manifest, out=out / "clip", reference_images=cfg.clip.reference_images, model=model, pretrained=pretrained))

    def create_rating_study() -> None:
        from fangzhi.rating_app.study import create_study

        links = out / "rater_links.csv"
        # A study from an earlier run is kept aside, never deleted: its ratings, and its links (which it cannot give again).
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if study_db.exists():
            study_db.rename(study_db.with_name(f"study-{stamp}.duckdb"))
        if links.exists():
            links.rename(links.with_name(f"rater_links-{stamp}.csv"))
        create_study(manifest, study_db, cfg.study.raters, cfg.study.reference_images, cfg.study.lang,
                     cfg.study.qc_retest, cfg.study.qc_attention, links_out=links)

    def simulate_and_analyze() -> None:
        from fangzhi.evaluate.analyze import AnalyzeConfig, analyze

        fill_study_with_simulated_ratings(study_db)
        analyze(AnalyzeConfig(db=study_db, out=out / "analysis", clip=clip_csv, title_note="simulated"))

    def simulate_and_analyze_votes() -> None:
        from fangzhi.evaluate.pairwise import analyze_pairwise

        votes = out / "pairwise" / "simulated_votes.csv"
        votes.parent.mkdir(parents=True, exist_ok=True)
        simulated_pairwise_votes(manifest, cfg.study.raters).to_csv(votes, index=False)
        analyze_pairwise(votes, out / "pairwise_analysis", title_note="simulated")

    stages.run("base", [cfg.base, cfg.build_tiny_base], build_base)
    stages.run("train", cfg.train.model_dump(mode="json"), train_lora)
    stages.run("generate", cfg.generate.model_dump(mode="json"), generate_images)
    stages.run("clip", cfg.clip.model_dump(mode="json"), score_clip)
    stages.run("study", cfg.study.model_dump(mode="json"), create_rating_study)
    if simulate_ratings and mode == "pairwise":
        stages.run("simulated pairwise votes + analysis", "simulated pairwise", simulate_and_analyze_votes)
    elif simulate_ratings:
        stages.run("simulated ratings + analysis", "simulated", simulate_and_analyze)
    stages.run("report", [simulate_ratings, mode], lambda: write_demo_report(out, simulate_ratings, mode))
    print_next_steps(out, study_db)
    return out


def fill_study_with_simulated_ratings(db: Path, effect: float = 0.5, seed: int = 0) -> int:
    """Give every rater's every item synthetic scores, through the rating app's own save path.

    Main items get scores from the analysis' simulation model (the LoRA arm shifted by `effect`);
    a retest repeats the rater's first score of that image; an attention item gets the asked-for score.
    """
    from fangzhi.dimensions import DIMENSION_KEYS
    from fangzhi.evaluate.power import simulate_ratings
    from fangzhi.rating_app.store import add_ratings, list_assignments

    assignments = list_assignments(db)
    raters = list(dict.fromkeys(assignments["rater"]))
    arms = sorted(assignments["arm"].unique(), key=lambda arm: (arm != "base", arm))
    simulated = simulate_ratings(len(raters), sorted(assignments["prompt"].unique()), sorted(assignments["seed"].unique()), arms, effect, seed)
    simulated["rater"] = simulated["rater"].map({f"r{i:02d}": name for i, name in enumerate(raters)})
    scores = simulated.set_index(["rater", "arm", "prompt", "seed"])[list(DIMENSION_KEYS)]
    rows = []
    for item in assignments.itertuples():
        if item.kind == "attention":
            values = dict.fromkeys(DIMENSION_KEYS, int(item.expected))
        else:
            values = scores.loc[(item.rater, item.arm, item.prompt, item.seed)].to_dict()
        rows.append({"rater": item.rater, "position": int(item.position), **values, "seconds": 20.0})
    return add_ratings(db, rows)


def simulated_pairwise_votes(manifest: Path, raters: list[str], seed: int = 0):
    """SIMULATED side-by-side votes: every rater judges every arm pair of every (prompt, seed) of the manifest
    on every dimension, sides random, each LoRA arm 60 Elo above the one before (base first), 20% ties and
    10% swapped-side repeats."""
    from fangzhi.evaluate.pairwise_power import simulate_pairwise_votes
    from fangzhi.generate.manifest import read_manifest

    records = read_manifest(manifest)
    arms = sorted({str(r["arm"]) for r in records}, key=lambda arm: (arm != "base", arm))
    units = {(str(r["prompt_id"]), int(r["seed"])) for r in records}
    votes = simulate_pairwise_votes(
        len(raters), sorted({p for p, _ in units}), sorted({s for _, s in units}), arms,
        elo={arm: 1000.0 + 60.0 * i for i, arm in enumerate(arms)}, repeat_share=0.1, seed=seed,
    )
    votes["rater"] = votes["rater"].map({f"r{i:02d}": name for i, name in enumerate(raters)})
    in_manifest = [(p, s) in units for p, s in zip(votes["prompt"], votes["seed"])]  # prompts may have different seeds
    return votes.loc[in_manifest].reset_index(drop=True)


def write_demo_report(out: Path, simulated: bool, mode: str = "absolute") -> Path:
    """results/demo/report.md: what each stage produced, with links to the pictures and tables."""
    clip_table = (out / "clip" / "clip_table.md").read_text(encoding="utf-8") if (out / "clip" / "clip_table.md").exists() else "(not computed)"
    sheets = sorted((out / "images" / "contact_sheets").glob("*.png"))
    lines = [
        "# fangzhi demo report" + (" (simulated ratings)" if simulated else ""),
        "",
        "## Training",
        "",
        "![loss curve](lora/loss.png)",
        "",
        "## Paired images (base | LoRA, same seed and text)",
        "",
        *[f"![{sheet.stem}]({sheet.relative_to(out)})" for sheet in sheets],
        "",
        "## CLIP scores",
        "",
        clip_table,
        "",
        "## Rating study",
        "",
        "Invitation links: `rater_links.csv` (keep it private).",
    ]
    if simulated and mode == "pairwise":
        table = (out / "pairwise_analysis" / "pairwise_table.md").read_text(encoding="utf-8")
        lines += [
            "", "## Pairwise preference analysis (SIMULATED side-by-side votes, not real judgements)", "",
            "Votes: `pairwise/simulated_votes.csv`.", "", table, "", "See [pairwise_analysis/pairwise_report.html](pairwise_analysis/pairwise_report.html).",
        ]
    elif simulated:
        lines += ["", "## Human-rating analysis (SIMULATED ratings, not real judgements)", "", "See [analysis/report.html](analysis/report.html)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def print_next_steps(out: Path, study_db: Path) -> None:
    print(f"\nAll artifacts are in {out}/ (report: {out / 'report.md'}).")
    print("Next steps:")
    print(f"  fangzhi rate --db {study_db}                      # start the rating app; links in {out / 'rater_links.csv'}")
    print(f"  fangzhi analyze --db {study_db} --clip {out / 'clip' / 'clip_scores.csv'} --out {out / 'analysis'}")
