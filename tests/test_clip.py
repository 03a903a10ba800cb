"""CLIP scoring and the clip-check regression gate, on a tiny open_clip model written locally (no download).

The gate test needs a CLIP that really associates the fixture's images with their prompts; a random tiny
model gives scores near chance, so whether swapping images lowers them would be a coincidence. The
`aligned_clip` fixture therefore trains the tiny model contrastively (image → prompt cross-entropy, 40 Adam
steps, seconds on CPU) on the fixture's (image, prompt) pairs, saves it as an open_clip folder, and
asserts the alignment before any gate test relies on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from fangzhi.cli import main as cli_main
from fangzhi.errors import FangzhiError
from fangzhi.evaluate import clip_check as clip_check_module
from fangzhi.evaluate.clip_check import ClipCheckConfig, ClipGateRules, clip_check, gate_metric, read_baseline, resolve_rules
from fangzhi.evaluate.clip_score import paired_arm_test, score_manifest, summarize_by_arm
from fangzhi.models.clip import TINY_CLIP_MODEL_CFG, build_tiny_clip, clip_weights_sha256, load_clip, save_clip_folder

PROMPTS = {
    "circle": "a red circle on a white background",
    "square": "a blue square on a white background",
    "stripes": "green horizontal stripes on a white background",
    "triangle": "a black triangle on a yellow background",
}
SEEDS = (0, 1)
ARMS = ("base", "lora")


def draw_image(prompt_id: str, seed: int, arm: str, size: int = 96) -> Image.Image:
    """The prompt's content, jittered by seed; the lora arm adds a brown wash and a frame (its 'style')."""
    rng = np.random.default_rng([seed, list(PROMPTS).index(prompt_id)])
    dx, dy = (int(v) for v in rng.integers(-8, 9, size=2))
    background = (240, 220, 40) if prompt_id == "triangle" else (255, 255, 255)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if prompt_id == "circle":
        draw.ellipse((20 + dx, 20 + dy, 76 + dx, 76 + dy), fill=(220, 20, 20))
    elif prompt_id == "square":
        draw.rectangle((22 + dx, 22 + dy, 74 + dx, 74 + dy), fill=(20, 40, 220))
    elif prompt_id == "stripes":
        for top in range(4 + dy % 8, size, 16):
            draw.rectangle((0, top, size, top + 7), fill=(20, 170, 40))
    else:
        draw.polygon([(48 + dx, 14 + dy), (82 + dx, 80 + dy), (14 + dx, 80 + dy)], fill=(0, 0, 0))
    if arm == "lora":
        image = Image.blend(image, Image.new("RGB", image.size, (120, 80, 40)), 0.3)
        ImageDraw.Draw(image).rectangle((0, 0, size - 1, size - 1), outline=(60, 30, 10), width=5)
    return image


def write_manifest(folder: Path, images: list[tuple[str, int, str, Image.Image]]) -> Path:
    """A generation manifest as docs/formats.md describes it: one JSON line per (prompt_id, seed, arm, image)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt_id, seed, arm, image in images:
        image_id = hashlib.sha256(f"{folder.name}|{prompt_id}|{seed}|{arm}".encode()).hexdigest()[:16]
        path = folder / "images" / f"{image_id}.png"
        image.save(path)
        lines.append({
            "image_id": image_id, "file": f"images/{image_id}.png", "arm": arm, "prompt_id": prompt_id, "seed": seed,
            "prompt": PROMPTS[prompt_id] + (", fangzhi style" if arm == "lora" else ""), "prompt_en": PROMPTS[prompt_id],
            "narrative_zh": "", "source": "test", "negative": "", "chunked": False, "scheduler": "ddim", "steps": 2,
            "cfg": 7.5, "width": image.width, "height": image.height, "lora_scale": 1.0 if arm == "lora" else None,
            "base": "tiny", "base_sha256": "", "lora": "lora.safetensors" if arm == "lora" else None,
            "lora_sha256": "" if arm == "lora" else None,
            "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seconds": 0.1,
        })
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def fixture_images(seeds=SEEDS) -> list[tuple[str, int, str, Image.Image]]:
    return [(p, s, a, draw_image(p, s, a)) for p in PROMPTS for s in seeds for a in ARMS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def tiny_clip_dir(workdir) -> Path:
    return build_tiny_clip(workdir / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def manifest(workdir) -> Path:
    return write_manifest(workdir / "run", fixture_images())


@pytest.fixture(scope="module")
def reference_dir(workdir) -> Path:
    folder = workdir / "references"
    folder.mkdir()
    for i, prompt_id in enumerate(["circle", "square", "stripes"]):
        draw_image(prompt_id, seed=10 + i, arm="lora").save(folder / f"ref{i}.png")
    return folder


@pytest.fixture(scope="module")
def swapped_manifest(workdir, manifest) -> Path:
    """Same prompts, seeds and arms, but every image moved to the next prompt (circle's images under square, ...)."""
    order = list(PROMPTS)
    images = [(order[(order.index(p) + 1) % len(order)], s, a, draw_image(p, s, a)) for p in PROMPTS for s in SEEDS for a in ARMS]
    return write_manifest(workdir / "swapped", images)


@pytest.fixture(scope="module")
def aligned_clip_dir(workdir, tiny_clip_dir) -> Path:
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip(pretrained=str(tiny_clip_dir))
    images = fixture_images()
    pixels = torch.stack([preprocess(image) for *_, image in images])
    prompt_ids = list(PROMPTS)
    labels = torch.tensor([prompt_ids.index(p) for p, *_ in images])
    tokens = tokenizer([PROMPTS[p] for p in prompt_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = torch.nn.functional.cross_entropy(model.logit_scale.exp() * image_features @ text_features.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_clip_folder(model, TINY_CLIP_MODEL_CFG, workdir / "aligned-clip")


def check_config(manifest: Path, baseline: Path, clip_dir: Path, **overrides) -> ClipCheckConfig:
    return ClipCheckConfig(images=manifest, baseline=baseline, pretrained=str(clip_dir), device="cpu", **overrides)


# --- model loading -------------------------------------------------------------------------------------------


def test_build_tiny_clip_is_deterministic_small_and_loads_with_real_tokenizer(workdir, tiny_clip_dir):
    import open_clip

    again = build_tiny_clip(workdir / "tiny-clip-again", seed=0)
    other = build_tiny_clip(workdir / "tiny-clip-seed1", seed=1)
    weights = "open_clip_model.safetensors"
    assert (tiny_clip_dir / weights).read_bytes() == (again / weights).read_bytes()
    assert (tiny_clip_dir / weights).read_bytes() != (other / weights).read_bytes()
    assert (tiny_clip_dir / weights).stat().st_size < 20e6

    model, preprocess, tokenizer = load_clip(pretrained=str(tiny_clip_dir))
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    # The real BPE vocabulary: "red" is one token, <start> and <end> around it.
    assert tokenizer(["red"])[0, :3].tolist() == [49406, tokenizer.encoder["red</w>"], 49407]
    with torch.no_grad():
        features = model.encode_image(preprocess(draw_image("circle", 0, "base")).unsqueeze(0))
    assert features.shape == (1, TINY_CLIP_MODEL_CFG["embed_dim"])
    assert clip_weights_sha256(model) != clip_weights_sha256(load_clip(pretrained=str(other))[0])


def test_load_clip_offline_failures_say_what_was_tried(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with pytest.raises(FangzhiError, match="not found: /nonexistent/clip.safetensors"):
        load_clip("ViT-B-32", "/nonexistent/clip.safetensors")
    with pytest.raises(FangzhiError, match="no open_clip_config.json"):
        load_clip(pretrained=str(tmp_path))
    # No network and an empty cache: the download of the tag's weights fails.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(FangzhiError) as failure:
        load_clip("ViT-B-32", "openai")
    message = str(failure.value)
    assert "ViT-B-32 with pretrained=openai" in message
    assert "--pretrained /path/to/" in message and "huggingface.co/timm/vit_base_patch32_clip_224.openai" in message
    assert "--model ViT-B-32-quickgelu" in message  # OpenAI weights from a file need the QuickGELU architecture


# --- scores --------------------------------------------------------------------------------------------------


class _OpenClipAsTransformersClip:
    """The two methods torchmetrics' clip_score calls on a transformers CLIPModel, served by an open_clip model."""

    config = None  # torchmetrics reads model.config.text_config only when present

    def __init__(self, model):
        self.model = model

    def to(self, device):
        return self

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids)


def test_clip_score_agrees_with_torchmetrics(manifest, swapped_manifest, aligned_clip_dir):
    """Matched images (positive cosine) and swapped ones (negative cosine, clamped to 0) both follow torchmetrics."""
    from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

    clip = load_clip(pretrained=str(aligned_clip_dir))
    model, preprocess, tokenizer = clip

    def processor(images=None, text=None, **_):
        if images is not None:  # torchmetrics hands over tensors; ours are already preprocessed
            return {"pixel_values": torch.stack(images)}
        input_ids = tokenizer(text)
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    raw_cosines = []
    for manifest_path in (manifest, swapped_manifest):
        scores = score_manifest(manifest_path, clip, batch_size=5)
        assert list(scores.columns) == ["image_id", "arm", "prompt", "seed", "clip_score", "style_similarity"]
        assert len(scores) == len(PROMPTS) * len(SEEDS) * len(ARMS)
        assert scores["style_similarity"].isna().all()
        records = {r["image_id"]: r for r in map(json.loads, manifest_path.read_text().splitlines())}
        for row in scores.itertuples():
            record = records[row.image_id]
            pixels = preprocess(Image.open(manifest_path.parent / record["file"]).convert("RGB"))
            with torch.no_grad():
                expected = torchmetrics_clip_score(pixels, record["prompt_en"], lambda: (_OpenClipAsTransformersClip(model), processor))
                image = model.encode_image(pixels.unsqueeze(0))[0]
                text = model.encode_text(tokenizer([record["prompt_en"]]))[0]
            raw_cosines.append(float(torch.nn.functional.cosine_similarity(image, text, dim=0)))
            assert row.clip_score == pytest.approx(float(expected), abs=1e-3)
            assert row.clip_score == pytest.approx(max(100 * raw_cosines[-1], 0.0), abs=1e-3)
    assert min(raw_cosines) < 0 < max(raw_cosines)  # both sides of the clamp were exercised


def test_style_similarity_is_mean_cosine_to_references(manifest, tiny_clip_dir, reference_dir):
    clip = load_clip(pretrained=str(tiny_clip_dir))
    model, preprocess, _ = clip
    scores = score_manifest(manifest, clip, reference_images=reference_dir, batch_size=16)
    references = sorted(reference_dir.glob("*.png"))
    with torch.no_grad():
        reference_features = [model.encode_image(preprocess(Image.open(p).convert("RGB")).unsqueeze(0))[0] for p in references]
    records = {r["image_id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    for row in scores.sample(4, random_state=0).itertuples():
        with torch.no_grad():
            image = model.encode_image(preprocess(Image.open(manifest.parent / records[row.image_id]["file"]).convert("RGB")).unsqueeze(0))[0]
        expected = np.mean([float(torch.nn.functional.cosine_similarity(image, r, dim=0)) for r in reference_features])
        assert row.style_similarity == pytest.approx(expected, abs=1e-5)


def test_summary_and_paired_test_pair_by_prompt_and_seed():
    from scipy import stats

    rng = np.random.default_rng(0)
    rows = []
    for prompt in ["a", "b", "c", "d", "e", "f"]:
        for seed in (0, 1):
            base = float(rng.normal(25, 2))
            rows.append({"image_id": f"{prompt}{seed}b", "arm": "base", "prompt": prompt, "seed": seed, "clip_score": base, "style_similarity": 0.5})
            rows.append({"image_id": f"{prompt}{seed}l", "arm": "lora", "prompt": prompt, "seed": seed, "clip_score": base + 1 + float(rng.normal(0, 0.3)), "style_similarity": 0.6})
    scores = pd.DataFrame(rows)
    shuffled = scores.sample(frac=1, random_state=1)  # pairing must not depend on row order
    result = paired_arm_test(shuffled, "base", "lora")

    base = [r["clip_score"] for r in rows if r["arm"] == "base"]
    lora = [r["clip_score"] for r in rows if r["arm"] == "lora"]
    assert result["n_pairs"] == 12
    assert result["mean_difference"] == pytest.approx(np.mean(lora) - np.mean(base))
    assert result["t_p"] == pytest.approx(stats.ttest_rel(lora, base).pvalue)
    assert result["wilcoxon_p"] == pytest.approx(stats.wilcoxon(lora, base).pvalue)
    summary = summarize_by_arm(shuffled).set_index("arm")
    assert summary.loc["base", "n"] == 12
    assert summary.loc["lora", "clip_score_sd"] == pytest.approx(np.std(lora, ddof=1))
    assert summary.loc["lora", "style_similarity_mean"] == pytest.approx(0.6)


def test_clip_score_command_writes_csv(manifest, tiny_clip_dir, reference_dir, workdir, capsys):
    out = workdir / "clip-score-out"
    code = cli_main(["clip-score", "--manifest", str(manifest), "--pretrained", str(tiny_clip_dir), "--reference-images", str(reference_dir), "--out", str(out), "--device", "cpu"])
    assert code == 0
    table = pd.read_csv(out / "clip_scores.csv")
    assert len(table) == 16 and table["style_similarity"].notna().all()
    summary = json.loads((out / "clip_summary.json").read_text())
    assert {test["metric"] for test in summary["paired_tests"]} == {"clip_score", "style_similarity"}
    assert "lora" in capsys.readouterr().out


def test_clip_outputs_that_cannot_be_written_are_refused_before_the_model_loads(manifest, tiny_clip_dir, workdir, capsys, monkeypatch):
    monkeypatch.setattr("fangzhi.evaluate.clip_score.load_clip", lambda *a: pytest.fail("the model loaded first"))
    monkeypatch.setattr("fangzhi.evaluate.clip_check.load_clip", lambda *a: pytest.fail("the model loaded first"))
    a_file = workdir / "results.txt"
    a_file.write_text("mine")
    assert cli_main(["clip-score", "--manifest", str(manifest), "--pretrained", str(tiny_clip_dir), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"
    assert cli_main(["clip-check", "--images", str(manifest), "--baseline", str(workdir), "--update-baseline", "--pretrained", str(tiny_clip_dir)]) == 2
    assert f"--baseline {workdir}: is a folder" in capsys.readouterr().err


def test_bad_manifest_line_is_named(tmp_path, tiny_clip_dir):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"image_id": "x", "file": "images/x.png", "arm": "base", "prompt_id": "p", "seed": 0}\n', encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"line 1: missing field\(s\) .*prompt_en"):
        score_manifest(manifest, load_clip(pretrained=str(tiny_clip_dir)))


# --- the regression gate -------------------------------------------------------------------------------------


def test_aligned_tiny_clip_prefers_the_right_prompt(manifest, aligned_clip_dir):
    """Precondition of the gate tests: the trained tiny CLIP scores every image highest under its own prompt."""
    clip = load_clip(pretrained=str(aligned_clip_dir))
    model, preprocess, tokenizer = clip
    with torch.no_grad():
        texts = torch.nn.functional.normalize(model.encode_text(tokenizer(list(PROMPTS.values()))), dim=-1)
        for prompt_id, seed, arm, image in fixture_images():
            image_features = torch.nn.functional.normalize(model.encode_image(preprocess(image).unsqueeze(0)), dim=-1)[0]
            cosines = (texts @ image_features).tolist()
            own = cosines[list(PROMPTS).index(prompt_id)]
            assert own == max(cosines) and own - sorted(cosines)[-2] > 0.05, (prompt_id, seed, arm, cosines)


def test_clip_check_passes_on_baseline_images_and_fails_when_images_are_swapped(
    manifest, swapped_manifest, aligned_clip_dir, reference_dir, workdir, capsys,
):
    baseline = workdir / "gate" / "clip_baseline.json"
    shared = {"reference_images": reference_dir}
    assert clip_check(check_config(manifest, baseline, aligned_clip_dir, update_baseline=True, **shared)) == 0
    stored = json.loads(baseline.read_text())
    assert stored["model"] == "local-dir:aligned-clip" and stored["seeds"] == [0, 1] and stored["prompts"] == PROMPTS
    assert stored["format"] == "fangzhi-clip-baseline/2" and stored["rules"]["tolerance"] == 0.5 and stored["rules"]["collapse_max_images"] == 2
    assert len(stored["images"]) == 16

    report_path = workdir / "gate" / "same.json"
    assert clip_check(check_config(manifest, baseline, aligned_clip_dir, out=report_path, **shared)) == 0
    same = json.loads(report_path.read_text())
    assert same["verdict"] == "pass" and all(c["mean_drop"] == pytest.approx(0, abs=1e-6) for c in same["checks"] if c["rule"] != "collapse")
    assert "PASS" in capsys.readouterr().out

    report_path = workdir / "gate" / "swapped.json"
    assert clip_check(check_config(swapped_manifest, baseline, aligned_clip_dir, out=report_path, **shared)) == 1
    swapped = {(c["metric"], c["rule"], c["arm"]): c for c in json.loads(report_path.read_text())["checks"]}
    # It fails for the right reason: CLIP score dropped significantly and beyond tolerance in each arm ...
    for arm in ARMS:
        assert swapped[("clip_score", "arm", arm)]["regression"] and swapped[("clip_score", "arm", arm)]["wilcoxon_p_less"] < 0.05
        assert swapped[("clip_score", "arm", arm)]["mean_drop"] > 0.5
        # ... while each arm keeps the same set of images, so its mean style similarity is unchanged (a per-prompt shuffle only).
        assert not swapped[("style_similarity", "arm", arm)]["regression"]
        assert swapped[("style_similarity", "arm", arm)]["mean_drop"] == pytest.approx(0, abs=1e-5)
    assert "FAIL" in capsys.readouterr().out

    # The same through the command line: exit 1 on regression.
    assert cli_main(["clip-check", "--images", str(swapped_manifest), "--baseline", str(baseline), "--pretrained", str(aligned_clip_dir),
                     "--reference-images", str(reference_dir), "--device", "cpu", "--out", str(report_path)]) == 1
    # Tolerances larger than the drops let it through: significance alone is not a regression.
    loose = check_config(swapped_manifest, baseline, aligned_clip_dir, out=report_path, tolerance=100, collapse_drop=100, style_collapse_drop=2, **shared)
    assert clip_check(loose) == 0


def test_clip_check_refuses_a_baseline_made_differently(manifest, aligned_clip_dir, tiny_clip_dir, workdir, capsys):
    baseline = workdir / "refuse" / "clip_baseline.json"
    assert clip_check(check_config(manifest, baseline, aligned_clip_dir, update_baseline=True)) == 0
    before = baseline.read_bytes()

    # Same folder name (so the same model name) but the untrained weights: only the weights hash tells them apart.
    other_weights = shutil.copytree(tiny_clip_dir, workdir / "elsewhere" / "aligned-clip")
    with pytest.raises(FangzhiError, match=r"refusing to compare(.|\n)*CLIP weights"):
        clip_check(check_config(manifest, baseline, other_weights))

    fewer_seeds = write_manifest(workdir / "seed-0-and-2", fixture_images(seeds=(0, 2)))
    code = cli_main(["clip-check", "--images", str(fewer_seeds), "--baseline", str(baseline), "--pretrained", str(aligned_clip_dir), "--device", "cpu"])
    assert code == 2
    assert "seeds: baseline [0, 1], now [0, 2]" in capsys.readouterr().err
    assert baseline.read_bytes() == before  # a refused check leaves the baseline alone

    with pytest.raises(FangzhiError, match="--update-baseline"):
        clip_check(check_config(manifest, workdir / "refuse" / "missing.json", aligned_clip_dir))


def test_clip_check_needs_enough_images_for_its_test(tmp_path, aligned_clip_dir):
    small = write_manifest(tmp_path / "small", fixture_images()[:4])
    with pytest.raises(FangzhiError, match=r"too few images per arm for the gate \(base: 2, lora: 2\)(.|\n)*at least 5 images per arm"):
        clip_check(check_config(small, tmp_path / "baseline.json", aligned_clip_dir, update_baseline=True))


@pytest.fixture(scope="module")
def good_baseline(manifest, tiny_clip_dir, reference_dir, workdir) -> Path:
    baseline = workdir / "good" / "clip_baseline.json"
    assert clip_check(check_config(manifest, baseline, tiny_clip_dir, update_baseline=True, reference_images=reference_dir)) == 0
    return baseline


# Each edit breaks a copy of a good baseline and returns the phrases the error must contain.
def score_not_a_number(baseline: dict) -> list[str]:
    baseline["images"][3]["clip_score"] = "high"
    return ["key 'images.3.clip_score': value \"high\" is invalid: Input should be a valid number", f"images.3 is image_id {baseline['images'][3]['image_id']!r}"]


def seed_missing(baseline: dict) -> list[str]:
    del baseline["images"][5]["seed"]
    return ["key 'images.5.seed': required but not given", f"images.5 is image_id {baseline['images'][5]['image_id']!r}"]


def seed_as_text(baseline: dict) -> list[str]:
    baseline["images"][0]["seed"] = "0"  # fangzhi writes numbers; text here is a hand edit, which lax parsing would let through
    return ["key 'images.0.seed': value \"0\" is invalid: Input should be a valid integer"]


def alpha_negative(baseline: dict) -> list[str]:
    baseline["rules"]["alpha"] = -1
    return ["key 'rules.alpha': value -1 is invalid: Input should be greater than 0"]


def scores_not_finite(baseline: dict) -> list[str]:
    baseline["images"][2].update(clip_score=float("nan"), style_similarity=float("inf"))  # json.dumps writes NaN and Infinity
    return ["key 'images.2.clip_score': value NaN is invalid: Input should be a finite number",
            "key 'images.2.style_similarity': value Infinity is invalid: Input should be a finite number"]


def no_images(baseline: dict) -> list[str]:
    baseline["images"] = []
    return ["key 'images': value [] is invalid: List should have at least 1 item"]


def repeated_image(baseline: dict) -> list[str]:
    repeated = dict(baseline["images"][4])
    baseline["images"].append(repeated)
    return [f"images.16 (image_id {repeated['image_id']!r}) repeats arm {repeated['arm']!r}, prompt {repeated['prompt']!r}, seed {repeated['seed']} of images.4"]


def style_missing_with_reference_set(baseline: dict) -> list[str]:
    baseline["images"][6]["style_similarity"] = None
    return [f"images.6.style_similarity (image_id {baseline['images'][6]['image_id']!r}): null, but the baseline has reference images"]


def several_problems(baseline: dict) -> list[str]:
    return [*score_not_a_number(baseline), *seed_missing(baseline), *alpha_negative(baseline)]


@pytest.mark.parametrize("edit", [score_not_a_number, seed_missing, seed_as_text, alpha_negative, scores_not_finite, no_images,
                                  repeated_image, style_missing_with_reference_set, several_problems])
def test_clip_check_rejects_a_broken_baseline_with_exit_2(edit, good_baseline, manifest, tiny_clip_dir, reference_dir, tmp_path, monkeypatch, capsys):
    baseline = json.loads(good_baseline.read_text())
    expected = edit(baseline)
    broken = tmp_path / "clip_baseline.json"
    broken.write_text(json.dumps(baseline, indent=2))

    def load_clip_too_early(*args, **kwargs):
        pytest.fail("the CLIP model was loaded before the baseline was validated")

    monkeypatch.setattr(clip_check_module, "load_clip", load_clip_too_early)
    code = cli_main(["clip-check", "--images", str(manifest), "--baseline", str(broken), "--pretrained", str(tiny_clip_dir),
                     "--reference-images", str(reference_dir), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2  # bad input, never 1: CI must not report a broken baseline as a regression
    assert error.startswith(f"error: {broken}: ")
    for phrase in expected:
        assert phrase in error
    assert "--update-baseline" in error


# --- the gate's rules on known numbers -----------------------------------------------------------------------


def paired_numbers(n_prompts: int = 21, n_seeds: int = 4, seed: int = 0) -> pd.DataFrame:
    """Baseline CLIP scores for base/LoRA image pairs; current = baseline until a test changes it."""
    rng = np.random.default_rng(seed)
    rows = [(arm, f"p{p}", s, f"{arm}{p}-{s}", 30 + 3 * rng.standard_normal()) for p in range(n_prompts) for s in range(n_seeds) for arm in ARMS]
    frame = pd.DataFrame(rows, columns=["arm", "prompt", "seed", "image_id", "clip_score_baseline"])
    return frame.assign(clip_score=frame["clip_score_baseline"])


def verdicts(paired: pd.DataFrame, rules: ClipGateRules = ClipGateRules()) -> dict:
    return {(c["rule"], c["arm"]): c["regression"] for c in gate_metric(paired, "clip_score", rules.tolerance, rules.collapse_drop, rules)}


def test_gate_fails_a_drop_in_the_lora_arm_alone():
    paired = paired_numbers()
    lora = paired["arm"] == "lora"
    paired.loc[lora, "clip_score"] -= 0.9  # pooled over both arms this is a 0.45 drop, inside the 0.5 tolerance
    result = verdicts(paired)
    assert result[("arm", "lora")] and result[("difference", "lora − base")]
    assert not result[("arm", "base")] and not result[("collapse", "all")]


def test_gate_passes_both_arms_jittered():
    paired = paired_numbers()
    paired["clip_score"] += np.random.default_rng(1).normal(0, 0.3, len(paired))  # GPU vs CPU arithmetic, say
    assert not any(verdicts(paired).values())


def test_gate_fails_when_a_few_images_collapse():
    paired = paired_numbers()
    collapsed = paired.sample(8, random_state=0).index
    paired.loc[collapsed, "clip_score"] -= 10  # 8 of 168 images: the means move by under 0.5
    result = verdicts(paired)
    assert result[("collapse", "all")] and not result[("arm", "base")]
    assert not verdicts(paired, ClipGateRules(collapse_max_images=8))[("collapse", "all")]


def test_rules_come_from_flags_then_the_baseline_then_defaults(good_baseline, tmp_path):
    stored = json.loads(good_baseline.read_text())
    path = tmp_path / "b.json"
    config = ClipCheckConfig(images=tmp_path / "m.jsonl", baseline=path, tolerance=0.2)
    path.write_text(json.dumps({**stored, "rules": {"tolerance": 0.9, "collapse_max_images": 5}}))
    rules, note = resolve_rules(config, read_baseline(path))
    assert rules.tolerance == 0.2 and rules.collapse_max_images == 5 and rules.alpha == 0.05 and note is None
    old = {key: value for key, value in stored.items() if key != "rules"}  # an old baseline: no stored rules
    path.write_text(json.dumps({**old, "format": "fangzhi-clip-baseline/1"}))
    rules, note = resolve_rules(config, read_baseline(path))
    assert rules.tolerance == 0.2 and rules.collapse_drop == 5.0 and "older fangzhi" in note and "--update-baseline" in note
