"""`fangzhi generate`: paired base/LoRA images for every prompt × seed, resumable, batched, multi-GPU.

Every (arm, prompt, seed) is one work item. Items of one arm share the same seed, scheduler, steps,
CFG, size and text as the other arms' items with the same (prompt, seed), so a pair differs only in
the adapter weights. The base arm runs on the pipeline with no LoRA loaded; each LoRA arm loads its
adapter, fuses it into the UNet and text encoder weights and drops the LoRA layers (so no step pays
LoRA overhead), generates, then restores the base weights.

Determinism per (prompt, seed) whatever the batch: each image's starting noise comes from its own CPU
torch.Generator seeded with its seed, and a batch only holds prompts with the same number of 75-token
chunks (padding a short prompt with empty chunks would change its conditioning).

Every decoded image is checked before it is written: one with NaN/inf pixels or all black (an fp16
VAE overflow) is refused and reported, never put where a rating study would show it. PNG encoding,
fsync and the manifest line run on a background thread, so the device does not wait for them.

Under `accelerate launch`, the items left to do are split between processes; each writes its own
images and a manifest shard, and the main process merges the shards once all are done.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from diffusers import DDIMScheduler
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fangzhi.config import save_config
from fangzhi.errors import FangzhiError
from fangzhi.files import write_atomically
from fangzhi.generate.config import BASE_ARM, GenerateConfig, LoraArm, arm_labels
from fangzhi.generate.contact_sheet import write_contact_sheets
from fangzhi.generate.manifest import (
    IMAGES_DIR,
    MANIFEST_NAME,
    append_record,
    file_sha256,
    image_id,
    output_salt,
    read_manifest,
    recover_manifest,
)
from fangzhi.generate.prompts import PromptEntry, load_prompt_set
from fangzhi.generate.text_encoding import chunk_token_ids, encode_prompt_pair
from fangzhi.models import load_pipeline, weights_sha256
from fangzhi.models.sd import SINGLE_FILE_SUFFIXES
from fangzhi.train.lora import autov3_hash, find_kohya_export, resolve_lora_file

SCHEDULER = "DDIM"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_PATTERN = "manifest.shard-*.jsonl"
# The manifest fields that define an image: a rerun into the same folder must agree on all of them.
IMAGE_KEY_FIELDS = (
    "arm", "prompt_id", "seed", "prompt", "negative", "scheduler", "steps", "cfg", "width", "height",
    "lora_scale", "lora_sha256", "base_identity", "dtype", "long_prompts", "lora_fused",
)


@dataclass
class LoraSource:
    label: str
    adapter_name: str  # peft forbids '.' in adapter names, so labels like 'lora@0.5' cannot be used
    arm: LoraArm
    file: Path
    sha256: str
    a1111_name: str  # the name A1111 users know it by: the kohya export's file name when there is one
    a1111_hash: str  # AutoV3 (first 12 hex) of that same file, as A1111 and civitai show it


@dataclass
class WorkItem:
    entry: PromptEntry
    lora: LoraSource | None
    record: dict  # the manifest line, without image_sha256, seconds and chunked until the image exists
    chunks: int = 1  # 75-token chunks of its prompt or negative prompt, whichever is longer


def _resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        # SD v1.5's VAE overflows fp16 on some latents (NaN, then a black image); bf16 has fp32's range.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name != "fp32" and device.type == "cpu":
        print(f"note: dtype {name} on CPU is slow and not what the paper used; fp32 is the CPU default")
    return name


def _lora_sources(config: GenerateConfig) -> list[LoraSource]:
    sources = []
    for index, (label, lora) in enumerate(zip(arm_labels(config.loras), config.loras)):
        file = resolve_lora_file(lora.path)
        sha256 = file_sha256(file)
        a1111_file = find_kohya_export(file, sha256) or file
        # A1111's prompt parser splits on ':' and its infotext parser on ','; it strips both from LoRA names.
        name = a1111_file.stem.replace(",", "").replace(":", "")
        sources.append(LoraSource(label, f"arm{index}", lora, file, sha256, name, autov3_hash(a1111_file)[:12]))
    return sources


def plan_work(config: GenerateConfig, entries: list[PromptEntry], loras: list[LoraSource], salt: str,
              base_sha256: str, dtype: str) -> list[WorkItem]:
    """Every (arm, prompt, seed) item, base arm first, with its full manifest record (minus results)."""
    items = []
    for lora in [None, *loras]:
        with_trigger = config.trigger and (lora is not None or config.trigger_arms == "both")
        for entry in entries:
            prompt = f"{config.trigger}, {entry.prompt_en}" if with_trigger else entry.prompt_en
            for seed in config.seeds:
                record = {
                    "image_id": None, "file": None,
                    "arm": lora.label if lora else BASE_ARM, "prompt_id": entry.id, "seed": seed,
                    "prompt": prompt, "prompt_en": entry.prompt_en, "narrative_zh": entry.narrative_zh,
                    "source": entry.source, "negative": entry.negative if entry.negative is not None else config.negative,
                    "chunked": None, "trigger": config.trigger if with_trigger else "",
                    "scheduler": SCHEDULER, "steps": config.steps, "cfg": config.guidance_scale,
                    "width": config.width, "height": config.height,
                    "lora_scale": lora.arm.scale if lora else None,
                    "base": config.base, "base_sha256": base_sha256, "base_identity": base_sha256 or config.base,
                    "lora": str(lora.file) if lora else None, "lora_sha256": lora.sha256 if lora else None,
                    "lora_fused": config.fuse_lora if lora else None,
                    "dtype": dtype, "long_prompts": config.long_prompts,
                    "image_sha256": None, "seconds": None,
                }
                record["image_id"] = image_id(salt, {key: record[key] for key in IMAGE_KEY_FIELDS})
                record["file"] = f"{IMAGES_DIR}/{record['image_id']}.png"
                items.append(WorkItem(entry, lora, record))
    return items


def _refuse_changed_settings(out: Path, items: list[WorkItem], done: list[dict]) -> None:
    """A rerun into a folder must use the settings its images were made with, or pairs would mix settings."""
    done_by_key = {(r["arm"], r["prompt_id"], r["seed"]): r for r in done}
    for item in items:
        record = item.record
        previous = done_by_key.get((record["arm"], record["prompt_id"], record["seed"]))
        if previous is None or previous["image_id"] == record["image_id"]:
            continue
        changed = [f"{key} {previous.get(key)!r} → {record[key]!r}" for key in IMAGE_KEY_FIELDS if previous.get(key) != record[key]]
        raise FangzhiError(
            f"{out / MANIFEST_NAME}, line {previous['_line']}: {record['arm']}/{record['prompt_id']}/seed {record['seed']} "
            f"was generated with other settings ({'; '.join(changed) or 'another run salt'}). Use a new --out folder, "
            "or the settings of the existing images."
        )


def _a1111_value(value) -> str:
    text = str(value)
    # A1111 quotes values that contain its separators.
    return f'"{text}"' if any(c in text for c in ',:"\n') else text


def a1111_parameters(record: dict, lora: LoraSource | None) -> str:
    """The PNG `parameters` text in AUTOMATIC1111's layout, so web UIs, viewers and civitai show the settings.

    The LoRA arm's prompt gets A1111's `<lora:NAME:SCALE>` tag (A1111 strips it before encoding).
    `Lora hashes` is AutoV3 and `Model hash` (single-file bases only) AutoV2, as A1111 and civitai compute them.
    """
    prompt = record["prompt"]
    if lora is not None:
        prompt += f" <lora:{lora.a1111_name}:{record['lora_scale']:g}>"
    lines = [prompt]
    if record["negative"]:
        lines.append(f"Negative prompt: {record['negative']}")
    fields = [
        ("Steps", record["steps"]), ("Sampler", record["scheduler"]), ("CFG scale", f"{record['cfg']:g}"),
        ("Seed", record["seed"]), ("Size", f"{record['width']}x{record['height']}"),
    ]
    base = Path(record["base"])
    if base.suffix.lower() in SINGLE_FILE_SUFFIXES and record["base_sha256"]:
        fields.append(("Model hash", record["base_sha256"][:10]))  # AutoV2: sha256 of the whole checkpoint file
    fields.append(("Model", base.stem if base.suffix else base.name))
    if lora is not None:
        fields.append(("Lora hashes", f"{lora.a1111_name}: {lora.a1111_hash}"))
    fields.append(("Version", "fangzhi"))
    lines.append(", ".join(f"{name}: {_a1111_value(value)}" for name, value in fields))
    return "\n".join(lines)


def image_problem(image: np.ndarray) -> str | None:
    """Why a decoded image (H×W×C floats in [0, 1]) must not enter a study, or None when it may."""
    if not np.isfinite(image).all():
        return "the decoded image has NaN/inf pixels"
    if image.max() < 0.5 / 255:
        return "the decoded image is all black"
    return None


def _write_png(image: np.ndarray, path: Path, parameters: str) -> str:
    """Encode and write durably and whole: the final name only ever holds a whole PNG, which a rerun trusts."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    write_atomically(path, data, durable=True)
    return hashlib.sha256(data).hexdigest()


def prepare_pipeline(config: GenerateConfig, device: torch.device, dtype: str):
    pipe = load_pipeline(config.base, torch_dtype=TORCH_DTYPES[dtype], base_config=config.base_config)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    # diffusers' default attention processor on torch 2 is AttnProcessor2_0, i.e. SDPA.
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # Inference needs no gradients; frozen from the start, the weights also keep the requires_grad that
    # peft leaves them with after a LoRA is loaded and unloaded, so a compiled UNet is not recompiled per arm.
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        component.requires_grad_(False)
    if config.compile:
        # In place (nn.Module.compile), so LoRA loading still finds the UNet's own modules.
        pipe.unet.compile()
    return pipe


def render_batch(pipe, items: list[WorkItem], config: GenerateConfig) -> tuple[np.ndarray, list[bool], float]:
    """Generate one batch; returns the images (N×H×W×C floats in [0, 1]), which prompts were chunked, and seconds per image."""
    start = time.perf_counter()
    # A compiled UNet is specialised to the batch size: a short last batch is padded with copies of its
    # last item (whose images are dropped) instead of being compiled again.
    padded = items + items[-1:] * (config.batch_size - len(items)) if config.compile else items
    prompt_embeds, negative_embeds, chunked = encode_prompt_pair(
        pipe.tokenizer, pipe.text_encoder,
        [item.record["prompt"] for item in padded], [item.record["negative"] for item in padded], config.long_prompts,
    )
    # One CPU generator per image: its noise depends on its seed only, not on the batch or the device.
    generators = [torch.Generator("cpu").manual_seed(item.record["seed"]) for item in padded]
    images = pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
        num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
        height=config.height, width=config.width, generator=generators, output_type="np",
    ).images
    return images[: len(items)], chunked[: len(items)], (time.perf_counter() - start) / len(items)


def _activate(pipe, lora: LoraSource, fuse: bool) -> dict[tuple[str, str], torch.Tensor]:
    """Load the arm's LoRA into the UNet and text encoder at its scale; return what `_deactivate` restores.

    Fused: the LoRA is merged into the weights, then its peft layers are removed, so every step runs
    the plain model (a merged peft layer would still cost a Python call per projection per step).
    The pre-merge weights of the adapted projections are kept and copied back afterwards, which
    restores the base exactly (subtracting the merged update again, as unfuse_lora does, rounds).
    """
    pipe.load_lora_weights(str(lora.file), adapter_name=lora.adapter_name)
    if not fuse:
        pipe.set_adapters([lora.adapter_name], adapter_weights=[lora.arm.scale])
        return {}
    originals = {
        (component, name): module.base_layer.weight.detach().clone()
        for component in ("unet", "text_encoder")
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    pipe.fuse_lora(lora_scale=lora.arm.scale, adapter_names=[lora.adapter_name])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return originals


def _deactivate(pipe, originals: dict[tuple[str, str], torch.Tensor]) -> None:
    """Back to the base weights with no LoRA layers, so the next arm pays nothing for this one."""
    pipe.unload_lora_weights()
    with torch.no_grad():
        for (component, name), weight in originals.items():
            getattr(pipe, component).get_submodule(name).weight.copy_(weight)


def _count_chunks(tokenizer, items: list[WorkItem], mode: str) -> None:
    texts = sorted({t for item in items for t in (item.record["prompt"], item.record["negative"])})
    counts = dict(zip(texts, (len(chunks) for chunks in chunk_token_ids(tokenizer, texts, mode))))
    for item in items:
        item.chunks = max(counts[item.record["prompt"]], counts[item.record["negative"]])


def _batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Batches within one arm, each holding items of a single chunk count, in plan order otherwise."""
    batches = []
    for _, group in itertools.groupby(sorted(items, key=lambda item: item.chunks), key=lambda item: item.chunks):
        group = list(group)
        batches.extend(group[start : start + batch_size] for start in range(0, len(group), batch_size))
    return batches


class ImageWriter:
    """Encodes, fsyncs and records images on one background thread, so the GPU never waits for PNG encoding.

    Manifest lines are appended by the same thread right after their image, in submission order, so the
    manifest only ever lists complete files. At most `max_pending` images wait; a failed write is raised
    in the generating thread on the next submit or at `close`.
    """

    def __init__(self, out: Path, manifest_handle, max_pending: int):
        self.out, self.manifest_handle, self.max_pending = out, manifest_handle, max_pending
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer")
        self.pending: collections.deque[Future] = collections.deque()

    def _write(self, image: np.ndarray, record: dict, parameters: str) -> None:
        record["image_sha256"] = _write_png(image, self.out / record["file"], parameters)
        append_record(self.manifest_handle, record)

    def submit(self, image: np.ndarray, record: dict, parameters: str) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.executor.submit(self._write, image, record, parameters))

    def close(self) -> None:
        """Wait for every submitted image (also after Ctrl-C, so the manifest stays consistent)."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.executor.shutdown(wait=True)


def generate_items(pipe, items: list[WorkItem], config: GenerateConfig, out: Path, manifest_handle, log=print) -> tuple[set[str], list[str]]:
    """Generate `items` arm by arm, appending each finished image's record to `manifest_handle`.

    Returns the ids of the prompts that were longer than 75 CLIP tokens and encoded in chunks, and one
    line per refused image (non-finite or black: nothing is written for it)."""
    _count_chunks(pipe.tokenizer, items, config.long_prompts)
    done, chunked_prompt_ids, refused = 0, set(), []
    writer = ImageWriter(out, manifest_handle, max_pending=2 * config.batch_size)
    try:
        for lora, arm_items in itertools.groupby(items, key=lambda item: item.lora):
            arm_items = list(arm_items)
            originals = _activate(pipe, lora, config.fuse_lora) if lora is not None else {}
            try:
                for batch in _batches(arm_items, config.batch_size):
                    images, chunked, seconds = render_batch(pipe, batch, config)
                    for item, image, was_chunked in zip(batch, images, chunked):
                        record = {**item.record, "chunked": was_chunked, "seconds": round(seconds, 4)}
                        problem = image_problem(image)
                        if problem:
                            refused.append(f"{record['arm']}/{record['prompt_id']}/seed {record['seed']}: {problem}")
                            log(f"refused {refused[-1]}; nothing written for it")
                            continue
                        writer.submit(image, record, a1111_parameters(record, lora))
                        if was_chunked:
                            chunked_prompt_ids.add(record["prompt_id"])
                    done += len(batch)
                    log(f"{batch[0].record['arm']}: {done}/{len(items)} images ({seconds:.2f} s/image)")
            finally:
                if lora is not None:
                    _deactivate(pipe, originals)
    finally:
        writer.close()
    return chunked_prompt_ids, refused


def generate(config: GenerateConfig) -> Path:
    """Generate every missing (arm, prompt, seed) image of `config` into config.out; return the folder."""
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told it runs on CPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    out = Path(config.out)
    entries = load_prompt_set(config.prompts)[: config.limit_prompts]
    loras = _lora_sources(config)
    dtype = _resolve_dtype(config.dtype, state.device)
    base_sha256 = weights_sha256(config.base)

    if state.is_main_process:
        (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for leftover in (out / IMAGES_DIR).glob("*.tmp"):  # from an interrupted run
            leftover.unlink()
        output_salt(out)
        _, notes = recover_manifest(out, sorted(out.glob(SHARD_PATTERN)))
        for note in notes:
            print(f"note: {note}")
        save_config(config, out / "generate_config.yaml")
    state.wait_for_everyone()

    salt = output_salt(out)
    manifest = out / MANIFEST_NAME
    done = read_manifest(manifest) if manifest.is_file() else []
    items = plan_work(config, entries, loras, salt, base_sha256, dtype)
    _refuse_changed_settings(out, items, done)
    done_ids = {record["image_id"] for record in done}
    todo = [item for item in items if item.record["image_id"] not in done_ids]
    state.print(
        f"{len(items)} images planned ({1 + len(loras)} arms × {len(entries)} prompts × {len(config.seeds)} seeds), "
        f"{len(items) - len(todo)} already done, {len(todo)} to generate"
        + (f" on {state.num_processes} processes" if state.num_processes > 1 else "")
    )

    refused: list[str] = []
    if todo:
        with state.split_between_processes(todo) as mine:
            if mine:
                pipe = prepare_pipeline(config, state.device, dtype)
                target = manifest if state.num_processes == 1 else out / SHARD_PATTERN.replace("*", str(state.process_index))
                prefix = f"[process {state.process_index}] " if state.num_processes > 1 else ""
                with open(target, "a", encoding="utf-8") as handle:
                    chunked_ids, refused = generate_items(pipe, mine, config, out, handle, log=lambda line: print(prefix + line, flush=True))
                if chunked_ids:
                    print(f"{prefix}note: prompts longer than 75 CLIP tokens were encoded in 75-token chunks: {', '.join(sorted(chunked_ids))}")
        state.wait_for_everyone()
    refused = gather_object(refused) if state.num_processes > 1 else refused

    if state.is_main_process:
        records, _ = recover_manifest(out, sorted(out.glob(SHARD_PATTERN)))
        missing = len(items) - len({r["image_id"] for r in records} & {item.record["image_id"] for item in items})
        missing -= len(refused)
        if missing:
            raise FangzhiError(f"{missing} planned images are missing from {manifest} after the run; run the same command again")
        if config.contact_sheets and not refused:
            wanted = {entry.id for entry in entries}
            write_contact_sheets(out, [r for r in records if r["prompt_id"] in wanted])
        print(f"wrote {len(todo) - len(refused)} images ({len(items) - len(todo)} were already there); manifest {manifest}")
    state.wait_for_everyone()
    if refused:
        raise FangzhiError(
            f"{len(refused)} images were refused and not written (a study must not show a broken image):\n  "
            + "\n  ".join(refused)
            + f"\nThe other images are in {manifest}. A NaN or black image usually means the VAE overflowed in fp16: "
            "generate into a new --out folder with --dtype bf16 or fp32 (the images of one folder share one dtype)."
        )
    return out
