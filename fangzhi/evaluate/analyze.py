"""`fangzhi analyze`: from ratings (study DB or wide file) to Table 2, paired tests, reliability and a report.

Everything is computed before anything is written, so bad input never leaves a half-written folder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import AliasChoices, Field, model_validator

from fangzhi.config import StrictModel
from fangzhi.errors import FangzhiError
from fangzhi.files import output_folder
from fangzhi.evaluate import power as power_mod
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.evaluate import mixed, reliability, report, stats, table
from fangzhi.evaluate.pairwise import analyze_pairwise, analyze_votes, write_pairwise
from fangzhi.evaluate.pairwise_votes import PAIRWISE_COLUMNS, file_columns, is_pairwise_file, validate_pairwise_votes
from fangzhi.evaluate.ratings import BadRows, main_ratings, read_ratings_file, validate_ratings
from fangzhi.studydb import StudyRead, attention_failures, pairwise_attention_failures, raters_failing_attention, read_study

# Every file the score analysis writes (files.output_folder clears an earlier run's before writing).
SCORE_FILES = (
    "table2.md", "table2.tex", "table2.csv", "comparisons.csv", "friedman.csv", "reliability.csv", "mixed_model.csv",
    "per_rater.csv", "per_prompt.csv", "means.png", "distributions.png", "rater_heatmap.png", "clip_vs_human.png",
    "results.json", "report.html",
)

CLIP_COLUMNS = ("clip_score", "style_similarity")


class AnalyzeConfig(StrictModel):
    """Settings of one analysis run (CLI flags map one-to-one onto these keys)."""

    db: Path | None = None  # rating study DuckDB written by the rating app
    ratings: Path | None = None  # or a wide ratings file (.csv / .parquet)
    out: Path
    sd_over: Literal["images", "ratings", "raters"] = "images"
    drop_bad_rows: bool = False
    include_revoked: bool = False  # with db: keep the ratings of raters whose access was revoked
    exclude_failed_attention: int | None = Field(None, ge=1)  # drop raters with at least this many failed attention checks
    clip: Path | None = None  # optional clip_scores.csv for the CLIP vs human part
    # The arm the others are compared against; also the pairwise analysis' arm fixed at Elo 1000.
    baseline_arm: str = Field("base", validation_alias=AliasChoices("baseline_arm", "reference_arm"))
    arm_order: list[str] | None = None  # table columns and adjacent-arm tests; default: baseline, then alphabetical
    arm_alias: dict[str, str] = {}  # arm spellings to rename while reading, e.g. {"LoRA": "lora"}
    bootstrap: int = Field(10_000, ge=100)
    seed: int = 0
    title_note: str | None = None  # e.g. "simulated": shown in every table, plot and report title
    mixed_model: bool = True  # fit the crossed mixed model per dimension (skipped, with a note, for very large studies)

    @model_validator(mode="after")
    def _one_source(self) -> "AnalyzeConfig":
        if self.db is not None and self.ratings is not None:
            raise ValueError("give either db or ratings, not both")
        return self


# Options of the score analysis that mean nothing for preference votes: set with a votes file, an error.
SCORE_ONLY_FLAGS: dict[str, str] = {
    "sd_over": "--sd-over", "include_revoked": "--include-revoked", "exclude_failed_attention": "--exclude-failed-attention",
    "clip": "--clip", "arm_alias": "--arm-alias", "arm_order": "--arm-order", "mixed_model": "--no-mixed-model",
}
PAIRWISE_BOOTSTRAP = 2000  # default resamples of the pairwise unit bootstrap (each one is a Bradley–Terry fit)


class PowerConfig(StrictModel):
    """Settings of `fangzhi analyze power`."""

    from_ratings: Path | None = None  # estimate variance components from this wide ratings file ...
    from_db: Path | None = None  # ... or from this rating study DB; else use `components`
    baseline_arm: str = "base"
    diff: float = Field(0.3, gt=0)  # difference in mean score (1–5 scale) to detect
    power: float = Field(0.8, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    raters: list[Annotated[int, Field(ge=1)]] = Field([2, 4, 6], min_length=1)
    prompts: list[Annotated[int, Field(ge=2)]] = Field([8, 16, 32], min_length=1)
    seeds_per_prompt: int = Field(1, ge=1)
    sims: int = Field(500, ge=50, le=100_000)
    seed: int = 0
    components: power_mod.VarianceComponents = power_mod.VarianceComponents()
    out: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "PowerConfig":
        if self.from_db is not None and self.from_ratings is not None:
            raise ValueError("give either --db (from_db) or --from-ratings (from_ratings), not both")
        return self


@dataclass
class Removed:
    """Ratings left out of the analysis, and whose."""

    revoked_raters: list[str] = field(default_factory=list)
    revoked_ratings: int = 0
    attention_raters: list[str] = field(default_factory=list)
    attention_ratings: int = 0


def load_ratings(config: AnalyzeConfig, frame: pd.DataFrame | None = None) -> tuple[pd.DataFrame, BadRows, str, Removed]:
    removed = Removed()
    if frame is not None:
        positions = [f"row {i}" for i in range(1, len(frame) + 1)]
        clean, bad = validate_ratings(frame, source="ratings table", positions=positions, drop_bad_rows=config.drop_bad_rows, arm_alias=config.arm_alias)
        return clean, bad, "ratings table (in memory)", removed
    if config.db is not None:
        study = read_study(config.db)
        if study.from_snapshot:
            warnings.warn(f"{config.db} is open in another process; analysing {study.source}", stacklevel=2)
        raw = study.ratings()
        revoked = raw["revoked"].to_numpy()
        removed.revoked_raters = sorted(str(rater) for rater in raw.loc[revoked, "rater"].unique())
        if not config.include_revoked:
            removed.revoked_ratings = int(revoked.sum())
            raw = raw.loc[~revoked].reset_index(drop=True)
        positions = [f"rater {r}, image {i} ({k})" for r, i, k in zip(raw["rater"], raw["image_id"], raw["kind"])]
        clean, bad = validate_ratings(raw, source=str(config.db), positions=positions, drop_bad_rows=config.drop_bad_rows)
        return clean, bad, study.source, removed
    if config.ratings is not None:
        clean, bad = read_ratings_file(config.ratings, drop_bad_rows=config.drop_bad_rows, arm_alias=config.arm_alias)
        return clean, bad, str(config.ratings), removed
    raise FangzhiError("analyze: give --db STUDY.duckdb or --ratings FILE")


def exclude_inattentive(ratings: pd.DataFrame, min_failures: int | None, removed: Removed) -> pd.DataFrame:
    """Without the raters who failed at least `min_failures` attention checks (all of them kept when None)."""
    if min_failures is None:
        return ratings
    removed.attention_raters = raters_failing_attention(ratings, min_failures)
    dropped = ratings["rater"].isin(removed.attention_raters).to_numpy()
    removed.attention_ratings = int(dropped.sum())
    return ratings.loc[~dropped].reset_index(drop=True)


def removal_facts(config: AnalyzeConfig, removed: Removed) -> list[str]:
    """The report's lines on ratings left out (revoked raters, failed attention checks)."""
    facts = []
    if config.db is not None:
        if not removed.revoked_raters:
            facts.append("Revoked raters: none.")
        elif config.include_revoked:
            facts.append(f"Revoked raters: {len(removed.revoked_raters)} ({', '.join(removed.revoked_raters)}); their ratings are included (--include-revoked).")
        else:
            facts.append(
                f"Revoked raters: {len(removed.revoked_raters)} ({', '.join(removed.revoked_raters)}); "
                f"their {removed.revoked_ratings} ratings were removed (--include-revoked keeps them)."
            )
    if config.exclude_failed_attention is not None:
        who = f" ({', '.join(removed.attention_raters)})" if removed.attention_raters else ""
        facts.append(
            f"Raters with {config.exclude_failed_attention} or more failed attention checks: {len(removed.attention_raters)}{who}; "
            f"{removed.attention_ratings} ratings removed (--exclude-failed-attention {config.exclude_failed_attention})."
        )
    return facts


def clip_correlations(ratings: pd.DataFrame, clip_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join CLIP numbers to image-level human scores on (arm, prompt, seed); Spearman rho per pair of scores."""
    if not clip_path.is_file():
        raise FangzhiError(f"CLIP scores file not found: {clip_path}")
    clip = pd.read_csv(clip_path, dtype={"arm": str, "prompt": str})
    missing = [c for c in ("arm", "prompt", "seed") if c not in clip.columns]
    present = [c for c in CLIP_COLUMNS if c in clip.columns]
    if missing or not present:
        raise FangzhiError(f"{clip_path}: needs columns arm, prompt, seed and at least one of {', '.join(CLIP_COLUMNS)}")
    images = table.unit_scores(ratings, "images")
    joined = images.merge(clip[["arm", "prompt", "seed", *present]], on=["arm", "prompt", "seed"], how="inner")
    if joined.empty:
        raise FangzhiError(f"{clip_path}: no (arm, prompt, seed) matches the ratings; check that both come from the same generation run")
    rows = []
    for clip_column in present:
        for score in table.SCORE_ROWS:
            varies = len(joined) > 2 and joined[clip_column].nunique() > 1 and joined[score].nunique() > 1
            rho = joined[clip_column].corr(joined[score], method="spearman") if varies else float("nan")
            rows.append({"clip_metric": clip_column, "human_score": score, "spearman_rho": rho, "n_images": len(joined)})
    return joined, pd.DataFrame(rows)


def paired_comparisons(ratings: pd.DataFrame, arms: list[str], config: AnalyzeConfig, source: str) -> pd.DataFrame:
    """Every arm against the baseline; an error when an arm shares no prompt with the baseline."""
    if len(arms) < 2:
        raise FangzhiError(f"{source}: only the arm '{arms[0]}' was rated; a comparison needs the baseline arm and at least one other arm")
    comparisons = stats.compare_arms(ratings, config.baseline_arm, arms, config.bootstrap, config.seed)
    compared = set(comparisons["arm"]) if not comparisons.empty else set()
    unpaired = [arm for arm in arms[1:] if arm not in compared]
    if unpaired:
        raise FangzhiError(
            f"{source}: no prompt was rated in both the baseline arm '{config.baseline_arm}' and arm(s) {', '.join(repr(a) for a in unpaired)}; "
            "check that arm and prompt names match between the arms"
        )
    return comparisons


def analyze(config: AnalyzeConfig, ratings: pd.DataFrame | None = None) -> Path:
    """Run the whole analysis and write `config.out`; returns the output folder.

    `ratings` lets a caller (the demo) pass a wide-format DataFrame instead of a file or DB.
    """
    loaded, bad_rows, source, removed = load_ratings(config, ratings)
    # QC is reported on every rater that is analysed or dropped for failing it.
    attention = attention_failures(loaded)
    all_ratings = exclude_inattentive(loaded, config.exclude_failed_attention, removed)
    main = main_ratings(all_ratings)
    if main.empty:
        raise FangzhiError(f"{source}: no 'main' ratings to analyse")
    arms = table.arm_order(main, config.baseline_arm, config.arm_order)
    note_suffix = config.title_note

    summary = table.summary_table(main, config.sd_over, arms)
    paper = table.paper_table(summary, arms)
    title = table.table_title(note_suffix)
    note = table.table_note(summary, config.sd_over)
    comparisons = paired_comparisons(main, arms, config, source)
    friedman = stats.friedman_tests(main, arms) if len(arms) > 2 else None
    mixed_rows = mixed.mixed_table(main, config.baseline_arm, arms, list(DIMENSION_KEYS)) if config.mixed_model else None
    reliability_rows = reliability.reliability_table(main)
    retest = reliability.retest_agreement(all_ratings)
    per_rater = table.breakdown(main, "rater")
    per_prompt = table.breakdown(main, "prompt")
    clip_joined, clip_rho = clip_correlations(main, config.clip) if config.clip is not None else (None, None)

    n_images = main.groupby(["arm", "prompt", "seed"], sort=False, observed=True).ngroups
    attention_failed = int(attention["failures"].sum()) if attention is not None else 0
    counts = {
        "source": source,
        "n_raters": int(main["rater"].nunique()),
        "n_images": int(n_images),
        "n_prompts": int(main["prompt"].nunique()),
        "n_main_ratings": int(len(main)),
        "n_retest_ratings": int((all_ratings.get("kind") == "retest").sum()) if "kind" in all_ratings else 0,
        "n_attention_items": int(attention["items"].sum()) if attention is not None else 0,
        "n_attention_failures": attention_failed,
        "n_bad_rows_dropped": len(bad_rows),
        "revoked_raters": removed.revoked_raters,
        "n_revoked_ratings_removed": removed.revoked_ratings,
        "attention_excluded_raters": removed.attention_raters,
        "n_attention_excluded_ratings": removed.attention_ratings,
        "arms": arms,
    }

    labels = [*arms, *main["rater"].unique(), note_suffix or ""]
    with report.fonts_for(labels):
        figures = {
            "means.png": report.plot_means(summary, arms, table.UNIT_NOTES[config.sd_over], note_suffix),
            "distributions.png": report.plot_distributions(main, arms, note_suffix),
            "rater_heatmap.png": report.plot_rater_heatmap(per_rater, arms, note_suffix),
        }
        if clip_joined is not None:
            present = [c for c in CLIP_COLUMNS if c in clip_joined.columns]
            figures["clip_vs_human.png"] = report.plot_clip_scatter(clip_joined, present, note_suffix)

    # --- everything computed; now write ---
    out = output_folder(Path(config.out), SCORE_FILES)
    markdown = table.to_markdown(paper, title, note)
    (out / "table2.md").write_text(markdown, encoding="utf-8")
    (out / "table2.tex").write_text(table.to_latex(paper, title, note), encoding="utf-8")
    table.to_csv_frame(summary, arms).to_csv(out / "table2.csv", index=False, float_format="%.2f")
    comparisons.to_csv(out / "comparisons.csv", index=False)
    if friedman is not None:
        friedman.to_csv(out / "friedman.csv", index=False)
    reliability_rows.to_csv(out / "reliability.csv", index=False)
    if mixed_rows is not None:
        mixed_rows.to_csv(out / "mixed_model.csv", index=False)
    per_rater.to_csv(out / "per_rater.csv", index=False)
    per_prompt.to_csv(out / "per_prompt.csv", index=False)
    for name, png in figures.items():
        (out / name).write_bytes(png)

    report.write_json(
        out / "results.json",
        {
            "title": title,
            "config": config.model_dump(mode="json"),
            "counts": counts,
            "table_unit": config.sd_over,
            "table_note": note,
            "summary": summary,
            "comparisons": comparisons,
            "test_note": stats.WILCOXON_NOTE,
            **({"friedman": friedman, "friedman_note": stats.FRIEDMAN_NOTE} if friedman is not None else {}),
            "mixed_model": mixed_rows,
            "mixed_model_formula": mixed.FORMULA if mixed_rows is not None else None,
            "mixed_model_note": mixed.APPROXIMATION_NOTE if mixed_rows is not None else None,
            "reliability": reliability_rows,
            "retest": retest,
            "attention": attention,
            "per_rater": per_rater,
            "per_prompt": per_prompt,
            "clip_spearman": clip_rho,
            "bad_rows": [{"where": w, "reason": r} for w, r in bad_rows.problems],
        },
    )

    facts = [
        f"Source: {source}",
        f"Rests on {counts['n_raters']} raters, {counts['n_images']} images ({counts['n_prompts']} prompts, arms: {', '.join(arms)}), {counts['n_main_ratings']} ratings.",
        f"QC: {counts['n_attention_failures']} attention-check failures out of {counts['n_attention_items']} items; {counts['n_retest_ratings']} retest ratings; {counts['n_bad_rows_dropped']} bad rows dropped.",
        *removal_facts(config, removed),
    ]
    fewest = power_mod.smallest_detectable_prompts(0.05)
    if counts["n_prompts"] < fewest:
        few = (
            f"Only {counts['n_prompts']} prompt(s): the primary tests (unit: prompts) cannot reach p < 0.05 with fewer than {fewest}"
            + ("; with one prompt they have no confidence interval or t-test" if counts["n_prompts"] == 1 else "")
            + ". `fangzhi analyze power` says how many prompts and raters a study needs."
        )
        warnings.warn(few)
        facts.append(few)
    flagged = reliability_rows.loc[reliability_rows["alpha_flag"]]
    if not flagged.empty:
        where = ", ".join(f"{row.dimension} ({row.scope})" for row in flagged.itertuples())
        facts.append(f"Low agreement within an arm (Krippendorff's alpha < {reliability.ALPHA_FLAG_BELOW}) on: {where}.")
    if friedman is not None:
        row = friedman.loc[friedman["primary"] & (friedman["score"] == "comprehensive")].iloc[0]
        facts.append(
            f"Friedman test across the {len(arms)} arms (comprehensive score, unit: prompts, n = {row.n_units}): "
            f"chi² = {row.chi2:.3g} on {row.df} df, p = {row.p:.3g}, Kendall's W = {row.kendall_w:.3f}."
        )
    primary = comparisons.loc[comparisons["primary"]]
    for row in primary.loc[primary["score"] == "comprehensive"].itertuples():
        facts.append(
            f"Primary test ({row.arm} − {row.baseline}, comprehensive score, unit: prompts, n = {row.n_pairs}): "
            f"mean difference {row.mean_diff:+.3f} (95% CI {row.ci95_low:+.3f} to {row.ci95_high:+.3f}), Wilcoxon p = {row.wilcoxon_p:.3g}, paired t p = {row.t_p:.3g}."
        )
    pairs_note = (
        f"Pairs (`arm` − `baseline`): every arm against {arms[0]}, then each arm against the next in the arm order {', '.join(arms)}. "
        if len(arms) > 2 else ""
    )
    sections = [] if friedman is None else [
        ("Friedman test across arms (unit: prompts, primary; images, secondary)", stats.FRIEDMAN_NOTE, friedman),
    ]
    sections += [
        ("Paired comparisons: primary (unit: prompts)", f"Unit: {stats.UNIT_NOTES['prompts']}. {pairs_note}{stats.WILCOXON_NOTE}", primary),
        (
            "Paired comparisons: secondary (units: images, ratings)",
            f"Units: {stats.UNIT_NOTES['images']}; {stats.UNIT_NOTES['ratings']}. Descriptive; the headline is the primary table.",
            comparisons.loc[~comparisons["primary"]],
        ),
    ]
    if mixed_rows is not None:
        shown = ["arm", "score", "fitted", "n_ratings", "arm_effect", "df", "ci95_low", "ci95_high", "p", *[f"sd_{t}" for t in (*mixed.TERMS, "residual")], "simplified"]
        sections.append((
            "Crossed mixed model (unit: individual ratings, raters and prompts as random factors)",
            f"Per dimension: {mixed.FORMULA}. {mixed.APPROXIMATION_NOTE} SD CIs are in mixed_model.csv.",
            mixed_rows[shown],
        ))
    sections += [
        ("Inter-rater reliability", "Unit: images (raters are the coders). Krippendorff's alpha (ordinal) over the images of each arm, then pooled over arms (labelled; pooling inflates agreement when the arms differ, so only within-arm values are flagged); ICC(2,1) and ICC(2,k) over images every rater scored.", reliability_rows),
    ]
    if retest is not None:
        sections.append(("Test–retest agreement", "Unit: a retest rating paired with the same rater's first rating of that image.", retest))
    if attention is not None:
        sections.append(("Attention checks", "Unit: attention-check items, counted per rater. An item fails unless all four scores equal the score the page asked for.", attention))
    if clip_rho is not None:
        sections.append(("CLIP vs human", "Unit: images. Spearman correlation of CLIP numbers with the rater-averaged human scores.", clip_rho))
    sections.append(("Per rater", "Unit: individual ratings. Mean score per rater and arm.", per_rater))
    if per_prompt["prompt"].nunique() <= 200:
        sections.append(("Per prompt", "Unit: individual ratings. Mean score per prompt and arm.", per_prompt))
    else:
        sections.append(("Per prompt", "Too many prompts to show here; see per_prompt.csv.", None))
    report.write_html(out / "report.html", report.titled("Human ratings analysis", note_suffix), facts, title, paper, note, sections, figures)
    return out


def analyze_pairwise_study(config: AnalyzeConfig, study: StudyRead) -> None:
    """The preference analysis of a pairwise study's saved votes (revoked raters left out unless include_revoked),
    with its attention-item failures per rater in the report and in pairwise_attention.csv."""
    if study.from_snapshot:
        warnings.warn(f"{config.db} is open in another process; analysing {study.source}", stacklevel=2)
    votes = study.votes()
    revoked = votes["revoked"].to_numpy()
    revoked_raters = sorted(votes.loc[revoked, "rater"].unique())
    rows = study.rows
    if not config.include_revoked:
        votes = votes.loc[~revoked].reset_index(drop=True)
        rows = rows.loc[~rows["revoked"].astype(bool)]
    if votes.empty:
        raise FangzhiError(f"{study.source}: no saved comparisons to analyse yet")
    positions = [f"rater {r}, prompt {p} seed {s} ({k})" for r, p, s, k in zip(votes["rater"], votes["prompt"], votes["seed"], votes["kind"])]
    clean, bad = validate_pairwise_votes(votes[[*PAIRWISE_COLUMNS, "kind"]], source=str(config.db), positions=positions, drop_bad_rows=config.drop_bad_rows)
    result = analyze_votes(clean, study.source, config.baseline_arm, pairwise_bootstrap(config), config.seed, title_note=config.title_note, bad_rows=bad)
    attention = pairwise_attention_failures(rows)
    result.notes.append(
        f"Attention items (an image beside a blank one): {int(attention['failures'].sum())} failed of {int(attention['items'].sum())} answered"
        + (f"; raters with failures: {', '.join(attention.loc[attention['failures'] > 0, 'rater'])}" if attention["failures"].any() else "")
        + " (pairwise_attention.csv)."
    )
    if revoked_raters:
        kept = "included (--include-revoked)" if config.include_revoked else "left out (--include-revoked keeps them)"
        result.notes.append(f"Revoked raters: {', '.join(revoked_raters)}; their votes are {kept}.")
    result.counts["attention_items"] = int(attention["items"].sum())
    result.counts["attention_failures"] = int(attention["failures"].sum())
    write_pairwise(result, config.out)
    attention.to_csv(config.out / "pairwise_attention.csv", index=False)


def pairwise_bootstrap(config: AnalyzeConfig) -> int:
    return config.bootstrap if "bootstrap" in config.model_fields_set else PAIRWISE_BOOTSTRAP


def run_analyze(config: AnalyzeConfig) -> tuple[Path, Path]:
    """`fangzhi analyze`: a pairwise votes file (detected by its columns) or a pairwise study gets the preference
    analysis, anything else the score analysis. Returns the output folder and its headline Markdown table."""
    if config.db is not None:
        study = read_study(config.db)
        if study.mode == "pairwise":
            _reject_score_only_flags(config, f"{config.db} is a pairwise study", "an absolute (1–5) study", frozenset({"include_revoked"}))
            analyze_pairwise_study(config, study)
            return config.out, config.out / "pairwise_table.md"
    if config.ratings is not None and is_pairwise_file(file_columns(config.ratings)):
        _reject_score_only_flags(config, f"{config.ratings} is a pairwise votes file", "a wide ratings file")
        n_boot = pairwise_bootstrap(config)
        analyze_pairwise(
            config.ratings, config.out, reference_arm=config.baseline_arm, n_boot=n_boot, seed=config.seed,
            drop_bad_rows=config.drop_bad_rows, title_note=config.title_note,
        )
        return config.out, config.out / "pairwise_table.md"
    out = analyze(config)
    return out, out / "table2.md"


def _reject_score_only_flags(config: AnalyzeConfig, what: str, only_for: str, allowed: frozenset[str] = frozenset()) -> None:
    misplaced = [flag for key, flag in SCORE_ONLY_FLAGS.items() if key in config.model_fields_set and key not in allowed]
    if misplaced:
        raise FangzhiError(f"{what}; {', '.join(misplaced)} apply only to {only_for}")


def run_power(config: PowerConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Power grid, smallest sufficient designs, and a short text summary; writes power.csv/.json when `out` is set."""
    if config.from_ratings is not None or config.from_db is not None:
        source = AnalyzeConfig(ratings=config.from_ratings, db=config.from_db, out=Path("."), baseline_arm=config.baseline_arm)
        ratings, _, origin_path, _ = load_ratings(source)
        components = power_mod.estimate_components(main_ratings(ratings), config.baseline_arm)
        origin = f"variance components estimated from {origin_path} by the crossed mixed model"
    else:
        components = {"any dimension": config.components}
        origin = "given variance components"
    grid = power_mod.power_grid(components, config.diff, config.raters, config.prompts, config.seeds_per_prompt, config.sims, config.alpha, config.seed)
    best = power_mod.smallest_designs(grid, config.power)
    lines = [
        f"Power to detect a mean difference of {config.diff} with the analysis' primary test (Wilcoxon signed-rank on prompt-level means, "
        f"exact up to {stats.EXACT_MAX_PAIRS} prompts; alpha {config.alpha}; {config.sims} simulated studies per design; {config.seeds_per_prompt} seed(s) per prompt; {origin}):"
    ]
    pivot = grid.pivot_table(index=["score", "n_raters"], columns="n_prompts", values="power", sort=False)
    lines.append(pivot.to_string(float_format=lambda v: f"{v:.2f}"))
    fewest = power_mod.smallest_detectable_prompts(config.alpha)
    if min(config.prompts) < fewest:
        lines.append(f"note: with fewer than {fewest} prompts the two-sided signed-rank test can never reach p < {config.alpha}, whatever the effect")
    for score in components:
        hit = best.loc[best["score"] == score]
        if hit.empty:
            lines.append(f"{score}: no design in the grid reaches power {config.power}; try more prompts (the unit of the test) or raters")
        else:
            row = hit.iloc[0]
            lines.append(f"{score}: {row.n_raters} raters × {row.n_prompts} prompts ({row.n_ratings} ratings) reach power {row.power:.2f} ≥ {config.power}")
    text = "\n".join(lines)
    if config.out is not None:
        out = output_folder(Path(config.out))
        grid.to_csv(out / "power.csv", index=False)
        report.write_json(out / "power.json", {"config": config.model_dump(mode="json"), "components": power_mod.components_as_dict(components), "grid": grid, "smallest": best, "summary": text})
    return grid, best, text
