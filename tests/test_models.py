"""Base-model loading in one place: the offline bases, and the messages when weights are missing."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fangzhi.cli import main
from fangzhi.errors import FangzhiError
from fangzhi.cli import main as cli_main
from fangzhi.models import base_available, build_tiny_base, load_pipeline


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_base_is_deterministic_small_and_a_diffusers_folder(tiny_base, tmp_path: Path):
    again = build_tiny_base(tmp_path / "again", seed=0)
    assert folder_digest(Path(tiny_base)) == folder_digest(again)
    other = build_tiny_base(tmp_path / "other", seed=1)
    assert folder_digest(other)["unet/diffusion_pytorch_model.safetensors"] != folder_digest(again)["unet/diffusion_pytorch_model.safetensors"]
    size_mb = sum(p.stat().st_size for p in Path(tiny_base).rglob("*") if p.is_file()) / 1e6
    assert size_mb < 20
    pipe = load_pipeline(tiny_base)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_a_base_is_built_over_its_own_kind_only_and_whole(tmp_path: Path, capsys):
    base = build_tiny_base(tmp_path / "base", seed=1)
    build_tiny_base(base, seed=0)  # over a base fangzhi built: replaced whole, as if new
    assert folder_digest(base) == folder_digest(build_tiny_base(tmp_path / "fresh", seed=0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no building or replaced folder left

    someones_model = tmp_path / "sd15"
    (someones_model / "unet").mkdir(parents=True)
    (someones_model / "unet" / "weights.safetensors").write_bytes(b"real weights")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, reason in ((someones_model, "holds files fangzhi did not write"), (a_file, "is a file")):
        assert cli_main(["base", "tiny", "--out", str(out)]) == 2
        assert reason in capsys.readouterr().err
    assert (someones_model / "unet" / "weights.safetensors").read_bytes() == b"real weights" and a_file.read_text() == "mine"


@pytest.mark.parametrize(
    "base, expected",
    [
        ("nobody/no-such-model", "nobody/no-such-model"),
        ("/definitely/missing/model.safetensors", "model.safetensors"),
        ("./missing-folder", "missing-folder"),
    ],
)
def test_missing_weights_give_one_clear_message(base: str, expected: str):
    with pytest.raises(FangzhiError) as caught:
        load_pipeline(base)
    message = str(caught.value)
    assert expected in message and "--base" in message and "fangzhi base tiny" in message
    assert base_available(base) is not None and expected in base_available(base)


def test_folder_without_model_index_is_explained(tmp_path: Path):
    with pytest.raises(FangzhiError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_base_available_accepts_the_tiny_base(tiny_base):
    assert base_available(tiny_base) is None


def test_cli_base_command_and_missing_base_exit_codes(tmp_path: Path, capsys):
    assert main(["base", "tiny", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model_index.json").is_file()
    assert main(["generate", "--base", "nobody/no-such-model", "--out", str(tmp_path / "g"), "--seeds", "0"]) == 2
    assert "nobody/no-such-model" in capsys.readouterr().err


def test_single_file_without_any_configs_says_how_to_get_them(tmp_path: Path):
    # This machine has no network and no SD v1.5 configs in its Hugging Face cache.
    checkpoint = tmp_path / "model.SAFETENSORS"  # extensions are matched case-insensitively
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(FangzhiError) as caught:
        load_pipeline(str(checkpoint))
    message = str(caught.value)
    assert "model.SAFETENSORS" in message and "--base-config" in message and "huggingface-cli download" in message
    with pytest.raises(FangzhiError, match="not a diffusers folder"):
        load_pipeline(str(checkpoint), base_config=str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_pipeline_returns_the_dtype_asked_for(tiny_base, dtype):
    pipe = load_pipeline(tiny_base, torch_dtype=dtype)
    for component in ("unet", "vae", "text_encoder"):
        dtypes = {param.dtype for param in getattr(pipe, component).parameters()}
        assert dtypes == {dtype}, (component, dtypes)


def test_the_ratings_analysis_imports_without_torch_and_clip_scoring_without_the_rating_statistics():
    # `fangzhi analyze` must not wait for torch, diffusers and open_clip (13-17 s on a 2-core machine), and
    # CLIP scoring on a GPU machine must not need the rating-analysis packages.
    torch_family = "('torch', 'diffusers', 'open_clip', 'transformers')"
    rating_statistics = "('krippendorff', 'pingouin', 'statsmodels', 'fangzhi.evaluate.analyze', 'fangzhi.evaluate.stats')"
    code = (
        "import sys\n"
        "from fangzhi.evaluate.analyze import analyze\n"
        "from fangzhi.evaluate.power import simulate_ratings\n"
        f"print(sorted(m for m in {torch_family} if m in sys.modules))\n"
        "for m in [m for m in sys.modules if m.startswith(('fangzhi', 'krippendorff', 'pingouin', 'statsmodels'))]: del sys.modules[m]\n"
        "from fangzhi.evaluate.clip_score import score_manifest\n"
        f"print(sorted(m for m in {rating_statistics} if m in sys.modules), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "[] True"]
