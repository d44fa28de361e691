"""Atomic file writes, shared by every writer of the package (caches, checkpoints, exports).

What is left behind when a write does not finish:

* an exception in the writer, KeyboardInterrupt (Ctrl-C) included, or SystemExit: the target as it was
  and no temporary file (it is removed as the exception unwinds);
* a signal that kills the process without unwinding Python (SIGKILL, an out-of-memory kill, SIGTERM
  where the program installs no handler for it; ``python -m wrinklefree.export`` does, turning it into
  an exception), a crash of the interpreter or a power loss: for :func:`atomic_path` the target as it
  was too (the rename is atomic), but the hidden temporary file ``.{name}.XXXXXXXX.tmp`` may remain
  beside it. :func:`atomic_dir` likewise may leave its ``.{name}.XXXXXXXX.tmp`` directory, and, when it
  replaces an existing directory (two renames), a ``.{name}.XXXXXXXX.old`` one holding the previous
  directory; killed between the two renames, the target is absent and the previous directory is in
  that ``.old`` one. Nothing reads these leftovers; they may be deleted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step (``os.replace``).

    An exception (KeyboardInterrupt and SystemExit included) leaves ``path`` as it was (absent or the
    previous file) and removes the temporary file; a process killed outright leaves ``path`` as it was
    but may leave the temporary file (see the module docstring). Writers on one machine may build the
    same file at once: each writes its own temporary file and the last replace wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path`` (a previous one is
    replaced), so readers see the whole directory or none of it. On an exception it is removed (a
    process killed outright may leave it, see the module docstring)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "dir")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
