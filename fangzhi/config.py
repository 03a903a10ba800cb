"""One validated config object per command, loaded from YAML/TOML, with CLI flags overriding keys.

Each command defines a pydantic model with documented defaults; `load_config` merges
file < overrides, validates, and turns pydantic's errors into one readable message that names
the file, the key and the bad value.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fangzhi.errors import FangzhiError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config objects: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_utf8_text(path: str | Path, what: str) -> str:
    """The text of a user's file (a UTF-8 BOM dropped); a missing or non-UTF-8 file is a FangzhiError naming it
    (`what`: 'prompt set', ...) and the line of the first byte that is not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise FangzhiError(f"{path}: a folder; give the {what} file")
    if not path.is_file():
        raise FangzhiError(f"{what} not found: {path}")
    return decode_utf8(path, path.read_bytes())


def decode_utf8(path: Path, data: bytes) -> str:
    """`data`, the bytes of `path`, as text (a UTF-8 BOM dropped); else a FangzhiError naming the line to fix."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FangzhiError(_not_utf8_message(path, data, exc)) from None


def _not_utf8_message(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    try:
        data.decode("gb18030")
        # What Excel and Notepad on Chinese Windows write by default.
        guess = " It looks like GBK/GB18030: re-save it as UTF-8 (in Excel: CSV UTF-8)."
    except UnicodeDecodeError:
        guess = " Re-save it as UTF-8."
    return f"{path}, line {line}: not UTF-8 text (byte {exc.start}).{guess}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_utf8_text(path, "config file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise FangzhiError(f"{path}: config files must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise FangzhiError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FangzhiError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _set_dotted(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def format_validation_error(exc: ValidationError, source: str, what: str = "configuration") -> str:
    lines = [f"{source}: invalid {what}"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  key '{key}': unknown key (check the spelling; see --help for the keys)")
        elif err["type"] == "missing":
            lines.append(f"  key '{key}': required but not given")
        else:
            lines.append(f"  key '{key}': value {json.dumps(err.get('input'), default=str)} is invalid: {err['msg']}")
    return "\n".join(lines)


SHARED_KEYS = ("base", "base_config")


def load_config(
    model: type[ConfigT], path: str | Path | None = None, overrides: dict[str, Any] | None = None, section: str | None = None
) -> ConfigT:
    """Build `model` from an optional config file, then dotted-key overrides (CLI flags; None means 'not given').

    A study config (configs/paper.yaml) holds one section per command; with `section`, a file that has
    that section is read from it, plus the top-level keys every stage shares (`base`, `base_config`).
    """
    data = read_config_file(path) if path else {}
    if section and isinstance(data.get(section), dict):
        shared = {key: data[key] for key in SHARED_KEYS if key in data and key in model.model_fields}
        data = {**shared, **data[section]}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FangzhiError(format_validation_error(exc, str(path) if path else "command-line options")) from None


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default spelled out) beside a command's outputs."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8")
