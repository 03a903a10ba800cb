"""Prompt sets: the texts images are generated for, each tied to the gazetteer excerpt it came from.

A prompt set is a YAML file (a list of entries) or a JSONL file (one entry per line); the format is
documented in docs/formats.md, "Prompt sets". `load_prompt_set` validates every entry and reports
every problem at once, naming the file, the entry (index, id, line) and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from fangzhi.config import StrictModel, read_utf8_text
from fangzhi.errors import FangzhiError
from fangzhi.files import write_atomically

SHIPPED_PROMPT_SETS = Path(__file__).parent / "prompts"
SHUNTIAN_PROMPT_SET = SHIPPED_PROMPT_SETS / "shuntian.yaml"

# Ids end up in file names and manifest keys, so keep them to a portable character set.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# SD v1.5's CLIP tokenizer has no Chinese vocabulary: CJK text becomes byte-level junk tokens.
CJK_CHARACTERS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")

# CLIP sees 77 positions: start token, 75 text tokens, end token. Longer prompts are chunked.
CLIP_CHUNK_TOKENS = 75


class PromptEntry(StrictModel):
    """One prompt: the classical source, its modern narrative, and the English text SD v1.5 sees."""

    model_config = ConfigDict(StrictModel.model_config, str_strip_whitespace=True)

    id: str = Field(pattern=ID_PATTERN, description="unique within the set; letters, digits, '_', '.', '-'")
    source: str = Field(min_length=1, description="the classical Chinese excerpt (or gist) the prompt is drawn from")
    narrative_zh: str = Field(min_length=1, description="modern Chinese popular-science narrative of the excerpt")
    prompt_en: str = Field(min_length=1, description="English prompt given to SD v1.5's (English-only) CLIP text encoder")
    negative: str | None = Field(default=None, description="negative prompt; the generator's default when absent")
    notes: str | None = Field(default=None, description="free text: provenance, the model that wrote it, caveats")

    @field_validator("prompt_en")
    @classmethod
    def _english_only(cls, value: str) -> str:
        found = CJK_CHARACTERS.search(value)
        if found:
            raise ValueError(
                f"contains the Chinese/full-width character {found.group()!r}; SD v1.5's CLIP tokenizer is "
                "English-only, so write it in English (romanize names, e.g. Xiangshan)"
            )
        return value


def _describe_validation_error(exc: ValidationError, field_lines: dict[str, int]) -> list[str]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(entry)"
        where = f" (line {field_lines[field]})" if field in field_lines else ""
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(PromptEntry.model_fields)
            problems.append(f"field '{field}'{where}: unknown field (allowed: {allowed})")
        elif err["type"] == "missing":
            problems.append(f"field '{field}': required but missing")
        elif err["type"] == "string_too_short" or (err["type"] == "string_type" and err.get("input") is None):  # `prompt_en:` with nothing after it
            problems.append(f"field '{field}'{where}: is empty")
        elif err["type"] == "string_pattern_mismatch":
            problems.append(
                f"field '{field}'{where}: {err['input']!r} is not a valid id (use letters, digits, '_', '.', '-'; "
                "start with a letter or digit)"
            )
        else:
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}'{where}: {message}")
    return problems


def _yaml_entries(path: Path, text: str) -> list[tuple[Any, int, dict[str, int]]]:
    """(entry data, line of the entry, line of each field) for a YAML list of entries."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise FangzhiError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise FangzhiError(f"{path}: the file is empty; a prompt set is a list of entries")
    if not isinstance(data, list):
        raise FangzhiError(
            f"{path}: the top level must be a list of entries ('- id: ...'), found a {type(data).__name__}"
        )
    entries = []
    for item, node in zip(data, root.value):
        field_lines = {}
        if isinstance(node, yaml.MappingNode):
            field_lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
        entries.append((item, node.start_mark.line + 1, field_lines))
    return entries


def _jsonl_entries(path: Path, text: str) -> list[tuple[Any, int, dict[str, int]]]:
    entries = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FangzhiError(f"{path}: line {line_number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        entries.append((item, line_number, {}))
    return entries


def load_prompt_set(path: str | Path) -> list[PromptEntry]:
    """Read and validate a prompt set (.yaml, .yml or .jsonl). Raises FangzhiError listing every problem."""
    path = Path(path)
    if path.is_dir():
        # More than read_utf8_text's "a folder": the prompt sets it holds, one of which was likely meant.
        inside = sorted(f.name for f in path.iterdir() if f.suffix in (".yaml", ".yml", ".jsonl") and f.is_file())
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise FangzhiError(f"{path} is a folder; a prompt set is a .yaml, .yml or .jsonl file{hint}")
    text = read_utf8_text(path, "prompt set")
    if path.suffix in (".yaml", ".yml"):
        raw_entries = _yaml_entries(path, text)
    elif path.suffix == ".jsonl":
        raw_entries = _jsonl_entries(path, text)
    else:
        raise FangzhiError(f"{path}: prompt sets must end in .yaml, .yml or .jsonl")
    if not raw_entries:
        raise FangzhiError(f"{path}: contains no entries")

    entries: list[PromptEntry] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for index, (item, line, field_lines) in enumerate(raw_entries, start=1):
        raw_id = item.get("id") if isinstance(item, dict) else None
        label = f"entry {index}" + (f" (id '{raw_id}', line {line})" if raw_id is not None else f" (line {line})")
        if not isinstance(item, dict):
            problems.append(f"{label}: must be a mapping of fields (id, source, narrative_zh, prompt_en, ...)")
            continue
        # Duplicates are checked on the raw id, so they are reported even when the entry has other problems.
        entry_id = str(raw_id).strip() if raw_id is not None else None
        duplicate = entry_id in first_seen
        if duplicate:
            problems.append(f"{label}: duplicate id '{entry_id}' (first used by {first_seen[entry_id]}); ids must be unique")
        elif entry_id:
            first_seen[entry_id] = f"entry {index}, line {line}"
        try:
            entry = PromptEntry.model_validate(item)
        except ValidationError as exc:
            problems.extend(f"{label}: {problem}" for problem in _describe_validation_error(exc, field_lines))
            continue
        if not duplicate:
            entries.append(entry)
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise FangzhiError(f"{path}: {count} in the prompt set:\n  " + "\n  ".join(problems))
    return entries


def render_prompt_set(entries: list[PromptEntry], suffix: str) -> str:
    """The text of a prompt-set file with extension `suffix` (.yaml, .yml or .jsonl)."""
    rows = [entry.model_dump(exclude_none=True) for entry in entries]
    if suffix in (".yaml", ".yml"):
        return yaml.safe_dump(rows, sort_keys=False, allow_unicode=True, width=100)
    if suffix == ".jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    raise FangzhiError(f"prompt sets must end in .yaml, .yml or .jsonl, not {suffix or 'no extension'}")


def save_prompt_set(entries: list[PromptEntry], path: str | Path) -> Path:
    """Write entries as a prompt set (.yaml/.yml or .jsonl), atomically: a crash never leaves half a file."""
    path = Path(path)
    text = render_prompt_set(entries, path.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)
    return path


def check_prompt_set(path: str | Path) -> str:
    """Validate a prompt set and return a one-line summary (raises FangzhiError listing problems)."""
    from open_clip.tokenizer import SimpleTokenizer

    entries = load_prompt_set(path)
    with_negative = sum(entry.negative is not None for entry in entries)
    # SimpleTokenizer gives the same ids as SD v1.5's CLIPTokenizer (tested), without any model files.
    tokenizer = SimpleTokenizer()
    long_ids = [entry.id for entry in entries if len(tokenizer.encode(entry.prompt_en)) > CLIP_CHUNK_TOKENS]
    summary = f"{path}: {len(entries)} valid entries ({with_negative} with a negative prompt)"
    if long_ids:
        summary += (
            f"; {len(long_ids)} prompt_en longer than {CLIP_CHUNK_TOKENS} CLIP tokens, encoded in chunks: "
            + ", ".join(long_ids)
        )
    return summary
