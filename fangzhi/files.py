"""Writing a file whole or not at all: the one rule every output that others read (manifest, images, snapshot, baseline,
exports, prompt sets) is written by.

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
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | Path, content: str | bytes, durable: bool = False) -> Path:
    """`path` with `content` (text as UTF-8), written whole or not at all (see `replacing`)."""
    path = Path(path)
    with replacing(path, durable) as temporary:
        temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path
