"""Tests for fangzhi.data: the dataset check, subset selection, the torch Dataset and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from fangzhi.cli import main
from fangzhi.data import (
    DEMO_DATASET,
    CaptionedImageDataset,
    DataConfig,
    Entry,
    check_dataset,
    load_training_entries,
    read_rgb,
    select_subset,
)
from fangzhi.errors import FangzhiError


def noise_rgb(size: tuple[int, int], seed: int) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def captioned(folder: Path, name: str, image: Image.Image, caption: str | None = "a mountain", **save_kwargs) -> Path:
    path = folder / name
    image.save(path, **save_kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def problems_of(report, name: str) -> list[tuple[str, str]]:
    return [(p.severity, p.message) for p in report.problems if p.path.name == name]


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """One file per kind of problem, checked at resolution 64 (so 80 px images are big enough)."""
    folder = tmp_path / "messy"
    folder.mkdir()
    captioned(folder, "good.png", Image.fromarray(noise_rgb((80, 80), 1)))

    full_png = folder / "full.tmp"
    Image.fromarray(noise_rgb((80, 80), 2)).save(full_png, format="PNG")
    data = full_png.read_bytes()
    full_png.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "truncated.txt").write_text("a river", encoding="utf-8")

    (folder / "fake.png").write_text("this is not an image", encoding="utf-8")
    (folder / "fake.txt").write_text("a boat", encoding="utf-8")

    captioned(folder, "cmyk.jpg", Image.fromarray(noise_rgb((80, 80), 3)).convert("CMYK"))
    rgba = np.dstack([noise_rgb((80, 80), 4), np.full((80, 80), 128, dtype=np.uint8)])
    captioned(folder, "rgba.png", Image.fromarray(rgba, mode="RGBA"))
    captioned(folder, "palette.png", Image.fromarray(noise_rgb((80, 80), 5)).convert("P", palette=Image.Palette.ADAPTIVE))
    gray16 = np.random.default_rng(6).integers(0, 65536, size=(80, 80)).astype(np.uint16)
    captioned(folder, "gray16.png", Image.fromarray(gray16))
    captioned(folder, "gray.png", Image.fromarray(noise_rgb((80, 80), 7)[:, :, 0], mode="L"))
    captioned(folder, "tiny.png", Image.fromarray(noise_rgb((32, 32), 8)))
    captioned(folder, "uncaptioned.png", Image.fromarray(noise_rgb((80, 80), 9)), caption=None)
    captioned(folder, "blank.png", Image.fromarray(noise_rgb((80, 80), 10)), caption="  \n ")
    original = Image.fromarray(noise_rgb((80, 80), 11))
    captioned(folder, "a_original.png", original)
    captioned(folder, "b_copy.bmp", original)  # same pixels, different file format
    captioned(folder, "from_metadata.png", Image.fromarray(noise_rgb((80, 80), 12)), caption=None)
    metadata_lines = [
        json.dumps({"file_name": "from_metadata.png", "text": "pines   in\nmist"}),
        '{"file_name": "good.png", "text": "broken',
        json.dumps({"text": "no file name here"}),
        json.dumps({"file_name": "missing.png", "text": "a lake"}),
        json.dumps({"file_name": "good.png", "text": "a different caption"}),
    ]
    (folder / "metadata.jsonl").write_text("\n".join(metadata_lines) + "\n", encoding="utf-8")
    return folder


def test_demo_dataset_passes_the_check_at_256():
    report = check_dataset(DEMO_DATASET, resolution=256)
    assert report.ok, [str(p) for p in report.problems]
    assert report.problems == []
    assert sorted(e.path.name for e in report.entries) == [f"painting_0{i}.png" for i in range(1, 9)]
    for entry in report.entries:
        assert len(entry.caption.split()) >= 10
        assert "shuntianfuzhi" not in entry.caption  # the trigger is added at training time only
    assert (DEMO_DATASET / "README.md").read_text(encoding="utf-8").count("arXiv:2011.05552") == 1


def test_demo_dataset_is_too_small_for_512():
    report = check_dataset(DEMO_DATASET)
    assert len(report.errors) == 8 and report.entries == []
    assert all("smaller than the training resolution 512" in p.message for p in report.errors)


def test_every_problem_names_its_file(messy_folder: Path):
    report = check_dataset(messy_folder, resolution=64)
    assert not report.ok

    assert problems_of(report, "good.png") == [
        ("note", "good.txt and metadata.jsonl line 5 give different captions; using good.txt")
    ]
    [(severity, message)] = problems_of(report, "truncated.png")
    assert severity == "error" and message.startswith("cannot be read as an image, truncated or corrupt")
    [(severity, message)] = problems_of(report, "fake.png")
    assert severity == "error" and message.startswith("not an image")
    for name, mode in [("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA"), ("palette.png", "P"), ("gray16.png", "I;16"), ("gray.png", "L")]:
        [(severity, message)] = problems_of(report, name)
        assert severity == "note" and message.startswith(f"mode {mode}") and "converted to RGB" in message
    [(severity, message)] = problems_of(report, "tiny.png")
    assert severity == "error" and "32x32 is smaller than the training resolution 64" in message
    assert problems_of(report, "uncaptioned.png") == [
        ("error", "no caption: write uncaptioned.txt beside it or add it to metadata.jsonl")
    ]
    assert problems_of(report, "blank.png") == [("error", "caption is empty (blank.txt)")]
    assert problems_of(report, "a_original.png") == []
    [(severity, message)] = problems_of(report, "b_copy.bmp")
    assert severity == "error" and "duplicate" in message and str(messy_folder / "a_original.png") in message

    metadata_messages = [m for s, m in problems_of(report, "metadata.jsonl") if s == "error"]
    assert len(metadata_messages) == 3
    assert metadata_messages[0].startswith("line 2: not valid JSON")
    assert metadata_messages[1].startswith('line 3: missing "file_name"')
    assert metadata_messages[2].startswith("line 4: file_name 'missing.png': file not found")

    usable = {e.path.name: e.caption for e in report.entries}
    assert set(usable) == {"good.png", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png", "gray.png", "a_original.png", "from_metadata.png"}
    assert usable["from_metadata.png"] == "pines in mist"
    assert usable["good.png"] == "a mountain"  # the sidecar wins over metadata.jsonl

    upscaled = check_dataset(messy_folder, resolution=64, allow_upscale=True)
    [(severity, message)] = problems_of(upscaled, "tiny.png")
    assert severity == "note" and "upscaled" in message


def test_empty_and_missing_folders(tmp_path: Path):
    report = check_dataset(tmp_path)
    assert [(p.path, p.severity) for p in report.problems] == [(tmp_path, "error")]
    assert "no images" in report.problems[0].message
    with pytest.raises(FangzhiError, match="not found"):
        check_dataset(tmp_path / "nowhere")


def test_read_rgb_flattens_transparency_on_white_and_scales_16_bit(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, 2:] = (200, 10, 20, 255)  # right half opaque red, left half fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image, mode = read_rgb(tmp_path / "rgba.png")
    pixels = np.asarray(image)
    assert mode == "RGBA" and image.mode == "RGB"
    assert (pixels[:, :2] == 255).all() and (pixels[:, 2:] == (200, 10, 20)).all()

    # 65535 is full white in 16 bits and 32896 = 128 * 257 is 8-bit 128; PIL's own convert would clip both to 255.
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    image, mode = read_rgb(tmp_path / "g16.png")
    assert mode == "I;16"
    assert np.asarray(image)[0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_upright_and_matches_a_full_decode(tmp_path: Path):
    # Stored 1600 wide × 1200 high with EXIF orientation 6 (turn 90° clockwise to view): upright it is a portrait.
    x, y = np.meshgrid(np.linspace(0, 255, 1600), np.linspace(0, 255, 1200))
    pixels = np.stack([(x + y) / 2, x, y], axis=-1).astype(np.uint8)
    pixels[100:180, 100:400] = 0  # an ink mark near the stored top-left corner, which ends up top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "scan.jpg", quality=95, exif=exif)

    full, _ = read_rgb(tmp_path / "scan.jpg")
    reduced, _ = read_rgb(tmp_path / "scan.jpg", min_side=300)
    assert full.size == (1200, 1600)
    assert reduced.size == (300, 400)  # 1/4: the smallest DCT scale that keeps both sides at least 300
    shrunk = np.asarray(full.resize(reduced.size, Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(shrunk - np.asarray(reduced, dtype=float)).mean() < 1.5  # grey levels: the same picture, same way up
    assert np.asarray(reduced)[25:45, 255:275].mean() < 10 and np.asarray(reduced)[25:45, 25:45].mean() > 60

    # The training crop from the reduced decode is within a grey level of one made from the full decode.
    crop = CaptionedImageDataset([Entry(tmp_path / "scan.jpg", "x")], resolution=256)[0]["pixel_values"]
    top = (full.height * 256 // full.width - 256) // 2
    reference = full.resize((256, full.height * 256 // full.width), Image.Resampling.LANCZOS).crop((0, top, 256, top + 256))
    expected = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert (crop - expected).abs().mean() * 127.5 < 1.0


def test_select_is_reproducible_and_copies_captions(tmp_path: Path):
    first = select_subset(DEMO_DATASET, 3, tmp_path / "a", seed=7)
    again = select_subset(DEMO_DATASET, 3, tmp_path / "b", seed=7)
    assert [p.name for p in first] == [p.name for p in again]
    other_subsets = {tuple(p.name for p in select_subset(DEMO_DATASET, 3, tmp_path / f"s{seed}", seed=seed)) for seed in range(5)}
    assert len(other_subsets) > 1

    out = tmp_path / "a"
    assert sorted(p.name for p in out.glob("*.png")) == [p.name for p in first]
    for image in first:
        assert image.read_bytes() == (DEMO_DATASET / image.name).read_bytes()
        assert image.with_suffix(".txt").read_text() == (DEMO_DATASET / image.name).with_suffix(".txt").read_text()
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [p.name for p in first]
    report = check_dataset(out, resolution=256)
    assert report.ok and report.notes == [] and len(report.entries) == 3


def test_select_refuses_too_many_and_non_empty_out(tmp_path: Path):
    with pytest.raises(FangzhiError, match="asked for 9 images but .* has only 8"):
        select_subset(DEMO_DATASET, 9, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    with pytest.raises(FangzhiError, match="not an empty folder"):
        select_subset(DEMO_DATASET, 2, occupied, seed=0)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_dataset_items_shape_range_and_caption():
    entries = check_dataset(DEMO_DATASET, resolution=64).entries
    dataset = CaptionedImageDataset(entries, resolution=64, repeats=2)
    assert len(dataset) == 16
    item = dataset[9]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1.0
    assert item["caption"] == f"shuntianfuzhi style, {entries[1].caption}"
    dropped = CaptionedImageDataset(entries, resolution=64, caption_dropout=1.0)
    assert dropped[0]["caption"] == ""


def test_dataset_maps_colours_to_minus_one_to_one(tmp_path: Path):
    Image.new("RGB", (100, 80), (255, 0, 128)).save(tmp_path / "solid.png")
    pixels = CaptionedImageDataset([Entry(tmp_path / "solid.png", "x")], resolution=64)[0]["pixel_values"]
    expected = torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]).view(3, 1, 1).expand(3, 64, 64)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)


def test_flips_and_crops_are_deterministic_per_seed_epoch_index(tmp_path: Path):
    # Left half black, right half white: a flipped item starts with white columns.
    halves = np.zeros((64, 128, 3), dtype=np.uint8)
    halves[:, 64:] = 255
    Image.fromarray(halves).save(tmp_path / "halves.png")
    entries = [Entry(tmp_path / "halves.png", "x")] * 8

    def flip_pattern(dataset, epoch):
        dataset.set_epoch(epoch)
        # Center crop of 128x64 at 64 px keeps columns 32..95: left half black, right half white.
        return [bool(dataset[i]["pixel_values"][:, :, 0].mean() > 0) for i in range(len(dataset))]

    one = CaptionedImageDataset(entries, resolution=64, random_flip=True, seed=3)
    two = CaptionedImageDataset(entries, resolution=64, random_flip=True, seed=3)
    patterns = [flip_pattern(one, epoch) for epoch in range(4)]
    assert patterns == [flip_pattern(two, epoch) for epoch in range(4)]
    assert len({tuple(p) for p in patterns}) > 1  # the epoch changes the augmentation
    assert 0 < sum(map(sum, patterns)) < 32  # both flipped and unflipped items occur
    unflipped = CaptionedImageDataset(entries, resolution=64, random_flip=False)
    assert flip_pattern(unflipped, 0) == [False] * 8

    # A horizontal ramp shows the crop offset in the first column's value.
    ramp = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1))
    Image.fromarray(np.dstack([ramp] * 3)).save(tmp_path / "ramp.png")
    ramp_entries = [Entry(tmp_path / "ramp.png", "x")] * 8

    def first_columns(seed):
        dataset = CaptionedImageDataset(ramp_entries, resolution=64, center_crop=False, seed=seed)
        return [round(float(dataset[i]["pixel_values"][0, 32, 0]), 3) for i in range(8)]

    assert first_columns(0) == first_columns(0)
    assert len(set(first_columns(0))) > 1 and first_columns(0) != first_columns(1)


def test_load_training_entries_refuses_errors_or_skips_them(tmp_path: Path, capsys):
    captioned(tmp_path, "big.png", Image.fromarray(noise_rgb((80, 80), 1)))
    captioned(tmp_path, "tiny.png", Image.fromarray(noise_rgb((32, 32), 2)))
    with pytest.raises(FangzhiError, match=r"1 error\(s\); fix them, or set data\.skip_bad_files to train on the 1 good images:[\s\S]*tiny\.png: error: 32x32"):
        load_training_entries(DataConfig(path=str(tmp_path), resolution=64))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FangzhiError) as nothing_usable:  # where no image is good, skipping bad ones is no advice
        load_training_entries(DataConfig(path=str(empty), resolution=64))
    assert "no images here" in str(nothing_usable.value) and "skip_bad_files" not in str(nothing_usable.value)
    entries = load_training_entries(DataConfig(path=str(tmp_path), resolution=64, skip_bad_files=True))
    assert [e.path.name for e in entries] == ["big.png"]
    assert "tiny.png" in capsys.readouterr().out

    assert DataConfig().path == str(DEMO_DATASET)
    assert len(load_training_entries(DataConfig(resolution=256))) == 8
    with pytest.raises(pydantic.ValidationError):
        DataConfig(caption_dropout=1.5)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(resolutoin=256)


def test_cli_check_and_select(messy_folder: Path, tmp_path: Path, capsys):
    assert main(["dataset", "check", str(DEMO_DATASET), "--resolution", "256"]) == 0
    assert "8 images, 8 usable" in capsys.readouterr().out

    assert main(["dataset", "check", str(messy_folder), "--resolution", "64"]) == 1
    out = capsys.readouterr().out
    assert f"{messy_folder / 'tiny.png'}: error: 32x32 is smaller" in out
    assert f"{messy_folder / 'cmyk.jpg'}: note: mode CMYK" in out
    assert out.rstrip().splitlines()[-1].startswith(f"{messy_folder}: 14 images, 8 usable at resolution 64, 9 errors, 6 notes")

    assert main(["dataset", "check", str(tmp_path / "nowhere")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err

    assert main(["dataset", "select", str(DEMO_DATASET), "--n", "2", "--out", str(tmp_path / "pick"), "--seed", "1"]) == 0
    assert len(list((tmp_path / "pick").glob("*.png"))) == 2
    assert main(["dataset", "select", str(DEMO_DATASET), "--n", "246", "--out", str(tmp_path / "pick2")]) == 2
    assert "has only 8" in capsys.readouterr().err
