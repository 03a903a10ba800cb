"""The generation manifest (`OUT/manifest.jsonl`, docs/formats.md): one JSON line per finished image.

A line is appended only after its PNG is complete and renamed into place, and the append is flushed
and fsynced, so an interrupted run leaves a manifest whose every line names a whole image. A hard
crash can at worst leave a final line without its newline; `recover_manifest` drops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from fangzhi.errors import FangzhiError
from fangzhi.files import write_atomically

MANIFEST_NAME = "manifest.jsonl"
SALT_NAME = ".salt"
IMAGES_DIR = "images"

# The fields docs/formats.md promises (readers such as the rating app and the CLIP scorer rely on them).
MANIFEST_FIELDS = (
    "image_id", "file", "arm", "prompt_id", "seed", "prompt", "prompt_en", "narrative_zh", "source", "negative",
    "chunked", "scheduler", "steps", "cfg", "width", "height", "lora_scale", "base", "base_sha256", "lora",
    "lora_sha256", "image_sha256", "seconds",
)
# Fields that may be null (the base arm has no LoRA).
NULLABLE_FIELDS = ("lora_scale", "lora", "lora_sha256")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_salt(out: Path) -> str:
    """The folder's random salt (created on first use): image ids are stable across reruns into it, yet opaque."""
    path = out / SALT_NAME
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(path, secrets.token_hex(16))
    return path.read_text(encoding="ascii").strip()


def image_id(salt: str, key: dict) -> str:
    """16 hex chars of sha256(salt, key): the same key in the same folder gives the same id, and the id
    reveals nothing about arm, prompt or seed without the salt."""
    return hashlib.sha256((salt + "\n" + json.dumps(key, sort_keys=True)).encode()).hexdigest()[:16]


def _parse(path: Path, text: str, allow_partial_tail: bool) -> tuple[list[dict], bool]:
    """Records of a manifest's text and whether a partial final line (no newline, not JSON) was dropped."""
    lines = text.split("\n")
    records, dropped_tail = [], False
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if allow_partial_tail and line_number == len(lines):  # the last line, with no newline after it
                dropped_tail = True
                continue
            raise FangzhiError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise FangzhiError(f"{where}: each line must be a JSON object (see docs/formats.md, generation manifest)")
        missing = [field for field in MANIFEST_FIELDS if field not in record or (record[field] is None and field not in NULLABLE_FIELDS)]
        if missing:
            raise FangzhiError(f"{where}: missing field(s) {', '.join(missing)} (see docs/formats.md, generation manifest)")
        if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
            raise FangzhiError(f"{where}: seed {record['seed']!r} is not an integer")
        record["_line"] = line_number
        records.append(record)
    _check_unique(path, records)
    return records, dropped_tail


def _check_unique(path: Path, records: list[dict]) -> None:
    for what, key in (("image_id", lambda r: r["image_id"]), ("(arm, prompt_id, seed)", lambda r: (r["arm"], r["prompt_id"], r["seed"]))):
        first_line: dict = {}
        for record in records:
            value = key(record)
            if value in first_line:
                raise FangzhiError(
                    f"{path}: the same {what} {value!r} is on lines {first_line[value]} and {record['_line']}; "
                    "each image must be listed once"
                )
            first_line[value] = record["_line"]


def read_manifest(path: str | Path, check_files: bool = False) -> list[dict]:
    """Every record of a manifest, in file order, each with `_line` (its line number) added.

    Raises FangzhiError naming the line for invalid JSON, missing fields, a non-integer seed, or a
    repeated image_id or (arm, prompt_id, seed). With `check_files`, also that every image exists and
    matches its image_sha256.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        raise FangzhiError(f"{path}: a folder; give its manifest, {path / MANIFEST_NAME}")
    if not path.is_file():
        raise FangzhiError(f"{path}: generation manifest not found")
    records, _ = _parse(path, path.read_text(encoding="utf-8"), allow_partial_tail=False)
    if check_files:
        for record in records:
            problem = image_problem(path.parent, record)
            if problem:
                raise FangzhiError(f"{path}, line {record['_line']}: {problem}")
    return records


def image_problem(folder: Path, record: dict) -> str | None:
    """Why the record's image cannot be trusted (missing, or not the bytes that were generated), or None."""
    image = folder / record["file"]
    if not image.is_file():
        return f"image file {record['file']} is missing"
    if file_sha256(image) != record["image_sha256"]:
        return f"image file {record['file']} does not match its image_sha256 (changed or truncated)"
    return None


def write_manifest(path: Path, records: list[dict]) -> None:
    """Replace the manifest atomically with `records` (e.g. after dropping lines whose image is gone)."""
    write_atomically(path, "".join(to_line(record) for record in records), durable=True)


def to_line(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"


def append_record(handle, record: dict) -> None:
    """Append one line and make it durable before the next image starts (the caller holds the file open)."""
    handle.write(to_line(record))
    handle.flush()
    os.fsync(handle.fileno())


def recover_manifest(out: Path, shard_files: list[Path] = ()) -> tuple[list[dict], list[str]]:
    """The trustworthy records of OUT's manifest, for resuming, and notes on what was dropped.

    Lines left in per-process shard files by an interrupted multi-process run are merged in. A partial
    final line, and lines whose image is missing or does not match its hash, are dropped (the images
    will be generated again). If anything changed, the manifest is rewritten atomically and the shards
    are deleted.
    """
    manifest = out / MANIFEST_NAME
    notes: list[str] = []
    changed = False
    records: list[dict] = []
    for source in [manifest, *shard_files]:
        if not source.is_file():
            continue
        parsed, dropped_tail = _parse(source, source.read_text(encoding="utf-8"), allow_partial_tail=True)
        if dropped_tail:
            notes.append(f"{source}: dropped an incomplete last line (an interrupted write)")
        records.extend(parsed)
        changed |= dropped_tail or source != manifest
    kept, seen_ids = [], set()
    for record in records:
        if record["image_id"] in seen_ids:  # a shard merged just before an interruption: already in the manifest
            changed = True
            continue
        seen_ids.add(record["image_id"])
        problem = image_problem(out, record)
        if problem:
            notes.append(f"{record['arm']}/{record['prompt_id']}/seed {record['seed']}: {problem}; generating it again")
            changed = True
        else:
            kept.append(record)
    _check_unique(manifest, kept)
    if changed:
        write_manifest(manifest, kept)
        for shard in shard_files:
            shard.unlink(missing_ok=True)
    return kept, notes
