"""Where the data layer keeps what it computes once (trained tokenizers, token ids of the built-in corpus),
and how it writes there: atomically, so that a crash or a second process never leaves half a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """``$WF_CACHE_DIR``, else ``~/.cache/wrinklefree``; subfolders ``tokenizers/`` and ``tokens/``."""
    env = os.environ.get("WF_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wrinklefree"


def short_hash(*parts: object) -> str:
    """16 hex digits identifying ``parts`` (their ``str``); used in cache file names."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step (``os.replace``).

    Ranks on one machine may build the same cache file at once: each writes its own temporary file and the
    last replace wins, with identical content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
