"""Where the data layer keeps what it computes once (trained tokenizers, token ids of the built-in corpus),
and how it names what it keeps there (written with :func:`wrinklefree.atomic.atomic_path`)."""

from __future__ import annotations

import hashlib
import os
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
