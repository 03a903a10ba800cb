"""LoRA training on the tiny base and the bundled paintings: it learns, it saves what diffusers loads, it resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from fangzhi.cli import main
from fangzhi.config import load_config
from fangzhi.data import DEMO_DATASET, CaptionedImageDataset, load_training_entries
from fangzhi.data.check import read_rgb
from fangzhi.errors import FangzhiError
from fangzhi.train import LoraSettings, TrainConfig, attach_lora, export_kohya, train

PROMPT = "shuntianfuzhi style, misty mountains above a river"


def tiny_config(base: str, out: Path, **overrides) -> TrainConfig:
    values = {
        "base": base,
        "output_dir": str(out),
        "data": {"resolution": 64, "repeats": 1, "random_flip": True},
        "lora": {"rank": 4, "alpha": 4},
        "epochs": 100,
        "max_steps": 40,
        "learning_rate": 2e-3,
        "optimizer": "adamw8bit",
        "checkpoint_every": 1000,
        "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return TrainConfig.model_validate(values)


@pytest.fixture(scope="module")
def trained_lora(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    train(tiny_config(tiny_base, out))
    return out


def load_base(base: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: StableDiffusionPipeline, **kwargs) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=8, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images[0]
    return image


@torch.no_grad()
def denoising_loss(pipe: StableDiffusionPipeline) -> float:
    """Mean noise-prediction MSE on the demo paintings at fixed noise and timesteps (lower = better fit)."""
    dataset = CaptionedImageDataset(load_training_entries(tiny_config("unused", Path("unused")).data), resolution=64, random_flip=False)
    generator = torch.Generator().manual_seed(123)
    losses = []
    for index in range(len(dataset)):
        item = dataset[index]
        latents = pipe.vae.encode(item["pixel_values"][None]).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([item["caption"]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        for timestep in (100, 400, 700):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.tensor([timestep])
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            prediction = pipe.unet(noisy, t, hidden).sample
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return float(np.mean(losses))


def test_training_writes_all_outputs(trained_lora: Path):
    for name in ("pytorch_lora_weights.safetensors", f"{trained_lora.name}_kohya.safetensors", "config.yaml", "loss.csv", "loss.png"):
        assert (trained_lora / name).is_file(), name
    rows = (trained_lora / "loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,epoch,loss,lr,seconds" and len(rows) == 41
    saved = yaml.safe_load((trained_lora / "config.yaml").read_text())
    assert saved["max_steps"] == 40 and saved["data"]["trigger"] == "shuntianfuzhi style"


def test_lora_lowers_the_denoising_loss(tiny_base, trained_lora: Path):
    pipe = load_base(tiny_base)
    before = denoising_loss(pipe)
    pipe.load_lora_weights(str(trained_lora))
    after = denoising_loss(pipe)
    assert after < before * 0.97, (before, after)


def test_stock_diffusers_loads_the_file_and_scale_zero_is_the_base(tiny_base, trained_lora: Path):
    pipe = load_base(tiny_base)
    base_image = render(pipe)
    pipe.load_lora_weights(str(trained_lora))  # no fangzhi code involved
    lora_image = render(pipe)
    zero_image = render(pipe, cross_attention_kwargs={"scale": 0.0})
    assert np.abs(lora_image - base_image).mean() > 1e-3
    np.testing.assert_allclose(zero_image, base_image, atol=1e-5)


def test_file_holds_only_lora_weights_with_rank_and_alpha(trained_lora: Path):
    from safetensors import safe_open

    state = load_file(str(trained_lora / "pytorch_lora_weights.safetensors"))
    assert state and all(".lora_A." in key or ".lora_B." in key for key in state)
    assert any(key.startswith("unet.") and ".attn2." in key for key in state)
    assert any(key.startswith("text_encoder.") and "self_attn" in key for key in state)
    assert not any(".attn1." in key for key in state)
    with safe_open(str(trained_lora / "pytorch_lora_weights.safetensors"), "pt") as handle:
        metadata = yaml.safe_load(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 4


def test_base_weights_stay_frozen(tiny_base):
    pipe = load_base(tiny_base)
    frozen_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    trained = attach_lora(pipe.unet, pipe.text_encoder, LoraSettings(rank=4, alpha=4))
    trainable = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    names = [n for m in trained.values() for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        hidden = pipe.text_encoder(torch.tensor([[49406, 320, 49407]]))[0]
        loss = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), hidden).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = pipe.unet.state_dict()
    for key, value in frozen_before.items():
        peft_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[peft_key], value), key


def test_kohya_export_round_trips_through_diffusers(tiny_base, trained_lora: Path, tmp_path: Path):
    kohya_file = export_kohya(trained_lora, tmp_path / "style_kohya.safetensors")
    keys = load_file(str(kohya_file)).keys()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_") for k in keys)
    assert not any(k.startswith("lora_te1_") for k in keys)
    assert all(f"{k.split('.')[0]}.alpha" in keys for k in keys if k.endswith("lora_down.weight"))

    original = load_base(tiny_base)
    original.load_lora_weights(str(trained_lora))
    converted = load_base(tiny_base)
    converted.load_lora_weights(str(kohya_file))
    np.testing.assert_allclose(render(converted), render(original), atol=1e-4)


def test_kohya_export_keeps_a_non_default_alpha(tiny_base, tmp_path: Path):
    out = tmp_path / "alpha"
    train(tiny_config(tiny_base, out, lora={"rank": 4, "alpha": 2}, max_steps=2))
    state = load_file(str(export_kohya(out, tmp_path / "k.safetensors")))
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert alphas == {2.0}


def test_export_of_a_file_without_adapter_metadata_needs_alpha(trained_lora: Path, tmp_path: Path, capsys):
    # A diffusers-format file from another trainer: same keys, no lora_adapter_metadata, so alpha is unknown.
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(trained_lora / "pytorch_lora_weights.safetensors")), str(bare))
    assert main(["lora", "export", str(bare), "--out", str(tmp_path / "k.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bare.safetensors" in err and "lora_adapter_metadata" in err and "--alpha" in err
    assert not (tmp_path / "k.safetensors").exists()
    assert main(["lora", "export", str(bare), "--alpha", "2", "--out", str(tmp_path / "k.safetensors")]) == 0
    state = load_file(str(tmp_path / "k.safetensors"))
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {2.0}


def test_train_says_where_the_kohya_export_is_and_it_loads_as_the_lora(tiny_base, trained_lora: Path, tmp_path: Path, capsys):
    out = tmp_path / "message"
    train(tiny_config(tiny_base, out, max_steps=1))
    message = capsys.readouterr().out
    assert f"{out / 'message_kohya.safetensors'}" in message and "ComfyUI" in message
    # The export written by training is the one `fangzhi lora export` would write.
    exported = load_file(str(export_kohya(trained_lora, tmp_path / "again.safetensors")))
    written = load_file(str(trained_lora / f"{trained_lora.name}_kohya.safetensors"))
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in exported)


def test_train_twice_in_one_process_with_other_mixed_precision(tiny_base, tmp_path: Path):
    # accelerate keeps process-wide state; a notebook user training fp32 then bf16 must not hit its ValueError.
    train(tiny_config(tiny_base, tmp_path / "fp32", max_steps=1))
    train(tiny_config(tiny_base, tmp_path / "bf16", max_steps=2, mixed_precision="bf16", optimizer="adamw"))
    rows = (tmp_path / "bf16" / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(np.isfinite(float(r.split(",")[2])) for r in rows)


def test_resume_matches_an_uninterrupted_run(tiny_base, tmp_path: Path):
    common = dict(checkpoint_every=3, lr_scheduler="constant", data={"resolution": 64, "random_flip": True})
    straight = tmp_path / "straight"
    train(tiny_config(tiny_base, straight, max_steps=10, **common))

    interrupted = tmp_path / "interrupted"
    train(tiny_config(tiny_base, interrupted, max_steps=7, **common))  # stops after step 7, mid-epoch 2 (4 steps per epoch)
    shutil.rmtree(interrupted / "checkpoints" / "step-00000006")  # resume from step 3: steps 4-7 are logged already and get redone
    train(tiny_config(tiny_base, interrupted, max_steps=10, resume="latest", **common))

    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(interrupted / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    losses = lambda folder: (folder / "loss.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in losses(straight)] == [r.split(",")[2] for r in losses(interrupted)]


def test_resume_with_other_lora_settings_is_refused_before_loading_and_keeps_the_runs_config(tiny_base, tmp_path: Path):
    out = tmp_path / "run"
    train(tiny_config(tiny_base, out, max_steps=2, checkpoint_every=1, optimizer="adamw"))
    saved_config = (out / "config.yaml").read_bytes()
    with pytest.raises(FangzhiError, match=r"lora\.rank: 4 there, 8 now.*lora\.alpha: 4\.0 there, 8\.0 now"):
        train(tiny_config("no/such-base", out, max_steps=4, resume="latest", lora={"rank": 8, "alpha": 8}))
    assert (out / "config.yaml").read_bytes() == saved_config

    # A checkpoint whose run left no config is still checked, by its weights' shapes, and no config is written for it.
    (out / "config.yaml").unlink()
    with pytest.raises(FangzhiError, match=r"parameters differ, e\.g\. \S+ is \((4, \d+|\d+, 4)\) there and \((8, \d+|\d+, 8)\) here"):
        train(tiny_config(tiny_base, out, max_steps=4, resume="latest", optimizer="adamw", lora={"rank": 8, "alpha": 8}))
    assert not (out / "config.yaml").exists()


def test_nan_loss_stops_with_a_clear_message(tiny_base, tmp_path: Path):
    with pytest.raises(FangzhiError, match=r"loss became (nan|inf).*step \d+.*checkpoint"):
        train(tiny_config(tiny_base, tmp_path / "nan", learning_rate=1e12, optimizer="adamw", max_grad_norm=None, max_steps=40, checkpoint_every=1))
    assert list((tmp_path / "nan" / "checkpoints").glob("step-*")), "the last good checkpoint is kept"


def test_training_refuses_a_bad_dataset_before_loading_models(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image")
    cfg = tiny_config("no/such-base", tmp_path / "out", data={"path": str(bad)})
    with pytest.raises(FangzhiError, match="broken.png"):
        train(cfg)


def test_config_errors_name_the_key_and_value(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: many\nlora:\n  rnk: 4\n")
    with pytest.raises(FangzhiError) as caught:
        load_config(TrainConfig, config)
    message = str(caught.value)
    assert "bad.yaml" in message and "'epochs'" in message and '"many"' in message and "'lora.rnk'" in message


def test_cli_flags_override_config_and_errors_exit_2(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optimizer: sgd\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "optimizer" in capsys.readouterr().err
    assert main(["train", "--base", str(tmp_path / "missing"), "--data", str(DEMO_DATASET), "--resolution", "64",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err


def launch_two_processes(config: TrainConfig, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config_file = tmp_path / f"{Path(config.output_dir).name}.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # `--multi_gpu` starts two processes through torchrun; without a GPU they form a gloo group.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fangzhi", "train", "--config", str(config_file), *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[process 1]" in result.stdout and "2 processes" in result.stdout, "training must really run in two processes"
    return result


def test_two_process_cpu_training_writes_a_valid_lora(tiny_base, tmp_path: Path):
    out = tmp_path / "ddp"
    launch_two_processes(tiny_config(tiny_base, out, max_steps=4), tmp_path)
    pipe = load_base(tiny_base)
    pipe.load_lora_weights(str(out))
    assert np.isfinite(render(pipe)).all()
    assert len((out / "loss.csv").read_text().splitlines()) == 5


def test_two_process_resume_matches_an_uninterrupted_two_process_run(tiny_base, tmp_path: Path):
    # 8 images, batch 2, two processes: 2 steps per epoch; the checkpoint at step 3 is in the middle of epoch 2.
    common = dict(checkpoint_every=3, lr_scheduler="constant", data={"resolution": 64, "random_flip": True}, log_every=4)
    straight = tmp_path / "straight"
    launch_two_processes(tiny_config(tiny_base, straight, max_steps=7, **common), tmp_path)
    interrupted = tmp_path / "interrupted"
    launch_two_processes(tiny_config(tiny_base, interrupted, max_steps=4, **common), tmp_path)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step-00000003"]
    resumed = launch_two_processes(tiny_config(tiny_base, interrupted, max_steps=7, **common), tmp_path, "--resume", "latest")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout

    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(interrupted / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    losses = lambda folder: [row.split(",")[2] for row in (folder / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses(straight)) == 7 and losses(straight) == losses(interrupted)


def test_latent_cache_gives_the_same_lora_as_encoding_every_step(tiny_base, tmp_path: Path):
    fixed_crops = {"resolution": 64, "random_flip": False, "center_crop": True, "repeats": 2}
    train(tiny_config(tiny_base, tmp_path / "plain", max_steps=8, data=fixed_crops))
    train(tiny_config(tiny_base, tmp_path / "cached", max_steps=8, data=fixed_crops, cache_latents=True))
    a = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cached" / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_optional_training_features_run_and_validation_images_are_written(tiny_base, tmp_path: Path):
    out = tmp_path / "features"
    cfg = tiny_config(
        tiny_base, out, max_steps=6, epochs=10, gradient_checkpointing=True, snr_gamma=5.0, noise_offset=0.05,
        gradient_accumulation=2, lr_scheduler="cosine", warmup_steps=2, dataloader_workers=2, log_every=4,
        validation={"prompts": ["misty mountains"], "seeds": [0, 1], "every_epochs": 1, "steps": 2},
    )
    train(cfg)
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(np.isfinite(float(r.split(",")[2])) for r in rows)
    lrs = [float(r.split(",")[3]) for r in rows]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up, then cosine decay
    assert sorted(p.name for p in (out / "validation" / "epoch-001").glob("*.png")) == ["prompt00-seed0.png", "prompt00-seed1.png"]


def test_cache_latents_with_random_crops_is_a_config_error():
    with pytest.raises(ValueError, match="cache_latents"):
        TrainConfig.model_validate({"cache_latents": True, "data": {"center_crop": False}})
    TrainConfig.model_validate({"cache_latents": True, "data": {"random_flip": True}})  # both facings are cached


def test_latent_cache_with_random_flips_matches_encoding_every_step_and_reads_each_image_once(tiny_base, tmp_path: Path, monkeypatch):
    flips = {"resolution": 64, "random_flip": True, "center_crop": True, "repeats": 2}
    train(tiny_config(tiny_base, tmp_path / "plain", max_steps=8, data=flips))
    from fangzhi.data import torch_dataset

    reads = []
    monkeypatch.setattr(torch_dataset, "read_rgb", lambda path, **options: reads.append(path) or read_rgb(path, **options))
    train(tiny_config(tiny_base, tmp_path / "cached", max_steps=8, data=flips, cache_latents=True))
    assert len(reads) == len(set(reads)) == len(load_training_entries(tiny_config("unused", Path("unused")).data))
    a = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cached" / "pytorch_lora_weights.safetensors"))
    assert any(a[key].abs().max() > 0 for key in a if ".lora_B." in key)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_v_prediction_is_taken_from_the_base_scheduler(tiny_base, tmp_path: Path):
    import json
    import shutil

    v_base = tmp_path / "v-base"
    shutil.copytree(tiny_base, v_base)
    scheduler_config = v_base / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler_config.read_text())
    scheduler_config.write_text(json.dumps({**settings, "prediction_type": "v_prediction"}))
    out = tmp_path / "v"
    train(tiny_config(str(v_base), out, max_steps=3, snr_gamma=5.0))
    losses = [float(r.split(",")[2]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    epsilon_out = tmp_path / "eps"
    train(tiny_config(tiny_base, epsilon_out, max_steps=3, snr_gamma=5.0))
    epsilon_losses = [float(r.split(",")[2]) for r in (epsilon_out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses != epsilon_losses  # same data, noise and timesteps: only the target differs


def test_compiled_training_matches_eager_and_compiles_once(tiny_base, tmp_path: Path):
    # 8 paintings, batch 2: two full epochs with no short batch, so one compile must serve every step.
    settings = dict(max_steps=8, optimizer="adamw", data={"resolution": 64, "repeats": 1})
    train(tiny_config(tiny_base, tmp_path / "eager", **settings))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(tiny_config(tiny_base, tmp_path / "compiled", compile=True, **settings))
    assert counters["stats"]["unique_graphs"] >= 2  # the UNet and the text encoder really went through the compiler
    eager = load_file(str(tmp_path / "eager" / "pytorch_lora_weights.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "pytorch_lora_weights.safetensors"))
    assert eager.keys() == compiled.keys()
    moved = [key for key in eager if ".lora_B." in key and eager[key].abs().max() > 0]
    assert moved  # the LoRA really trained, so equality below is not the zero init twice
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-5)


def test_compiled_training_skips_the_short_last_batch_instead_of_compiling_again(tiny_base, tmp_path: Path):
    # 8 paintings, batch 3: two full batches and a short one of 2 per epoch; step 3 is in the second epoch.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(tiny_config(tiny_base, tmp_path / "compiled", compile=True, batch_size=3, max_steps=3, optimizer="adamw"))
    rows = [line.split(",") for line in (tmp_path / "compiled" / "loss.csv").read_text().splitlines()[1:]]
    assert [(int(step), int(epoch)) for step, epoch, *_ in rows] == [(1, 1), (2, 1), (3, 2)]

    with pytest.raises(FangzhiError, match=r"compile: true needs at least .* = 9 images per epoch.* gives 8"):
        train(tiny_config(tiny_base, tmp_path / "too-few", compile=True, batch_size=9, max_steps=1))
    assert not (tmp_path / "too-few").exists()  # refused before anything was loaded or written


def test_a_finished_run_leaves_no_model_in_memory(tiny_base, tmp_path: Path):
    import gc

    from diffusers import UNet2DConditionModel

    # With automatic collection off, only train() itself can have freed the cycles its models sit in.
    gc.collect()
    gc.disable()
    try:
        train(tiny_config(tiny_base, tmp_path / "run", max_steps=1))
        alive = sum(isinstance(obj, UNet2DConditionModel) for obj in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0
