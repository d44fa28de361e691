"""The built-in corpus: text that every machine with Python already has, so training and tests need no download.

It is the prose of ``pydoc_data.topics`` (the language reference topics behind ``help()``) followed by the
standard library's own ``.py`` sources, read at run time. About 12.6 MB on CPython 3.11.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from pathlib import Path

# Bump when the selection rules below change: it is part of every cache key derived from the corpus.
CORPUS_VERSION = 1

# Test folders hold deliberately broken or odd files (lib2to3/tests/data, idlelib/idle_test), and
# site-packages is whatever the user installed, which would make the corpus differ between machines.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def builtin_corpus(max_chars: int = 16_000_000) -> list[str]:
    """Documents of the built-in corpus, at most ``max_chars`` characters in all.

    Order: the ``pydoc_data.topics`` texts (sorted by topic), then one document per standard-library ``.py``
    file (sorted by path relative to the library root); empty files and files that are not valid UTF-8 are
    left out. The last document is cut so that the total is exactly ``min(max_chars, size of the corpus)``.
    """
    if max_chars < 0:
        raise ValueError(f"builtin_corpus: max_chars must be >= 0, got {max_chars}")
    docs, total = [], 0
    for doc in _all_documents():
        if total >= max_chars:
            break
        doc = doc[: max_chars - total]
        docs.append(doc)
        total += len(doc)
    return docs


def corpus_key(max_chars: int) -> str:
    """A string identifying ``builtin_corpus(max_chars)`` without reading it: the Python build and the cap."""
    return f"builtin-v{CORPUS_VERSION}|{sys.implementation.cache_tag}|{sys.version}|{max_chars}"


@functools.cache
def _all_documents() -> tuple[str, ...]:
    # Cached: the tokenizer and the built-in source both read the corpus in one process.
    docs = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without pydoc_data
        topics = {}
    docs.extend(topics[k] for k in sorted(topics) if topics[k].strip())
    for path in _stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():  # empty __init__.py files are not documents
            docs.append(text)
    return tuple(docs)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
