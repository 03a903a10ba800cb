"""Where outputs go and how they are written: output folders and files checked before any work, and every file that
others read (manifest, images, snapshot, baseline, exports, prompt sets) written whole or not at all.

The new content goes to a temporary file beside the target, which then replaces it in one rename: a reader, a crash or a
Ctrl-C sees the old file or the new one, never half of one. The temporary name is unique to the process and thread, so
two writers never share one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fangzhi.errors import FangzhiError


@contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on leaving the block it replaces `path` (removed on an error).

    `durable`: also flushed to the disk before the rename, so that a power cut cannot leave an empty file under the
    name (for what a rerun trusts without reading: generated images, the generation manifest).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        if exc.filename not in (str(temporary), str(path)):
            raise
        # The place cannot be written (no such folder, no permission, a full disk): a user's matter, not a bug.
        raise FangzhiError(f"cannot write {path}: {exc.strerror}; choose a place you can write") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | Path, content: str | bytes, durable: bool = False) -> Path:
    """`path` with `content` (text as UTF-8), written whole or not at all (see `replacing`)."""
    path = Path(path)
    with replacing(path, durable) as temporary:
        temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def output_folder(out: str | Path, earlier_results: tuple[str, ...] = ()) -> Path:
    """`out` ready for a command's files: a folder (created if missing) without the files named by `earlier_results`
    (glob patterns). An earlier run's file that this run does not write again (friedman.csv after a three-arm run, say)
    would otherwise sit beside the new results as if it were one of them; other files in the folder stay."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FangzhiError(f"--out {out}: is a file, not a folder; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FangzhiError(f"--out {out}: cannot create the folder ({exc.strerror}); choose a folder you can write") from None
    for pattern in earlier_results:
        for earlier in out.glob(pattern):
            earlier.unlink()
    return out


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """`path` checked as a file to be written, before any work: not a folder, and its folder can be created and written."""
    path = Path(path)
    if path.is_dir():
        raise FangzhiError(f"{flag} {path}: is a folder; give the path of the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FangzhiError(f"{flag} {path}: cannot create its folder ({exc.strerror}); choose a place you can write") from None
    if not os.access(path.parent, os.W_OK):
        raise FangzhiError(f"{flag} {path}: its folder {path.parent} is not writable; choose a place you can write")
    return path
