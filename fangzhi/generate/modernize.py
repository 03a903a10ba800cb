"""`fangzhi prompts modernize`: classical Chinese excerpts -> modern narrative + English prompt, via an LLM.

This is the paper's ChatGLM step. Each excerpt of a source text (format: docs/formats.md, "Source
texts") is sent to any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`: GLM's
API, vLLM, Ollama, llama.cpp's server), which must answer with a JSON object holding `narrative_zh`
and `prompt_en`. Replies are validated as prompt-set entries; network errors, 5xx/429 answers,
timeouts and malformed replies are retried with exponential backoff. Every valid reply is cached
under sha256(model, system prompt, excerpt), so a rerun sends only what has not succeeded yet.
Entries that still fail are listed (printed and written next to the output), never dropped silently.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from fangzhi.config import StrictModel, read_utf8_text
from fangzhi.errors import FangzhiError
from fangzhi.files import write_atomically
from fangzhi.generate.prompts import PromptEntry, load_prompt_set, save_prompt_set

SYSTEM_PROMPT = """你是一位熟悉北京历史地理的科普作者，也熟悉中国传统山水画。用户会给你一段出自《顺天府志》地理志的文言文摘录。
请只输出一个 JSON 对象，不要输出任何其他文字，格式为：
{"narrative_zh": "...", "prompt_en": "..."}
要求：
1. narrative_zh：用现代汉语写 2 到 4 句通俗的科普叙述，忠实于原文，不要编造原文没有的史实。
2. prompt_en：用英文描述一幅表现这段内容的中国传统山水画（给 Stable Diffusion 使用），写出具体可见的景物、季节、光线、人物活动和笔墨设色风格，40 到 90 个英文单词；地名用拼音或通行英文名，不要出现汉字。"""


class ModernizeConfig(StrictModel):
    """Settings for `fangzhi prompts modernize`; every key can also be given as a flag."""

    base_url: str = Field(
        min_length=1,
        description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 or https://open.bigmodel.cn/api/paas/v4 "
        "(env FANGZHI_LLM_BASE_URL)",
    )
    model: str = Field(min_length=1, description="model name the server expects, e.g. glm-4-flash (env FANGZHI_LLM_MODEL)")
    api_key_env: str = Field(
        default="FANGZHI_LLM_API_KEY", description="environment variable holding the API key; unset means no key"
    )
    cache_dir: Path | None = Field(default=None, description="reply cache; default $XDG_CACHE_HOME/fangzhi/modernize")
    retries: int = Field(default=4, ge=0, description="extra attempts per excerpt after the first fails")
    timeout_s: float = Field(default=60.0, gt=0, description="seconds to wait for one reply")
    backoff_s: float = Field(default=1.0, ge=0, description="wait before the first retry; doubles on each retry")
    max_backoff_s: float = Field(default=30.0, ge=0, description="longest wait between retries")
    temperature: float = Field(default=0.3, ge=0, le=2)
    json_mode: bool = Field(
        default=True, description="ask for response_format json_object (dropped automatically if the server rejects it)"
    )

    @field_validator("base_url")
    @classmethod
    def _http_url_with_host(cls, value: str) -> str:
        # urllib reports a missing scheme or host only when the request is sent, as a retryable network error.
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            example = f"http://{value}" if "://" not in value else "http://127.0.0.1:8000/v1"
            raise ValueError(
                f"--base-url (or $FANGZHI_LLM_BASE_URL) must be an http:// or https:// URL with a host, e.g. {example}"
            )
        return value


@dataclass
class Excerpt:
    id: str
    text: str
    line: int


@dataclass
class Failure:
    id: str
    line: int
    source: str
    reason: str
    attempts: int


@dataclass
class ModernizeResult:
    entries: list[PromptEntry]
    failures: list[Failure]
    out_path: Path
    failures_path: Path
    from_cache: int
    requests: int
    notes: list[str] = field(default_factory=list)


class _EntryFailed(Exception):
    """The server refused this excerpt for good (e.g. HTTP 400 from a content filter): do not retry it."""


class _RetryableError(Exception):
    """A reply we should ask for again (server error, timeout, malformed content)."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


# --- source text -----------------------------------------------------------------------------

# Same characters as a prompt-set id (prompts.ID_PATTERN); ASCII colon only, so Chinese text with a
# full-width colon (西山：……) is never mistaken for an id.
_ID_PREFIX = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)[ \t]*:[ \t]*")


def read_source_text(path: str | Path) -> list[Excerpt]:
    """Split a source text into excerpts: paragraphs separated by blank lines; '#' lines are comments.

    A paragraph may start with an ASCII id and a colon (`xishan: 西山在府西三十里……`); otherwise its
    id is `excerpt-NNN` from its position. The lines of a paragraph are joined without a separator
    (classical Chinese has no spaces between words).
    """
    path = Path(path)
    text = read_utf8_text(path, "source text")
    paragraphs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if line.startswith("#"):
            continue
        if not line:
            current = []
            continue
        if not current:
            paragraphs.append((line_number, current))
        current.append(line)

    excerpts: list[Excerpt] = []
    seen: dict[str, int] = {}
    for position, (line_number, lines) in enumerate(paragraphs, start=1):
        excerpt_text = "".join(lines)
        match = _ID_PREFIX.match(excerpt_text)
        if match:
            excerpt_id, excerpt_text = match.group(1), excerpt_text[match.end() :].strip()
        else:
            excerpt_id = f"excerpt-{position:03d}"
        if not excerpt_text:
            raise FangzhiError(f"{path}: line {line_number}: excerpt '{excerpt_id}' has an id but no text")
        if excerpt_id in seen:
            raise FangzhiError(
                f"{path}: line {line_number}: id '{excerpt_id}' is already used on line {seen[excerpt_id]}; ids must be unique"
            )
        seen[excerpt_id] = line_number
        excerpts.append(Excerpt(excerpt_id, excerpt_text, line_number))
    if not excerpts:
        raise FangzhiError(f"{path}: contains no excerpts (write one excerpt per paragraph, separated by blank lines)")
    return excerpts


# --- one reply -------------------------------------------------------------------------------

_FENCED_JSON = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_reply(content: str) -> dict:
    """The JSON object in a model's reply: bare, inside ```json fences, or embedded in chatter."""
    fenced = _FENCED_JSON.search(content)
    candidate = fenced.group(1) if fenced else content
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end < start:
        raise _RetryableError(f"reply has no JSON object: {content[:120]!r}")
    try:
        data = json.loads(candidate[start : end + 1])
    except json.JSONDecodeError as exc:
        raise _RetryableError(f"reply is not valid JSON ({exc.msg}): {content[:120]!r}") from None
    if not isinstance(data, dict):
        raise _RetryableError(f"reply JSON is not an object: {content[:120]!r}")
    return data


def _entry_from_reply(excerpt: Excerpt, data: dict, model: str) -> PromptEntry:
    try:
        return PromptEntry(
            id=excerpt.id,
            source=excerpt.text,
            narrative_zh=data.get("narrative_zh", ""),
            prompt_en=data.get("prompt_en", ""),
            notes=f"narrative_zh and prompt_en written by {model} (fangzhi prompts modernize); review before use",
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _RetryableError(f"reply fails validation: {problems}") from None


def cache_key(model: str, system_prompt: str, excerpt_text: str) -> str:
    payload = json.dumps([model, system_prompt, excerpt_text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fangzhi" / "modernize"


class _ChatClient:
    def __init__(self, config: ModernizeConfig):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(config.api_key_env) or None
        self.json_mode = config.json_mode
        self.requests = 0
        self.notes: list[str] = []

    def complete(self, excerpt_text: str) -> str:
        """One chat completion; returns the reply text.

        Raises _RetryableError (ask again), _EntryFailed (give up on this excerpt) or FangzhiError (stop:
        the settings are wrong, every excerpt would fail the same way).
        """
        body = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": excerpt_text}],
            "temperature": self.config.temperature,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if exc.code in (400, 422) and self.json_mode:
                # Not every server (older llama.cpp, some Ollama models) accepts response_format.
                self.json_mode = False
                try:
                    content = self.complete(excerpt_text)
                except _EntryFailed:
                    self.json_mode = True  # the objection was to this excerpt, not to response_format
                    raise
                self.notes.append(f"{self.url} rejected response_format json_object (HTTP {exc.code}); asked without it")
                return content
            if exc.code in (401, 403):
                raise FangzhiError(
                    f"{self.url}: HTTP {exc.code} (not authorized): set the API key in ${self.config.api_key_env} "
                    f"or pass --api-key-env NAME. Server said: {detail}"
                ) from None
            if exc.code == 404:
                raise FangzhiError(
                    f"{self.url}: HTTP 404: check --base-url (it should end where '/chat/completions' can be "
                    f"appended, e.g. http://127.0.0.1:8000/v1) and --model. Server said: {detail}"
                ) from None
            if exc.code == 429 or exc.code >= 500:
                retry_after = exc.headers.get("Retry-After", "")
                wait_s = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
                raise _RetryableError(f"HTTP {exc.code}: {detail}", wait_s) from None
            raise _EntryFailed(f"HTTP {exc.code} (not retried): {detail}") from None
        except (TimeoutError, socket.timeout):
            raise _RetryableError(f"no reply within {self.config.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            raise _RetryableError(f"cannot reach {self.url}: {exc.reason}") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise _RetryableError(f"connection to {self.url} failed: {exc!r}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise _RetryableError(f"response is not an OpenAI chat completion: {payload[:200]!r}") from None


def _modernize_one(client: _ChatClient, excerpt: Excerpt, config: ModernizeConfig) -> tuple[PromptEntry | None, str, int]:
    """(entry or None, last failure reason, attempts made)."""
    reason = ""
    for attempt in range(config.retries + 1):
        try:
            content = client.complete(excerpt.text)
            return _entry_from_reply(excerpt, parse_reply(content), config.model), "", attempt + 1
        except _EntryFailed as exc:
            return None, str(exc), attempt + 1
        except _RetryableError as exc:
            reason = str(exc)
            if attempt == config.retries:
                break
            wait_s = exc.wait_s if exc.wait_s is not None else config.backoff_s * 2**attempt
            time.sleep(min(wait_s, config.max_backoff_s))
    return None, reason, config.retries + 1


# --- the command ------------------------------------------------------------------------------


def _read_cache(cache_file: Path, excerpt: Excerpt, model: str) -> PromptEntry | None:
    """The cached entry, or None when there is none (or it is unreadable: then we simply ask again)."""
    if not cache_file.is_file():
        return None
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        return _entry_from_reply(excerpt, cached["reply"], model)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, _RetryableError):
        return None


def _would_lose_entries(out_path: Path, new_entries: list[PromptEntry]) -> bool:
    """True unless every entry of the existing output reappears unchanged among `new_entries`."""
    try:
        old_entries = load_prompt_set(out_path)
    except FangzhiError:
        return True
    new_by_id = {entry.id: entry for entry in new_entries}
    return any(new_by_id.get(entry.id) != entry for entry in old_entries)


def _free_backup_path(out_path: Path) -> Path:
    """A backup name for `out_path` that no file has yet: two runs within one second must both keep theirs."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = out_path.with_name(f"{out_path.stem}.{stamp}.bak{out_path.suffix}")
    number = 1
    while backup.exists():
        number += 1
        backup = out_path.with_name(f"{out_path.stem}.{stamp}-{number}.bak{out_path.suffix}")
    return backup


def failures_path_for(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".failures.yaml")


def modernize_source(source_path: str | Path, out_path: str | Path, config: ModernizeConfig) -> ModernizeResult:
    """Modernize every excerpt of `source_path` and write the prompt set to `out_path` (.yaml/.jsonl).

    Failed excerpts are listed in `<out stem>.failures.yaml` beside the output (removed when a rerun
    has none) and left out of the prompt set, which must hold only valid entries. When every excerpt
    fails, no prompt set is written and an existing output is left as it was.
    """
    out_path = Path(out_path)
    if out_path.suffix not in (".yaml", ".yml", ".jsonl"):
        raise FangzhiError(f"{out_path}: the output prompt set must end in .yaml, .yml or .jsonl")
    excerpts = read_source_text(source_path)
    cache_dir = Path(config.cache_dir) if config.cache_dir else _default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    client = _ChatClient(config)

    entries: list[PromptEntry] = []
    failures: list[Failure] = []
    from_cache = 0
    for excerpt in excerpts:
        cache_file = cache_dir / f"{cache_key(config.model, SYSTEM_PROMPT, excerpt.text)}.json"
        cached_entry = _read_cache(cache_file, excerpt, config.model)
        if cached_entry is not None:
            entries.append(cached_entry)
            from_cache += 1
            continue
        entry, reason, attempts = _modernize_one(client, excerpt, config)
        if entry is None:
            failures.append(Failure(excerpt.id, excerpt.line, excerpt.text, reason, attempts))
            continue
        reply = {"narrative_zh": entry.narrative_zh, "prompt_en": entry.prompt_en}
        record = {"model": config.model, "source": excerpt.text, "reply": reply, "created": datetime.now(timezone.utc).isoformat()}
        write_atomically(cache_file, json.dumps(record, ensure_ascii=False, indent=1))
        entries.append(entry)

    if not entries:
        # A prompt set without entries is invalid (`prompts check` refuses it), so there is nothing to write.
        client.notes.append(
            f"no excerpt was modernized: {out_path.name} is left as it was" if out_path.exists()
            else f"no excerpt was modernized: {out_path.name} was not written"
        )
    else:
        if out_path.exists() and _would_lose_entries(out_path, entries):
            # The previous output may hold hand edits (entries are meant to be reviewed): keep it.
            backup = _free_backup_path(out_path)
            os.replace(out_path, backup)
            client.notes.append(f"{out_path.name} had entries this run does not reproduce; the old file is kept as {backup.name}")
        save_prompt_set(entries, out_path)
    failures_path = failures_path_for(out_path)
    if failures:
        failures_path.parent.mkdir(parents=True, exist_ok=True)
        report = [
            {"id": f.id, "line": f.line, "source": f.source, "reason": f.reason, "attempts": f.attempts} for f in failures
        ]
        failures_path.write_text(
            f"# {len(failures)} excerpt(s) of {Path(source_path)} that {config.model} did not modernize; rerun to retry them\n"
            + yaml.safe_dump(report, sort_keys=False, allow_unicode=True, width=100),
            encoding="utf-8",
        )
    elif failures_path.exists():
        failures_path.unlink()
    return ModernizeResult(entries, failures, out_path, failures_path, from_cache, client.requests, client.notes)
