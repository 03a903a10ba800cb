"""`fangzhi generate` on the tiny base: paired arms, determinism, fused LoRA, resume, manifest, PNG text, multi-process."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fangzhi.cli import main
from fangzhi.errors import FangzhiError
from fangzhi.generate import GenerateConfig, generate, parse_seeds, read_manifest
from fangzhi.generate.config import lora_arms_from_specs
from fangzhi.generate.run import plan_work
from fangzhi.generate.prompts import load_prompt_set
from fangzhi.models import weights_sha256
from fangzhi.train import TrainConfig, train

# The shipped set's first two prompts: 'xishan' fits in 75 CLIP tokens, 'xishan-qingxue' does not.
SMALL = dict(limit_prompts=2, seeds=[0, 1, 2], steps=4, width=64, height=64, batch_size=4)


@pytest.fixture(scope="module")
def lora_dir(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-lora")
    train(TrainConfig.model_validate({
        "base": tiny_base, "output_dir": str(out), "data": {"resolution": 64, "repeats": 1},
        "lora": {"rank": 4, "alpha": 4}, "max_steps": 8, "learning_rate": 1e-2, "optimizer": "adamw",
        "checkpoint_every": 1000, "seed": 0,
    }))
    return out


def config(base: str, out: Path, **overrides) -> GenerateConfig:
    return GenerateConfig.model_validate({"base": base, "out": str(out), **SMALL, **overrides})


@pytest.fixture(scope="module")
def paired_run(tiny_base, lora_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paired")
    generate(config(tiny_base, out, loras=[{"path": str(lora_dir)}]))
    return out


def by_key(out: Path) -> dict[tuple, dict]:
    return {(r["arm"], r["prompt_id"], r["seed"]): r for r in read_manifest(out / "manifest.jsonl")}


def pixels(out: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(out / record["file"]).convert("RGB"), dtype=np.int16)


def test_manifest_is_complete_and_matches_the_files(paired_run: Path, tiny_base, lora_dir):
    records = read_manifest(paired_run / "manifest.jsonl", check_files=True)
    keys = {(r["arm"], r["prompt_id"], r["seed"]) for r in records}
    assert keys == {(arm, p, s) for arm in ("base", "lora") for p in ("xishan", "xishan-qingxue") for s in (0, 1, 2)}
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    for r in records:
        assert re.fullmatch(r"[0-9a-f]{16}", r["image_id"]) and r["file"] == f"images/{r['image_id']}.png"
        assert hashlib.sha256((paired_run / r["file"]).read_bytes()).hexdigest() == r["image_sha256"]
        assert (r["scheduler"], r["steps"], r["cfg"], r["width"], r["height"]) == ("DDIM", 4, 7.0, 64, 64)
        assert r["prompt"] == "shuntianfuzhi style, " + r["prompt_en"]  # trigger in both arms by default
        assert r["base"] == tiny_base and r["base_sha256"] == weights_sha256(tiny_base)
        assert r["seconds"] > 0
        if r["arm"] == "base":
            assert r["lora"] is None and r["lora_scale"] is None and r["lora_sha256"] is None
        else:
            assert r["lora_scale"] == 1.0 and r["lora_sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()
        assert r["chunked"] == (r["prompt_id"] == "xishan-qingxue")
    assert sorted(p.name for p in (paired_run / "images").iterdir()) == sorted(f"{r['image_id']}.png" for r in records)


def test_other_stages_read_the_manifest(paired_run: Path):
    from fangzhi.evaluate.clip_score import read_manifest as clip_read_manifest
    from fangzhi.rating_app.study import read_manifest as study_read_manifest

    assert len(study_read_manifest(paired_run / "manifest.jsonl")) == 12
    assert len(clip_read_manifest(paired_run / "manifest.jsonl")) == 12


def a1111_autov3(path: Path) -> str:
    """A1111's `addnet_hash_safetensors` (modules/hashes.py): sha256 of the bytes after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_png_carries_a1111_parameters(paired_run: Path, tiny_base, lora_dir):
    records = by_key(paired_run)
    base_text = Image.open(paired_run / records[("base", "xishan", 1)]["file"]).text["parameters"]
    prompt, settings = base_text.split("\n")
    assert prompt == records[("base", "xishan", 1)]["prompt"]
    # A diffusers-folder base has no A1111 model hash (AutoV2 is defined for one checkpoint file only).
    assert settings == f"Steps: 4, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Model: {Path(tiny_base).name}, Version: fangzhi"
    # Training wrote a kohya export beside the LoRA: that is the file A1111 users load, so it is named and hashed.
    kohya = next(p for p in lora_dir.glob("*.safetensors") if p.name != "pytorch_lora_weights.safetensors")
    lora_text = Image.open(paired_run / records[("lora", "xishan", 1)]["file"]).text["parameters"]
    assert f"<lora:{kohya.stem}:1>" in lora_text.split("\n")[0]
    assert f"Lora hashes: \"{kohya.stem}: {a1111_autov3(kohya)[:12]}\"" in lora_text


def test_single_file_base_and_odd_lora_names_get_a1111_hashes(tiny_base, lora_dir, tmp_path: Path):
    from ldm_checkpoint import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    from fangzhi.models import load_pipeline

    checkpoint = tmp_path / "base.safetensors"
    save_file(diffusers_to_ldm_state_dict(load_pipeline(tiny_base)), checkpoint)
    odd = tmp_path / "loras" / "my,style:v2.safetensors"  # A1111's parsers split on ',' and ':'
    odd.parent.mkdir()
    odd.write_bytes((lora_dir / "pytorch_lora_weights.safetensors").read_bytes())
    out = tmp_path / "out"
    generate(config(str(checkpoint), out, base_config=tiny_base, loras=[{"path": str(odd)}], limit_prompts=1, seeds=[0], steps=2))
    record = by_key(out)[("lora", "xishan", 0)]
    prompt, settings = Image.open(out / record["file"]).text["parameters"].split("\n")
    autov2 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert prompt.endswith(" <lora:mystylev2:1>")
    assert f"Model hash: {autov2}, Model: base, Lora hashes: \"mystylev2: {a1111_autov3(odd)[:12]}\"" in settings


def test_nan_and_black_images_are_refused_and_the_rest_written(tiny_base, tmp_path: Path, monkeypatch, capsys):
    from diffusers import AutoencoderKL

    decode = AutoencoderKL.decode

    def broken_decode(self, latents, *args, **kwargs):
        # The real tiny VAE decodes; then the first image of each batch becomes NaN (as an fp16 overflow gives)
        # and the second all black (-1 is black after the pipeline's [-1, 1] → [0, 1] mapping).
        output = decode(self, latents, *args, **kwargs)
        images = output[0] if isinstance(output, tuple) else output.sample  # the pipeline asks for return_dict=False
        images[0] = float("nan")
        images[1] = -1.0
        return output

    monkeypatch.setattr(AutoencoderKL, "decode", broken_decode)
    out = tmp_path / "broken"
    with pytest.raises(FangzhiError) as caught:
        generate(config(tiny_base, out, limit_prompts=1, seeds=[0, 1, 2], contact_sheets=False))
    message = str(caught.value)
    assert "2 images were refused" in message and "bf16" in message
    assert "base/xishan/seed 0: the decoded image has NaN/inf pixels" in message
    assert "base/xishan/seed 1: the decoded image is all black" in message
    assert "refused base/xishan/seed 0" in capsys.readouterr().out  # said when it happens, not only at the end
    records = read_manifest(out / "manifest.jsonl", check_files=True)
    assert [(r["prompt_id"], r["seed"]) for r in records] == [("xishan", 2)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{records[0]['image_id']}.png"]
    assert pixels(out, records[0]).max() > 0


def test_file_names_do_not_reveal_the_arm(paired_run: Path):
    records = list(by_key(paired_run).values())
    for r in records:
        name = Path(r["file"]).stem
        assert r["arm"] not in name and r["prompt_id"] not in name
    # The ids are not ordered by arm either: sorting by file name mixes the arms.
    arms_in_name_order = [r["arm"] for r in sorted(records, key=lambda r: r["file"])]
    assert arms_in_name_order != sorted(arms_in_name_order) and arms_in_name_order != sorted(arms_in_name_order, reverse=True)


def test_contact_sheet_per_prompt(paired_run: Path):
    sheets = sorted((paired_run / "contact_sheets").glob("*.png"))
    assert sorted(s.stem for s in sheets) == ["xishan", "xishan-qingxue"]
    with Image.open(paired_run / "contact_sheets" / "xishan.png") as sheet:
        # two arms side by side, three seeds stacked: wider than one cell per arm, taller than three cells
        assert sheet.width > 2 * 64 and sheet.height > 3 * sheet.width / 2 * 0.9


def test_arms_differ_only_by_the_lora(paired_run: Path, tiny_base, lora_dir, tmp_path: Path):
    records = by_key(paired_run)
    for prompt_id in ("xishan", "xishan-qingxue"):
        base, lora = pixels(paired_run, records[("base", prompt_id, 0)]), pixels(paired_run, records[("lora", prompt_id, 0)])
        assert np.abs(base - lora).mean() > 0.5, "the trained LoRA must change the image"
    # Two LoRA arms in one run: the full LoRA again, then the same LoRA at scale 0, which must give the base
    # image back (so the first arm's weights were fully removed); the base arm is the paired run's.
    out = tmp_path / "zero"
    assert main(["generate", "--base", tiny_base, "--lora", str(lora_dir), "--lora", f"{lora_dir}:0:zero", "--limit-prompts", "2",
                 "--seeds", "0-2", "--steps", "4", "--size", "64", "--batch-size", "4", "--out", str(out)]) == 0
    again = by_key(out)
    assert {arm for arm, _, _ in again} == {"base", "lora@1", "zero"}
    for (arm, prompt_id, seed), record in again.items():
        expected = records[("lora" if arm == "lora@1" else "base", prompt_id, seed)]
        if arm == "zero":
            assert np.abs(pixels(out, record) - pixels(paired_run, expected)).max() <= 1
        else:
            assert np.array_equal(pixels(out, record), pixels(paired_run, expected)), (arm, prompt_id, seed)


def test_same_seed_same_image_whatever_the_batch(paired_run: Path, tiny_base, lora_dir, tmp_path: Path):
    out = tmp_path / "batch1"
    generate(config(tiny_base, out, loras=[{"path": str(lora_dir)}], batch_size=1))
    reference, single = by_key(paired_run), by_key(out)
    for key, record in reference.items():
        # Batched CPU matmuls round differently from single ones, so allow one 8-bit level on a few pixels.
        difference = np.abs(pixels(out, single[key]) - pixels(paired_run, record))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, key
    seeds = [pixels(out, single[("base", "xishan", seed)]) for seed in (0, 1, 2)]
    assert np.abs(seeds[0] - seeds[1]).mean() > 1, "different seeds must give different images"


def test_fused_and_unfused_lora_give_the_same_image(tiny_base, lora_dir, tmp_path: Path):
    arms = [{"path": str(lora_dir), "scale": 0.7}]
    generate(config(tiny_base, tmp_path / "fused", loras=arms, limit_prompts=1, seeds=[5]))
    generate(config(tiny_base, tmp_path / "unfused", loras=arms, limit_prompts=1, seeds=[5], fuse_lora=False))
    fused, unfused = by_key(tmp_path / "fused"), by_key(tmp_path / "unfused")
    key = ("lora", "xishan", 5)
    assert np.abs(pixels(tmp_path / "fused", fused[key]) - pixels(tmp_path / "unfused", unfused[key])).max() <= 2
    assert np.abs(pixels(tmp_path / "fused", fused[key]) - pixels(tmp_path / "fused", fused[("base", "xishan", 5)])).mean() > 0.3


def test_compiled_unet_is_compiled_once_for_both_arms_and_a_short_last_batch(tiny_base, lora_dir, tmp_path: Path):
    import torch._dynamo

    torch._dynamo.reset()
    # 5 seeds in batches of 4: a full and a short batch per arm, base then fused LoRA, with no recompilation.
    # (config.patch, not monkeypatch: undoing a monkeypatch on dynamo's config module loses the setting.)
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(config(tiny_base, tmp_path / "compiled", loras=[{"path": str(lora_dir)}], limit_prompts=1, seeds=[0, 1, 2, 3, 4],
                        steps=2, compile=True, contact_sheets=False))
    assert len(read_manifest(tmp_path / "compiled" / "manifest.jsonl", check_files=True)) == 10


def test_rerun_repairs_missing_corrupt_and_half_written_images(paired_run: Path, tiny_base, lora_dir, tmp_path: Path, capsys):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(paired_run, out)
    records = read_manifest(out / "manifest.jsonl")
    original = {r["image_id"]: r["image_sha256"] for r in records}
    (out / records[0]["file"]).unlink()
    (out / records[5]["file"]).write_bytes((out / records[5]["file"]).read_bytes()[:100])  # truncated
    (out / "images" / "deadbeefdeadbeef.png.tmp").write_bytes(b"half")
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write('{"image_id": "0123')  # a line cut off by a crash
    generate(config(tiny_base, out, loras=[{"path": str(lora_dir)}]))
    assert "wrote 2 images (10 were already there)" in capsys.readouterr().out
    repaired = read_manifest(out / "manifest.jsonl", check_files=True)
    assert {r["image_id"] for r in repaired} == set(original)
    for record in repaired:
        # A repaired image is made in a smaller batch: same image up to float rounding (at most one 8-bit level).
        before = np.asarray(Image.open(paired_run / record["file"]), dtype=np.int16)
        after = np.asarray(Image.open(out / record["file"]), dtype=np.int16)
        assert np.abs(before - after).max() <= 1, record["file"]
    assert not list((out / "images").glob("*.tmp"))


def test_ctrl_c_leaves_a_consistent_manifest_and_a_rerun_finishes(tiny_base, lora_dir, tmp_path: Path):
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "fangzhi", "generate", "--base", tiny_base, "--lora", str(lora_dir), "--limit-prompts", "2",
               "--seeds", "0-5", "--steps", "8", "--size", "64", "--batch-size", "1", "--out", str(out)]
    # Ctrl-C as in a terminal: a test run started in the background (as CI may start it) has SIGINT ignored, and a
    # child inherits that, so the command would run to its end instead.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.is_file() and manifest.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    partial = read_manifest(manifest, check_files=True)
    assert 2 <= len(partial) < 24
    assert main(command[3:]) == 0
    final = read_manifest(manifest, check_files=True)
    assert len(final) == 24 and {r["image_id"] for r in partial} <= {r["image_id"] for r in final}


def test_rerun_with_other_settings_is_refused(paired_run: Path, tiny_base, lora_dir):
    with pytest.raises(FangzhiError, match=r"line \d+: .*other settings \(.*steps 4 → 3"):
        generate(config(tiny_base, paired_run, loras=[{"path": str(lora_dir)}], steps=3))


def test_trigger_arms_lora_keeps_the_trigger_out_of_the_base_arm(lora_dir):
    cfg = GenerateConfig(loras=[{"path": str(lora_dir)}], trigger_arms="lora", seeds=[0])
    entries = load_prompt_set(cfg.prompts)[:1]
    from fangzhi.generate.run import _lora_sources

    items = plan_work(cfg, entries, _lora_sources(cfg), "salt", "sha", "fp32")
    prompts = {item.record["arm"]: item.record["prompt"] for item in items}
    assert prompts == {"base": entries[0].prompt_en, "lora": f"shuntianfuzhi style, {entries[0].prompt_en}"}


def test_seed_and_lora_flag_parsing():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("3-1", "a", ""):
        with pytest.raises(FangzhiError, match="seed"):
            parse_seeds(bad)
    assert lora_arms_from_specs(["out/l:0.5:half", "out/m:0.8", "out/n"], [0.5, 1.0]) == [
        {"path": "out/l", "scale": 0.5, "label": "half"}, {"path": "out/m", "scale": 0.8},
        {"path": "out/n", "scale": 0.5}, {"path": "out/n", "scale": 1.0},
    ]
    labels = GenerateConfig(loras=lora_arms_from_specs(["a", "b:0.5:x"], [0.5, 1.0]))
    from fangzhi.generate.config import arm_labels

    assert arm_labels(labels.loras) == ["lora@0.5", "lora@1", "x"]
    with pytest.raises(ValueError, match="both be called 'lora@1'"):
        GenerateConfig(loras=[{"path": "a"}, {"path": "b"}])


def test_bad_inputs_give_clear_errors(tiny_base, tmp_path: Path, capsys):
    bad = tmp_path / "prompts.yaml"
    bad.write_text("- id: a\n  source: x\n  narrative_zh: y\n  promt_en: z\n")
    code = main(["generate", "--base", tiny_base, "--prompts", str(bad), "--out", str(tmp_path / "o"), "--size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "prompts.yaml" in err and "promt_en" in err and "Traceback" not in err
    assert main(["generate", "--base", tiny_base, "--seeds", "5-1", "--out", str(tmp_path / "o")]) == 2
    assert "5-1" in capsys.readouterr().err
    assert main(["generate", "--base", tiny_base, "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"image_id": "a"}\n')
    with pytest.raises(FangzhiError, match=r"manifest.jsonl, line 1: missing field\(s\) file, arm"):
        read_manifest(manifest)
    manifest.write_text("\n{not json\n")
    with pytest.raises(FangzhiError, match=r"line 2: not valid JSON"):
        read_manifest(manifest)


def wrong_lora_files(folder: Path) -> list[tuple[str, Path]]:
    """Files a user may pass as a LoRA by mistake, each alone in a folder, with the words its refusal must contain."""
    from safetensors.torch import save_file

    files = [folder / "csv" / "scores.csv", folder / "text" / "fake.safetensors", folder / "unet" / "unet.safetensors"]
    for file in files:
        file.parent.mkdir(parents=True)
    files[0].write_text("image,score\na.png,4\n")
    files[1].write_text("not a tensor file\n")
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)}, str(files[2]))
    return [("not a safetensors file", files[0]), ("not a safetensors file", files[1]), ("holds no LoRA weights", files[2])]


def test_generate_checks_every_lora_file_before_any_image(tiny_base, lora_dir, tmp_path: Path, capsys):
    for words, bad in wrong_lora_files(tmp_path / "wrong"):
        out = tmp_path / bad.stem
        # The good LoRA first: the wrong one must be refused before the base and first LoRA arms are generated.
        code = main(["generate", "--base", tiny_base, "--lora", f"{lora_dir}:1:good", "--lora", f"{bad}:1:wrong", "--out", str(out),
                     "--limit-prompts", "1", "--seeds", "0", "--steps", "2", "--size", "64"])
        err = capsys.readouterr().err
        assert code == 2 and str(bad) in err and words in err and "Traceback" not in err
        assert not list(out.glob("images/*.png"))


def test_an_unreadable_file_beside_the_lora_does_not_stop_generate(tiny_base, lora_dir, tmp_path: Path):
    from fangzhi.generate.run import _lora_sources

    folder = tmp_path / "loras"
    folder.mkdir()
    kohya = next(p for p in lora_dir.glob("*_kohya.safetensors"))
    for source in (lora_dir / "pytorch_lora_weights.safetensors", kohya):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "a-broken.safetensors").write_text("half a download")  # sorts before the kohya export
    [source] = _lora_sources(config(tiny_base, tmp_path / "out", loras=[{"path": str(folder)}]))
    assert source.a1111_name == kohya.stem


def test_lora_export_refuses_files_it_cannot_export(lora_dir, tmp_path: Path, capsys):
    out = tmp_path / "k.safetensors"
    kohya = next(p for p in lora_dir.glob("*_kohya.safetensors"))
    cases = [*wrong_lora_files(tmp_path / "wrong"), ("already in kohya format", kohya)]
    for words, bad in cases:
        for alpha in ([], ["--alpha", "8"]):
            assert main(["lora", "export", str(bad), "--out", str(out), *alpha]) == 2
            err = capsys.readouterr().err
            assert str(bad) in err and words in err and "Traceback" not in err, err
            assert "lora_adapter_metadata" not in err and not out.exists()
    assert "A1111 and ComfyUI load it as it is" in err


def test_lora_export_never_writes_over_its_source(lora_dir, tmp_path: Path, capsys):
    source = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    source.parent.mkdir()
    source.write_bytes((lora_dir / "pytorch_lora_weights.safetensors").read_bytes())
    before = source.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(source)
    same_file = [source, tmp_path / "lora" / ".." / "lora" / source.name, tmp_path / "link.safetensors"]
    for src, out in [(source, target) for target in same_file] + [(source.parent, source)]:
        assert main(["lora", "export", str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is the LoRA being exported ({source})" in err
    assert main(["lora", "export", str(source), "--out", str(source.parent)]) == 2
    assert f"--out {source.parent}: is a folder" in capsys.readouterr().err
    assert source.read_bytes() == before and sorted(p.name for p in source.parent.iterdir()) == [source.name]


@pytest.mark.parametrize("alpha", ["-4", "0", "nan", "inf"])
def test_lora_export_alpha_must_be_a_positive_number(lora_dir, tmp_path: Path, capsys, alpha: str):
    out = tmp_path / "k.safetensors"
    assert main(["lora", "export", str(lora_dir), f"--alpha={alpha}", "--out", str(out)]) == 2
    assert f"--alpha {alpha}: the LoRA alpha must be a number above 0" in capsys.readouterr().err
    assert not out.exists()


def test_lora_scale_after_an_existing_path_must_be_a_finite_number(tiny_base, lora_dir, tmp_path: Path, capsys):
    for spec, scale in [(f"{lora_dir}:abc", "abc"), (f"{lora_dir}:nan", "nan"), (f"{lora_dir}:inf:x", "inf"), (f"{lora_dir}:half:x", "half")]:
        with pytest.raises(FangzhiError, match=f"--lora {re.escape(spec)}: the scale '{scale}' is not a finite number"):
            lora_arms_from_specs([spec])
    assert main(["generate", "--base", tiny_base, "--lora", f"{lora_dir}:nan", "--out", str(tmp_path / "o")]) == 2
    assert f"the scale 'nan' is not a finite number; write --lora {lora_dir}:SCALE" in capsys.readouterr().err
    # A path with ':' in its name stays whole, whether it exists or not (the missing one is reported as missing),
    # also when the part before the ':' exists too.
    odd = tmp_path / "style:v2"
    odd.mkdir()
    (tmp_path / "style").mkdir()
    assert lora_arms_from_specs([str(odd), f"{tmp_path}/gone:abc"]) == [{"path": str(odd), "scale": 1.0}, {"path": f"{tmp_path}/gone:abc", "scale": 1.0}]
    with pytest.raises(ValueError, match="loras.0.scale"):
        GenerateConfig(loras=[{"path": str(lora_dir), "scale": float("nan")}])


def test_two_processes_make_the_same_images_as_one(tiny_base, lora_dir, tmp_path: Path):
    # Batch size 1 and one thread in both runs: the same float rounding, so the PNG bytes must match.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(config(tiny_base, tmp_path / "one", loras=[{"path": str(lora_dir)}], batch_size=1, seeds=[0, 1]))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # `--cpu` with several processes would need mpirun; `--multi_gpu` starts them with torchrun, and without
        # a GPU fangzhi asks accelerate for a CPU (gloo) process group.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fangzhi", "generate", "--base", tiny_base,
         "--lora", str(lora_dir), "--limit-prompts", "2", "--seeds", "0,1", "--steps", "4", "--size", "64",
         "--batch-size", "1", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[process 1]" in result.stdout, "the work must really be split"
    one, two = by_key(tmp_path / "one"), by_key(tmp_path / "two")
    assert len(read_manifest(tmp_path / "two" / "manifest.jsonl", check_files=True)) == 8
    assert {k: r["image_sha256"] for k, r in two.items()} == {k: r["image_sha256"] for k, r in one.items()}
    assert not list((tmp_path / "two").glob("manifest.shard-*"))
