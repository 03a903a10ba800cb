"""`fangzhi clip-check`: the CI regression gate on CLIP numbers.

It scores a fixed set of images (a generation manifest) and compares each image with the same
(arm, prompt, seed) in a stored baseline. For each metric (CLIP score; style similarity when
reference images are given) three rules apply, and any one of them failing is a regression:

- per arm: a paired one-sided Wilcoxon signed-rank test says that arm's images score lower than in
  the baseline (p < alpha) AND that arm's mean drop is larger than the tolerance. Applied to each arm
  on its own, so a drop in the LoRA arm alone is not halved by an unchanged base arm;
- LoRA − base difference: the same test and tolerance on each (prompt, seed)'s difference between an
  arm and the baseline arm, so the LoRA's advantage over the base model cannot shrink unnoticed;
- collapse: more than `collapse_max_images` images each dropping by more than `collapse_drop`
  (`style_collapse_drop` for style similarity) fails, even when the means barely move.

A consistent but negligible drop (say, GPU vs CPU arithmetic) passes, and so does one unlucky image.
The rules are written into the baseline by `--update-baseline` and read back from it; a flag given
on the command line overrides the stored value. The baseline also records the model, a hash of its
weights, the reference set, prompts and seeds; the check refuses (exit 2) to compare numbers made with
anything else. Exit codes: 0 pass, 1 regression, 2 bad input.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, FiniteFloat, ValidationError

from fangzhi.config import StrictModel, format_validation_error
from fangzhi.errors import FangzhiError
from fangzhi.files import output_file, write_atomically
from fangzhi.evaluate.clip_score import find_reference_images, json_ready, read_manifest, reference_set_sha256, score_manifest
from fangzhi.models.clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, clip_model_identity, clip_weights_sha256, load_clip

BASELINE_FORMAT = "fangzhi-clip-baseline/2"
OLD_BASELINE_FORMATS = ("fangzhi-clip-baseline/1",)  # no stored rules: the flags' values or the defaults apply
PAIR_KEY = ["arm", "prompt", "seed"]


class ClipGateRules(StrictModel):
    """The regression rules, as stored in the baseline file."""

    tolerance: float = Field(0.5, ge=0)  # allowed mean drop per arm and in the arm − base difference, CLIP-score points (0–100)
    style_tolerance: float = Field(0.005, ge=0)  # the same for style similarity (cosine)
    alpha: float = Field(0.05, gt=0, lt=1)  # level of the one-sided paired Wilcoxon tests
    collapse_drop: float = Field(5.0, gt=0)  # an image whose CLIP score drops by more than this has collapsed
    style_collapse_drop: float = Field(0.05, gt=0)  # the same for style similarity
    collapse_max_images: int = Field(2, ge=0)  # more collapsed images than this (per metric) is a regression
    baseline_arm: str = "base"  # the arm the others' differences are taken against


RULE_KEYS: tuple[str, ...] = tuple(ClipGateRules.model_fields)
RECREATE_HINT = "Fix what is named above, or recreate the baseline from known-good images with --update-baseline."


class ClipBaselineImage(StrictModel):
    """One image's stored numbers; strict, so a hand-edited "25.1" or true is not quietly read as a number."""

    model_config = ConfigDict(strict=True)

    arm: str
    prompt: str
    seed: int
    image_id: str
    image_sha256: str
    clip_score: FiniteFloat
    style_similarity: FiniteFloat | None  # null when the baseline was made without reference images


class ClipBaseline(StrictModel):
    """The baseline file (docs/formats.md, "CLIP baseline")."""

    model_config = ConfigDict(strict=True)

    format: str  # read_baseline checks it first, so that some other JSON file gets one message, not one per key
    created: str | None = None  # created, manifest, pretrained: informational, never compared
    manifest: str | None = None
    pretrained: str | None = None
    model: str
    weights_sha256: str
    reference_images_sha256: str | None
    rules: ClipGateRules | None = None  # absent in fangzhi-clip-baseline/1
    prompts: dict[str, str]
    seeds: list[int]
    images: list[ClipBaselineImage] = Field(min_length=1)

    def entry_problems(self) -> list[str]:
        """What per-key validation cannot see: a repeated (arm, prompt, seed), which the pairing would count twice,
        and a missing style number where the baseline has a reference set, which the style gate would skip silently."""
        problems = []
        first_index: dict[tuple, int] = {}
        for index, image in enumerate(self.images):
            key = (image.arm, image.prompt, image.seed)
            first = first_index.setdefault(key, index)
            if first != index:
                problems.append(
                    f"images.{index} (image_id {image.image_id!r}) repeats arm {image.arm!r}, prompt {image.prompt!r}, seed {image.seed} "
                    f"of images.{first}; keep one of the two"
                )
            if self.reference_images_sha256 is not None and image.style_similarity is None:
                problems.append(
                    f"images.{index}.style_similarity (image_id {image.image_id!r}): null, but the baseline has reference images "
                    "(reference_images_sha256), so every image needs a number"
                )
        return problems


class ClipCheckConfig(StrictModel):
    """`fangzhi clip-check`: compare a manifest's CLIP numbers with a stored baseline.

    Rule keys left unset take the baseline's stored value (or, for an old baseline or a new one,
    the default of `ClipGateRules`).
    """

    images: Path  # generation manifest (manifest.jsonl) of the fixed prompt/seed set
    baseline: Path  # baseline JSON, e.g. results/clip_baseline.json
    update_baseline: bool = False  # accept the current numbers (and the rules) as the new baseline
    tolerance: float | None = Field(None, ge=0)
    style_tolerance: float | None = Field(None, ge=0)
    alpha: float | None = Field(None, gt=0, lt=1)
    collapse_drop: float | None = Field(None, gt=0)
    style_collapse_drop: float | None = Field(None, gt=0)
    collapse_max_images: int | None = Field(None, ge=0)
    baseline_arm: str | None = None
    model: str = DEFAULT_CLIP_MODEL
    pretrained: str = DEFAULT_CLIP_PRETRAINED
    reference_images: Path | None = None
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    out: Path | None = None  # report JSON; default: clip_check.json beside the manifest

    def explicit_rules(self) -> dict:
        return {key: getattr(self, key) for key in RULE_KEYS if getattr(self, key) is not None}


def resolve_rules(config: ClipCheckConfig, baseline: ClipBaseline | None) -> tuple[ClipGateRules, str | None]:
    """Flags over the baseline's stored rules over the defaults; and a note when an old baseline stores none."""
    stored = baseline.rules.model_dump() if baseline is not None and baseline.rules is not None else {}
    note = None
    if baseline is not None and baseline.rules is None:
        note = f"{config.baseline}: made by an older fangzhi without stored gate rules; using the flags' values and the defaults (re-create it with --update-baseline to store them)"
    return ClipGateRules(**{**stored, **config.explicit_rules()}), note


def clip_check(config: ClipCheckConfig) -> int:
    manifest = read_manifest(config.images)
    prompts = _prompt_texts(manifest, config.images)
    # Fail on an unusable baseline before spending time on the model.
    baseline = None if config.update_baseline else read_baseline(config.baseline)
    if config.update_baseline:
        output_file(config.baseline, "--baseline")
    rules, note = resolve_rules(config, baseline)
    _check_enough_pairs(manifest, rules.alpha, config.images)

    clip = load_clip(config.model, config.pretrained, config.device)
    identity = {
        "model": clip_model_identity(config.model, config.pretrained),
        "weights_sha256": clip_weights_sha256(clip[0]),
        "reference_images_sha256": reference_set_sha256(find_reference_images(config.reference_images)) if config.reference_images else None,
    }
    scores = score_manifest(config.images, clip, config.reference_images, config.batch_size)

    if config.update_baseline:
        write_baseline(config, rules, identity, prompts, manifest, scores)
        print(f"baseline updated: {config.baseline} ({len(scores)} images, mean CLIP score {scores['clip_score'].mean():.3f}; rules: {rules.model_dump()})")
        return 0

    _check_comparable(baseline, identity, prompts, scores, config.baseline)
    if note:
        print(f"note: {note}")
    paired = scores.merge(pd.DataFrame([image.model_dump() for image in baseline.images]), on=PAIR_KEY, suffixes=("", "_baseline"))
    metrics = [("clip_score", rules.tolerance, rules.collapse_drop)]
    if identity["reference_images_sha256"] is not None:
        metrics.append(("style_similarity", rules.style_tolerance, rules.style_collapse_drop))
    results = []
    for metric, tolerance, collapse_drop in metrics:
        results += gate_metric(paired, metric, tolerance, collapse_drop, rules)
    passed = not any(result["regression"] for result in results)

    print(_format_report(paired, results, passed))
    out = config.out or config.images.parent / "clip_check.json"
    report = {
        "verdict": "pass" if passed else "regression",
        "manifest": str(config.images), "baseline": str(config.baseline), **identity,
        "rules": rules.model_dump(),
        "rules_note": note,
        "checks": results,
        "by_prompt": _by_prompt(paired, [metric for metric, *_ in metrics]).to_dict(orient="records"),
        "images": paired[[*PAIR_KEY, "image_id", "clip_score", "clip_score_baseline", "style_similarity", "style_similarity_baseline"]].to_dict(orient="records"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_ready(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if passed else 1


def gate_metric(paired: pd.DataFrame, metric: str, tolerance: float, collapse_drop: float, rules: ClipGateRules) -> list[dict]:
    """Every rule for one metric: one row per arm, one per arm − baseline-arm difference, one collapse row."""
    checks = []
    arms = sorted(paired["arm"].unique(), key=lambda arm: (arm != rules.baseline_arm, arm))
    for arm in arms:
        part = paired.loc[paired["arm"] == arm]
        checks.append({"rule": "arm", "arm": arm, **compare_metric(part, metric, tolerance, rules.alpha)})
    if rules.baseline_arm in arms:
        wide = paired.pivot_table(index=["prompt", "seed"], columns="arm", values=[metric, f"{metric}_baseline"], observed=True)
        for arm in arms[1:]:
            differences = pd.DataFrame({
                metric: wide[(metric, arm)] - wide[(metric, rules.baseline_arm)],
                f"{metric}_baseline": wide[(f"{metric}_baseline", arm)] - wide[(f"{metric}_baseline", rules.baseline_arm)],
            }).dropna()
            checks.append({"rule": "difference", "arm": f"{arm} − {rules.baseline_arm}", **compare_metric(differences, metric, tolerance, rules.alpha)})
    drops = paired[f"{metric}_baseline"].to_numpy(float) - paired[metric].to_numpy(float)
    collapsed = drops > collapse_drop
    worst = paired.assign(drop=drops).loc[collapsed].sort_values("drop", ascending=False)
    checks.append({
        "rule": "collapse", "arm": "all", "metric": metric, "n_pairs": len(paired),
        "collapse_drop": collapse_drop, "collapse_max_images": rules.collapse_max_images,
        "n_collapsed": int(collapsed.sum()),
        "collapsed_images": [{"image_id": r.image_id, "arm": r.arm, "prompt": r.prompt, "seed": int(r.seed), "drop": float(r.drop)} for r in worst.head(20).itertuples()],
        "regression": bool(collapsed.sum() > rules.collapse_max_images),
    })
    return checks


def compare_metric(paired: pd.DataFrame, metric: str, tolerance: float, alpha: float) -> dict:
    """One-sided paired Wilcoxon (current < baseline) plus the tolerance on the mean drop."""
    from scipy import stats

    current, baseline = paired[metric].to_numpy(float), paired[f"{metric}_baseline"].to_numpy(float)
    mean_drop = float(baseline.mean() - current.mean())
    if np.all(current == baseline):
        p_value = 1.0  # identical numbers: no evidence of a drop (scipy cannot rank all-zero differences)
    else:
        p_value = float(stats.wilcoxon(current, baseline, alternative="less").pvalue)
    significant = p_value < alpha
    beyond_tolerance = mean_drop > tolerance
    return {
        "metric": metric, "n_pairs": len(paired),
        "baseline_mean": float(baseline.mean()), "current_mean": float(current.mean()), "mean_drop": mean_drop,
        "tolerance": tolerance, "wilcoxon_p_less": p_value, "alpha": alpha,
        "significant": bool(significant), "beyond_tolerance": bool(beyond_tolerance),
        "regression": bool(significant and beyond_tolerance),
    }


def read_baseline(path: Path) -> ClipBaseline:
    if not path.is_file():
        raise FangzhiError(f"baseline not found: {path}; create it from known-good images with --update-baseline")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FangzhiError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") not in (BASELINE_FORMAT, *OLD_BASELINE_FORMATS):
        raise FangzhiError(f"{path}: not a fangzhi CLIP baseline (expected \"format\": \"{BASELINE_FORMAT}\"); recreate it with --update-baseline")
    try:
        baseline = ClipBaseline.model_validate(data)
    except ValidationError as exc:
        raise FangzhiError("\n".join([format_validation_error(exc, str(path), "CLIP baseline"), *_image_ids(exc, data), RECREATE_HINT])) from None
    problems = baseline.entry_problems()
    if problems:
        raise FangzhiError("\n  ".join([f"{path}: invalid CLIP baseline", *problems]) + "\n" + RECREATE_HINT)
    return baseline


def _image_ids(exc: ValidationError, data: dict) -> list[str]:
    """The image_id of each entry an error points into: in a file of hundreds of entries an index is hard to find."""
    images = data.get("images")
    indices = sorted({err["loc"][1] for err in exc.errors() if len(err["loc"]) > 1 and err["loc"][0] == "images"})
    return [
        f"  images.{index} is image_id {images[index]['image_id']!r}"
        for index in indices if isinstance(images[index], dict) and isinstance(images[index].get("image_id"), str)
    ]


def write_baseline(config: ClipCheckConfig, rules: ClipGateRules, identity: dict, prompts: dict[str, str], manifest: pd.DataFrame, scores: pd.DataFrame) -> None:
    images = scores.merge(manifest[["image_id", "image_sha256"]], on="image_id")
    baseline = {
        "format": BASELINE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(config.images),
        **identity,
        "pretrained": config.pretrained,
        "rules": rules.model_dump(),
        "prompts": prompts,
        "seeds": sorted(int(seed) for seed in set(scores["seed"])),
        "images": images[[*PAIR_KEY, "image_id", "image_sha256", "clip_score", "style_similarity"]].to_dict(orient="records"),
    }
    config.baseline.parent.mkdir(parents=True, exist_ok=True)
    # An interrupted update leaves the old baseline intact.
    write_atomically(config.baseline, json.dumps(json_ready(baseline), indent=2, ensure_ascii=False) + "\n")


def _prompt_texts(manifest: pd.DataFrame, manifest_path: Path) -> dict[str, str]:
    texts = manifest.groupby("prompt")["prompt_en"].unique()
    ambiguous = [prompt for prompt, values in texts.items() if len(values) > 1]
    if ambiguous:
        raise FangzhiError(f"{manifest_path}: prompt_id {ambiguous[0]!r} has different prompt_en texts on different lines; CLIP scores need one text per prompt")
    return {prompt: str(values[0]) for prompt, values in sorted(texts.items())}


def _check_enough_pairs(manifest: pd.DataFrame, alpha: float, manifest_path: Path) -> None:
    # With n pairs the smallest one-sided Wilcoxon p-value is 2^-n; below that an arm's rule could never fail.
    per_arm = manifest.groupby("arm").size()
    n_pairs = int(per_arm.min())
    if 0.5 ** n_pairs >= alpha:
        needed = math.floor(math.log2(1 / alpha)) + 1
        counts = ", ".join(f"{arm}: {n}" for arm, n in per_arm.items())
        raise FangzhiError(
            f"{manifest_path}: too few images per arm for the gate ({counts}): a one-sided Wilcoxon test on {n_pairs} pairs "
            f"can never reach alpha={alpha}; use at least {needed} images per arm (prompts × seeds) or a larger --alpha"
        )


def _check_comparable(baseline: ClipBaseline, identity: dict, prompts: dict[str, str], scores: pd.DataFrame, baseline_path: Path) -> None:
    differences = []
    for key, what in (("model", "CLIP model"), ("weights_sha256", "CLIP weights (sha256)"), ("reference_images_sha256", "reference images (sha256 of the set)")):
        if getattr(baseline, key) != identity[key]:
            differences.append(f"{what}: baseline {getattr(baseline, key)}, now {identity[key]}")
    if baseline.prompts != prompts:
        changed = sorted(set(baseline.prompts.items()) ^ set(prompts.items()))
        differences.append(f"prompts differ (first: {changed[0][0]!r}: {changed[0][1]!r})")
    seeds = sorted(int(seed) for seed in set(scores["seed"]))
    if baseline.seeds != seeds:
        differences.append(f"seeds: baseline {baseline.seeds}, now {seeds}")
    baseline_keys = {(image.arm, image.prompt, image.seed) for image in baseline.images}
    current_keys = set(zip(scores["arm"], scores["prompt"], scores["seed"].astype(int)))
    if not differences and baseline_keys != current_keys:
        differences.append(f"(arm, prompt, seed) sets differ: {len(baseline_keys - current_keys)} only in the baseline, {len(current_keys - baseline_keys)} only now")
    if differences:
        raise FangzhiError(
            f"{baseline_path}: refusing to compare with a baseline made differently:\n  " + "\n  ".join(differences)
            + "\nRun with the baseline's model/images, or accept the new setup with --update-baseline."
        )


def _by_prompt(paired: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    columns = {}
    for metric in metrics:
        columns[f"{metric}_baseline"] = (f"{metric}_baseline", "mean")
        columns[metric] = (metric, "mean")
    table = paired.groupby("prompt", sort=True).agg(n=("image_id", "size"), **columns).reset_index()
    for metric in metrics:
        table[f"{metric}_change"] = table[metric] - table[f"{metric}_baseline"]
    return table


def _format_report(paired: pd.DataFrame, results: list[dict], passed: bool) -> str:
    metrics = list(dict.fromkeys(result["metric"] for result in results))
    table = _by_prompt(paired, metrics)
    lines = ["per prompt (means over seeds and arms):", table.to_string(index=False, float_format=lambda x: f"{x:.4f}"), ""]
    for r in results:
        verdict = "REGRESSION" if r["regression"] else "ok"
        if r["rule"] == "collapse":
            lines.append(f"{r['metric']} collapse: {r['n_collapsed']} of {r['n_pairs']} images dropped by more than {r['collapse_drop']} (allowed: {r['collapse_max_images']}): {verdict}")
            continue
        what = f"{r['metric']} [{r['arm']}]" if r["rule"] == "arm" else f"{r['metric']} difference [{r['arm']}]"
        lines.append(
            f"{what}: baseline {r['baseline_mean']:.4f} -> now {r['current_mean']:.4f} (drop {r['mean_drop']:+.4f}, tolerance {r['tolerance']}); "
            f"one-sided Wilcoxon p = {r['wilcoxon_p_less']:.4g} (alpha {r['alpha']}) over {r['n_pairs']} pairs: {verdict}"
        )
    lines.append("PASS" if passed else "FAIL: CLIP numbers regressed against the baseline")
    return "\n".join(lines)
