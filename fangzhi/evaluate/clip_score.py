"""CLIP numbers per generated image: text–image CLIP score and style similarity to reference images.

- CLIP score follows torchmetrics' `clip_score`: 100 × cosine(image embedding, text embedding), clamped at 0,
  computed on the English prompt (`prompt_en`), one number per image.
- Style similarity is the mean cosine between the image's CLIP embedding and each reference style image's.

`score_manifest` returns one row per image (image_id, arm, prompt, seed, clip_score, style_similarity), where
`prompt` is the manifest's prompt_id, so the table joins the ratings table on (arm, prompt, seed).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from fangzhi.config import StrictModel
from fangzhi.errors import FangzhiError
from fangzhi.files import output_folder
from fangzhi.generate.manifest import read_manifest as read_generation_manifest
from fangzhi.models.clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, clip_model_identity, clip_weights_sha256, load_clip

REFERENCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SCORE_COLUMNS = ["image_id", "arm", "prompt", "seed", "clip_score", "style_similarity"]


class ClipScoreConfig(StrictModel):
    """`fangzhi clip-score`: CLIP numbers for every image of a generation manifest."""

    manifest: Path
    out: Path
    reference_images: Path | None = None  # folder of style reference images; without it style_similarity is empty
    model: str = DEFAULT_CLIP_MODEL  # open_clip architecture; unused when `pretrained` is a folder
    pretrained: str = DEFAULT_CLIP_PRETRAINED  # open_clip tag, local checkpoint file, or folder with open_clip_config.json
    batch_size: int = Field(16, ge=1)
    device: str = "auto"  # auto: CUDA when present, else CPU


def read_manifest(manifest_path: str | Path) -> pd.DataFrame:
    """The generation manifest as a table (one row per image, `path` resolved); problems name the line."""
    manifest_path = Path(manifest_path)
    # Files are checked against image_sha256 when they are read for embedding, not twice.
    records = read_generation_manifest(manifest_path)
    if not records:
        raise FangzhiError(f"{manifest_path}: no images listed")
    return pd.DataFrame(
        {
            "image_id": str(r["image_id"]), "arm": str(r["arm"]), "prompt": str(r["prompt_id"]), "seed": r["seed"],
            "prompt_en": str(r["prompt_en"]), "path": manifest_path.parent / r["file"], "image_sha256": r["image_sha256"], "line": r["_line"],
        }
        for r in records
    )


def find_reference_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FangzhiError(f"reference images folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in REFERENCE_IMAGE_SUFFIXES)
    if not paths:
        raise FangzhiError(f"{folder}: no reference images (looked for {', '.join(REFERENCE_IMAGE_SUFFIXES)} files)")
    return paths


def reference_set_sha256(paths: list[Path]) -> str:
    """Identity of a reference set: its files' contents, independent of their names and order."""
    file_hashes = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
    return hashlib.sha256("\n".join(file_hashes).encode()).hexdigest()


def _open_image(path: Path, expected_sha256: str | None, where: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FangzhiError(f"{where}: image file not found: {path}")
    data = path.read_bytes()
    if isinstance(expected_sha256, str) and expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise FangzhiError(f"{where}: {path} does not match its image_sha256 in the manifest (the file changed after generation)")
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise FangzhiError(f"{where}: cannot read image {path}: {exc}") from None


@torch.no_grad()
def embed_images(images: list[tuple[Path, str | None, str]], clip, batch_size: int = 16, desc: str = "CLIP images") -> torch.Tensor:
    """L2-normalized image embeddings, (N, D) on CPU; `images` are (path, expected sha256 or None, where-for-errors)."""
    from tqdm.auto import tqdm

    model, preprocess, _ = clip
    device = next(model.parameters()).device
    embeddings = []
    with tqdm(total=len(images), desc=desc, unit="img") as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixels = torch.stack([preprocess(_open_image(path, sha, where)) for path, sha, where in batch]).to(device)
            features = model.encode_image(pixels).float()
            embeddings.append(torch.nn.functional.normalize(features, dim=-1).cpu())
            progress.update(len(batch))
    return torch.cat(embeddings)


@torch.no_grad()
def embed_texts(texts: list[str], clip, batch_size: int = 16) -> torch.Tensor:
    """L2-normalized text embeddings, (N, D) on CPU. CLIP's tokenizer truncates past 77 tokens, as torchmetrics does."""
    model, _, tokenizer = clip
    device = next(model.parameters()).device
    embeddings = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        features = model.encode_text(tokens).float()
        embeddings.append(torch.nn.functional.normalize(features, dim=-1).cpu())
    return torch.cat(embeddings)


def clip_score_from_embeddings(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore per row: max(100 · cos(E_I, E_C), 0) for normalized embeddings."""
    return (100 * (image_embeddings * text_embeddings).sum(dim=-1)).clamp(min=0)


def score_manifest(manifest_path: str | Path, clip, reference_images: str | Path | None = None, batch_size: int = 16) -> pd.DataFrame:
    """CLIP score and style similarity for every image in the manifest; `clip` is load_clip's (model, preprocess, tokenizer)."""
    manifest = read_manifest(manifest_path)
    images = [(row.path, row.image_sha256, f"{manifest_path}, line {row.line}") for row in manifest.itertuples()]
    image_embeddings = embed_images(images, clip, batch_size)

    # Each distinct prompt is encoded once, however many seeds and arms share it.
    prompts = sorted(set(manifest["prompt_en"]))
    prompt_embeddings = embed_texts(prompts, clip, batch_size)
    row_of_prompt = {text: i for i, text in enumerate(prompts)}
    text_embeddings = prompt_embeddings[[row_of_prompt[text] for text in manifest["prompt_en"]]]

    scores = manifest[["image_id", "arm", "prompt", "seed"]].copy()
    scores["clip_score"] = clip_score_from_embeddings(image_embeddings, text_embeddings).numpy().astype(float)
    if reference_images is None:
        scores["style_similarity"] = np.nan
    else:
        reference_paths = find_reference_images(reference_images)
        references = embed_images([(p, None, "reference images") for p in reference_paths], clip, batch_size, desc="CLIP references")
        # mean_j cos(x, r_j) = x · mean_j(r_j) for unit vectors
        scores["style_similarity"] = (image_embeddings @ references.mean(dim=0)).numpy().astype(float)
    return scores[SCORE_COLUMNS]


def summarize_by_arm(scores: pd.DataFrame) -> pd.DataFrame:
    """Per arm: n, mean and SD (ddof=1) of clip_score and style_similarity."""
    grouped = scores.groupby("arm", sort=True)
    summary = pd.DataFrame({"n": grouped.size()})
    for column in ("clip_score", "style_similarity"):
        summary[f"{column}_mean"] = grouped[column].mean()
        summary[f"{column}_sd"] = grouped[column].std(ddof=1)
    return summary.reset_index()


def paired_arm_test(scores: pd.DataFrame, arm_a: str = "base", arm_b: str = "lora", column: str = "clip_score") -> dict:
    """Two-sided paired comparison of `column` between two arms, pairing images by (prompt, seed).

    Returns n_pairs, the means, mean_difference (b − a), and the Wilcoxon signed-rank and paired t statistics
    and p-values (scipy). p-values are NaN when there are fewer than 2 pairs.
    """
    from scipy import stats

    for arm in (arm_a, arm_b):
        if arm not in set(scores["arm"]):
            raise FangzhiError(f"arm {arm!r} not in the scores (arms present: {', '.join(sorted(set(scores['arm'])))})")
    pairs = scores[scores["arm"] == arm_a].merge(scores[scores["arm"] == arm_b], on=["prompt", "seed"], suffixes=("_a", "_b"))
    a, b = pairs[f"{column}_a"].to_numpy(float), pairs[f"{column}_b"].to_numpy(float)
    result = {
        "arm_a": arm_a, "arm_b": arm_b, "metric": column, "n_pairs": len(pairs),
        "mean_a": float(a.mean()) if len(a) else math.nan, "mean_b": float(b.mean()) if len(b) else math.nan,
        "mean_difference": float((b - a).mean()) if len(a) else math.nan,
        "wilcoxon_statistic": math.nan, "wilcoxon_p": math.nan, "t_statistic": math.nan, "t_p": math.nan,
    }
    if len(pairs) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return result
    if np.all(a == b):
        # No differences at all: no evidence of any effect (scipy would warn and divide by zero).
        result.update(wilcoxon_statistic=0.0, wilcoxon_p=1.0, t_statistic=0.0, t_p=1.0)
        return result
    wilcoxon = stats.wilcoxon(b, a)
    t_test = stats.ttest_rel(b, a)
    result.update(
        wilcoxon_statistic=float(wilcoxon.statistic), wilcoxon_p=float(wilcoxon.pvalue),
        t_statistic=float(t_test.statistic), t_p=float(t_test.pvalue),
    )
    return result


def arm_comparisons(scores: pd.DataFrame, reference_arm: str = "base") -> list[dict]:
    """paired_arm_test of every other arm against `reference_arm`, for each metric that has values."""
    arms = sorted(set(scores["arm"]))
    if reference_arm not in arms:
        return []
    metrics = [m for m in ("clip_score", "style_similarity") if scores[m].notna().any()]
    return [paired_arm_test(scores, reference_arm, arm, metric) for arm in arms if arm != reference_arm for metric in metrics]


def json_ready(value):
    """NaN becomes null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def clip_table_markdown(summary: pd.DataFrame, model: str) -> str:
    """Per-arm CLIP score and style similarity as mean ± SD, in the Markdown layout of the score table."""
    from fangzhi.evaluate.table import to_markdown

    cells = pd.DataFrame(
        {
            f"{label} (n)": [f"{row[column + '_mean']:.2f} ± {row[column + '_sd']:.2f} ({row['n']})" for _, row in summary.iterrows()]
            for label, column in (("CLIP score", "clip_score"), ("Style similarity", "style_similarity"))
        },
        index=pd.Index(summary["arm"], name="Arm"),
    )
    note = f"Model: {model}. CLIP score = max(100·cos(image, English prompt), 0); style similarity = mean cosine to the reference paintings. Mean ± SD (ddof 1) over images."
    return to_markdown(cells, "CLIP scores by arm", note)


def run_clip_score(config: ClipScoreConfig) -> Path:
    """`fangzhi clip-score`: writes OUT/clip_scores.csv (one row per image), clip_summary.json and clip_table.md; returns the CSV path."""
    output_folder(config.out)  # before the model and the scoring
    clip = load_clip(config.model, config.pretrained, config.device)
    scores = score_manifest(config.manifest, clip, config.reference_images, config.batch_size)
    csv_path = config.out / "clip_scores.csv"
    scores.to_csv(csv_path, index=False)

    summary = summarize_by_arm(scores)
    comparisons = arm_comparisons(scores)
    report = {
        "manifest": str(config.manifest),
        "model": clip_model_identity(config.model, config.pretrained),
        "pretrained": config.pretrained,
        "weights_sha256": clip_weights_sha256(clip[0]),
        "reference_images": str(config.reference_images) if config.reference_images else None,
        "by_arm": json.loads(summary.to_json(orient="records")),
        "paired_tests": comparisons,
    }
    (config.out / "clip_summary.json").write_text(json.dumps(json_ready(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    (config.out / "clip_table.md").write_text(clip_table_markdown(summary, report["model"]), encoding="utf-8")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for test in comparisons:
        print(
            f"{test['metric']}: {test['arm_b']} − {test['arm_a']} = {test['mean_difference']:+.3f} over {test['n_pairs']} pairs; "
            f"Wilcoxon p = {test['wilcoxon_p']:.4g}, paired t p = {test['t_p']:.4g}"
        )
    print(f"wrote {csv_path} and {config.out / 'clip_summary.json'}")
    return csv_path
