"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically (DESIGN.md section 5).

Layout: ``{root}/checkpoints/{experiment}/{stage}_checkpoint/checkpoints/{step_N|final}/`` holding the
DCP shards of the model and optimizer (``.distcp`` files + ``.metadata``), ``trainer_rank{R}.pt``
with everything else (step, schedules, data position, RNG states; the trainer adds its resolved config)
and whatever the saver adds (the trainer: its tokenizer, in ``tokenizer/``). ``root`` is ``output_dir`` on the
local disk and, when ``training.remote_dir`` is set, the same layout under that fsspec URL.

Atomicity, locally: a save goes to ``.tmp-{name}`` beside the target, which rank 0 renames into
place once every rank has written its part, so a run killed during a save leaves the previous
checkpoint as it was and an unfinished one is never taken for a checkpoint (the next save removes
it). Replacing an existing checkpoint moves the old one to ``.tmp-old-{name}`` first; a run killed
between the two renames leaves that one, which readers accept and the next save puts back.

Atomicity, remotely: object stores have no atomic directory rename, so after the local checkpoint is
complete rank 0 uploads its files to ``{remote}/{name}/`` and writes the completion marker
(:data:`COMPLETE_MARKER`, a JSON manifest) last. Readers take a remote checkpoint only with its
marker, and replacing one removes the marker before anything else: a remote checkpoint is complete
or absent. The upload runs in a thread while training goes on; the next save waits for it first,
and the ``final`` save waits for its own.

Paths: a local path, any fsspec URL (``gs://`` needs gcsfs, ``s3://`` s3fs; ``file://`` and
``memory://`` work out of the box), or ``hf://owner/repo[@revision]/subdir`` for a checkpoint folder
in a Hugging Face hub repo (fetched with ``huggingface_hub.snapshot_download`` into the hub cache).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import pickle
import posixpath
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".tmp-old-"
COMPLETE_MARKER = ".complete"
"""Written last into a remote checkpoint; a remote checkpoint without it is unfinished (or being replaced)."""
TOKENIZER_DIR = "tokenizer"
"""The folder of a trainer checkpoint holding the run's tokenizer (``save_pretrained``), for the exporter."""

_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs"}

T = TypeVar("T")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's weights do not match the model's (missing, unexpected or differently shaped keys)."""


# ---- paths ------------------------------------------------------------------------------------


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (fsspec URLs and ``hf://``), false for local paths."""
    return isinstance(path, str) and "://" in path


def stage_dir(root: str | os.PathLike, experiment: str, stage: str) -> Path | str:
    """Where a stage's checkpoints live under ``root`` (DESIGN.md section 5): a Path, or a URL for a URL root."""
    parts = ("checkpoints", experiment, f"{stage}_checkpoint", "checkpoints")
    if is_url(root):
        return "/".join((str(root).rstrip("/"), *parts))
    return Path(root).joinpath(*parts)


def filesystem(url: str):
    """``(fsspec filesystem, path within it)`` of ``url``, with a clear error when its package is missing."""
    from fsspec.core import url_to_fs

    protocol = url.split("://", 1)[0]
    try:
        return url_to_fs(url)
    except ImportError as e:
        package = _PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(
            f"{url}: {protocol}:// URLs need {package} (pip install {package}) and credentials for the storage"
        ) from e
    except ValueError as e:
        raise ValueError(f"{url}: fsspec does not know the protocol {protocol}:// ({e})") from e


def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """``hf://owner/name[@revision]/sub/dir`` -> ``(repo id, revision or None, subdir)``."""
    if not spec.startswith("hf://"):
        raise ValueError(f"{spec}: a hub checkpoint is written hf://owner/name[@revision]/subdir")
    parts = spec[len("hf://") :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{spec}: a hub checkpoint is written hf://owner/name[@revision]/subdir")
    owner, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    return f"{owner}/{name}", revision, "/".join(parts[2:])


def hub_download(spec: str) -> Path:
    """Fetch the checkpoint folder of ``hf://owner/name[@revision]/subdir`` (only that folder) into the hub
    cache; returns its local path, which holds no ``.metadata`` when the repo has no such folder."""
    import huggingface_hub  # attribute lookup at call time, so tests can replace snapshot_download

    repo_id, revision, sub = parse_hub(spec)
    root = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None)
    return Path(root, sub) if sub else Path(root)


def resolve(path: str | os.PathLike) -> Path | str:
    """A local Path, or an fsspec URL; ``hf://`` specs are downloaded first (the local copy's Path)."""
    if is_url(path):
        return hub_download(str(path)) if str(path).startswith("hf://") else str(path)
    return Path(path)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local or fsspec URL, not ``hf://``) holds a finished checkpoint."""
    if is_url(path):
        fs, p = filesystem(str(path))
        return fs.exists(f"{p.rstrip('/')}/{COMPLETE_MARKER}")
    return (Path(path) / ".metadata").is_file()


def _require_complete(path: Path | str, shown: str | os.PathLike) -> None:
    if is_complete(path):
        return
    if is_url(path):
        raise FileNotFoundError(
            f"checkpoint: {shown} is not a complete checkpoint (no {COMPLETE_MARKER} marker: absent, or an upload "
            "that did not finish)"
        )
    raise FileNotFoundError(f"checkpoint: {shown} is not a checkpoint directory (no .metadata)")


def _reader(path: Path | str):
    if is_url(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        filesystem(path)  # the clear error for a missing package
        return FsspecReader(path)
    return dcp.FileSystemReader(path)


# ---- processes --------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and give every rank its (picklable) result; a barrier for the others.

    An exception on rank 0 is raised on every rank, so no rank waits forever for one that failed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box: list[Any] = [None, None]
    error: BaseException | None = None
    if _rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:
            error = e
            box[1] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {box[1]}")
    # Gloo's worker thread drops the broadcast's Python-owned tensors after the fact, which needs the GIL;
    # if that is still pending when the process exits, the process group's destructor (joining that
    # thread while holding the GIL) deadlocks. A barrier (C++-owned tensors, GIL released while waiting)
    # lets it happen now.
    dist.barrier()
    return box[0]


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002  (the global generator, which libraries may use)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the manager ------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and finds the checkpoints of one stage of one experiment.

    Args:
        directory: the stage's local checkpoint directory (:func:`stage_dir`).
        keep: how many ``step_N`` checkpoints to keep, locally and remotely (oldest removed after a
            save; ``final`` is never removed). 0 keeps all.
        remote: the stage's directory as an fsspec URL (:func:`stage_dir` of ``training.remote_dir``):
            each checkpoint is also uploaded there, and :meth:`latest` looks there when there is none
            locally. None: local only.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2, remote: str | None = None) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.remote: str | None = None
        self._upload_thread: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        if remote:
            self.mirror_to(remote)

    def mirror_to(self, remote: str) -> None:
        """Also write every checkpoint to the fsspec URL ``remote`` (checked now: a missing package fails here)."""
        if not is_url(remote) or remote.startswith("hf://"):
            raise ValueError(
                f"remote checkpoint directory {remote!r}: expected an fsspec URL such as gs://bucket/path "
                "(for the Hugging Face hub, set training.hub_repo: it is looked up, not written)"
            )
        filesystem(remote)
        self.remote = remote.rstrip("/")

    # ---- finding ----------------------------------------------------------------------------

    def find(self, name: str) -> Path | None:
        """The complete local checkpoint ``name``, or the one a killed replacement left moved aside; else None."""
        for p in (self.directory / name, self.directory / f"{_OLD_PREFIX}{name}"):
            if (p / ".metadata").is_file():
                return p
        return None

    def steps(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the complete local ``step_N`` checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        names = {p.name.removeprefix(_OLD_PREFIX) for p in self.directory.iterdir()}
        found = []
        for name in names:
            m = _STEP_DIR.match(name)
            path = self.find(name) if m else None
            if path is not None:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def remote_steps(self) -> list[tuple[int, str]]:
        """``(step, URL)`` of the complete remote ``step_N`` checkpoints, oldest first."""
        if self.remote is None:
            return []
        fs, root = filesystem(self.remote)
        found = []
        for name in _remote_names(fs, root):
            m = _STEP_DIR.match(name)
            if m and fs.exists(f"{root}/{name}/{COMPLETE_MARKER}"):
                found.append((int(m.group(1)), f"{self.remote}/{name}"))
        return sorted(found)

    def latest(self) -> Path | str | None:
        """The newest complete checkpoint (``final`` if present): local first, then remote (a URL), or None."""
        final = self.find("final")
        if final is not None:
            return final
        steps = self.steps()
        if steps:
            return steps[-1][1]
        if self.remote is not None:
            if is_complete(f"{self.remote}/final"):
                return f"{self.remote}/final"
            remote = self.remote_steps()
            if remote:
                return remote[-1][1]
        return None

    # ---- saving -----------------------------------------------------------------------------

    def save(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        trainer_state: dict[str, Any],
        *,
        extra_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint ``name`` (``step_N`` or ``final``), then upload it when mirroring; every rank calls this.

        ``extra_files``: called on rank 0 with the staging directory once every rank has written its part,
        to add files of its own (e.g. the tokenizer) before the checkpoint is put in place: they appear with
        it, atomically, and are uploaded with it. An error there aborts the save on every rank.
        """
        target = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"

        upload_error: list[BaseException | None] = [None]

        def prepare() -> None:
            upload_error[0] = self._join()  # the previous upload reads a directory that pruning may remove
            self.directory.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
            tmp.mkdir()

        on_rank0(prepare, "checkpoint save")
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{_rank()}.pt")
        _barrier()  # every rank's files are on disk before rank 0 renames

        def finish() -> None:
            if extra_files is not None:
                extra_files(tmp)
            if target.exists():  # replacing: move the old one aside first, then drop it
                old = self.directory / f"{_OLD_PREFIX}{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            self._prune()
            if upload_error[0] is not None:  # raised only now that this checkpoint is safe on the local disk
                raise self._upload_failure(upload_error[0])
            if self.remote is not None:
                self._start_upload(target, name)

        on_rank0(finish, f"checkpoint save of {name}")
        if name == "final" and _rank() == 0:
            # the end of the run: nothing left to overlap with, and the caller expects the mirror to be there;
            # the other ranks are not held in a collective meanwhile
            self.wait()
        return target

    # ---- uploading --------------------------------------------------------------------------

    def _start_upload(self, target: Path, name: str) -> None:
        """Upload in a thread on rank 0, so that training goes on (and no other rank waits in a collective,
        where a long upload would run into the process group's timeout)."""

        def work() -> None:
            try:
                self._upload(target, name)
                self._prune_remote()
            except BaseException as e:  # raised by wait(), on the next save or at the end
                self._upload_error = e

        self._upload_thread = threading.Thread(target=work, name=f"wf-upload-{name}", daemon=False)
        self._upload_thread.start()

    def _join(self) -> BaseException | None:
        if self._upload_thread is not None:
            self._upload_thread.join()
            self._upload_thread = None
        error, self._upload_error = self._upload_error, None
        return error

    def _upload_failure(self, error: BaseException) -> RuntimeError:
        failure = RuntimeError(
            f"checkpoint upload to {self.remote} failed: {type(error).__name__}: {error} "
            f"(the local checkpoints in {self.directory} are complete)"
        )
        failure.__cause__ = error
        return failure

    def wait(self) -> None:
        """Block until the running upload (rank 0) has finished; raise its error, if any.

        A failed ``step_N`` upload is otherwise raised by the next save, once that save's local
        checkpoint is complete; a failed ``final`` upload by the ``final`` save itself.
        """
        error = self._join()
        if error is not None:
            raise self._upload_failure(error)

    def _clean_leftovers(self) -> None:
        """Remove what a run killed while saving left behind (rank 0, before a save)."""
        for p in self.directory.iterdir():
            if p.name.startswith(_OLD_PREFIX):
                name = p.name[len(_OLD_PREFIX) :]
                if not (self.directory / name / ".metadata").is_file() and (p / ".metadata").is_file():
                    # killed between the two renames of a replacement: the moved-aside one is the checkpoint
                    shutil.rmtree(self.directory / name, ignore_errors=True)
                    os.replace(p, self.directory / name)
                else:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for _, path in self.steps()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _upload(self, local: Path, name: str) -> None:
        """Copy the finished local checkpoint to ``{remote}/{name}``, marker last."""
        fs, root = filesystem(self.remote)
        dest = f"{root}/{name}"
        _remote_remove(fs, dest)  # the marker goes first, so a half-replaced checkpoint is never complete
        files = sorted(p for p in local.rglob("*") if p.is_file())
        rel = [p.relative_to(local).as_posix() for p in files]
        for d in sorted({posixpath.dirname(f"{dest}/{r}") for r in rel}):
            fs.makedirs(d, exist_ok=True)
        # lists on both sides: one call, which async implementations (gcsfs, s3fs) run concurrently
        fs.put([str(p) for p in files], [f"{dest}/{r}" for r in rel])
        manifest = {
            "name": name,
            "files": {r: p.stat().st_size for r, p in zip(rel, files, strict=True)},
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with fs.open(f"{dest}/{COMPLETE_MARKER}", "w") as f:
            json.dump(manifest, f)

    def _prune_remote(self) -> None:
        """Keep the newest ``keep`` complete remote ``step_N``; remove older ones and unfinished uploads."""
        fs, root = filesystem(self.remote)
        complete, unfinished = [], []
        for name in _remote_names(fs, root):
            m = _STEP_DIR.match(name)
            if m:
                done = fs.exists(f"{root}/{name}/{COMPLETE_MARKER}")
                (complete if done else unfinished).append((int(m.group(1)), name))
        stale = sorted(complete)[: -self.keep] if self.keep > 0 else []
        for _, name in stale + unfinished:
            _remote_remove(fs, f"{root}/{name}")

    # ---- loading ----------------------------------------------------------------------------

    @staticmethod
    def load(
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load a checkpoint into ``model`` (and ``optimizer`` when given); returns the trainer state.

        ``path``: local, fsspec URL or ``hf://``. Works across layouts: a checkpoint saved by N ranks
        loads into M ranks (DCP reshards).
        """
        where = resolve(path)
        _require_complete(where, path)
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.load(state, storage_reader=_reader(where))
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        trainer_state, own = _read_trainer_state(where)
        if restore_rng and own:
            set_rng_state(trainer_state["rng"])
        return trainer_state


def _remote_names(fs, root: str) -> list[str]:
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return [posixpath.basename(str(e).rstrip("/")) for e in entries]


def _remote_remove(fs, path: str) -> None:
    marker = f"{path}/{COMPLETE_MARKER}"
    if fs.exists(marker):
        fs.rm(marker)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def one_line(e: BaseException, limit: int = 200) -> str:
    """The message of ``e`` on one line, cut at ``limit`` characters (for errors that quote another error)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_pickled(path: Path | str, name: str) -> dict[str, Any]:
    """``torch.load`` of the trainer state ``name`` in the checkpoint directory ``path`` (local or fsspec URL);
    a missing or unreadable file is one error saying the checkpoint is incomplete or corrupt."""
    try:
        if is_url(path):
            fs, p = filesystem(str(path))
            with fs.open(f"{p}/{name}", "rb") as f:
                state = torch.load(io.BytesIO(f.read()), weights_only=False)
        else:
            state = torch.load(Path(path) / name, weights_only=False)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} is incomplete or corrupt: {name} is missing") from e
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # torch.load's, for a bad file
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {name} does not read ({one_line(e)})") from e
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {name} holds a {kind}, not a dict")
    return state


def _read_trainer_state(path: Path | str) -> tuple[dict[str, Any], bool]:
    """This rank's ``trainer_rank{R}.pt`` (else rank 0's, for a checkpoint saved by fewer ranks); and whether it
    was this rank's own."""
    name = f"trainer_rank{_rank()}.pt"
    if is_url(path):
        fs, p = filesystem(str(path))
        own = fs.exists(f"{p}/{name}")
    else:
        own = (Path(path) / name).is_file()
    return _load_pickled(path, name if own else "trainer_rank0.pt"), own


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """Rank 0's trainer state (``trainer_rank0.pt``) of a complete checkpoint: local, fsspec URL or ``hf://``.

    For tools that read a checkpoint outside a run (the exporter): no process group is needed. The file is
    unpickled (it holds RNG states and schedule dicts, not only tensors): read only checkpoints you trust.
    """
    where = resolve(path)
    _require_complete(where, path)
    return _load_pickled(where, "trainer_rank0.pt")


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(path: str | os.PathLike, model: nn.Module, *, allow_missing: Sequence[str] = ()) -> int:
    """Load only the model weights of a checkpoint into ``model`` (no optimizer, schedule, data or RNG state).

    The checkpoint's keys and shapes are checked against the model's first; dtypes are converted to
    the model's. Works on a plain, DDP-wrapped or FSDP2-sharded model (each rank reads what it holds).

    Args:
        path: local checkpoint directory, fsspec URL (needs the completion marker) or ``hf://`` spec.
        model: the module to fill, in place (the optimizer's references stay valid).
        allow_missing: ``fnmatch`` patterns of model keys the checkpoint may lack (kept as built),
            e.g. ``"*.lrc_u"`` for parameters the stage adds.

    Returns:
        The number of tensors loaded.

    Raises:
        FileNotFoundError: no (complete) checkpoint at ``path``.
        IncompatibleCheckpointError: missing, unexpected or differently shaped keys, named with the path.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = resolve(path)
    _require_complete(where, path)
    saved_meta = _reader(where).read_metadata().state_dict_metadata
    saved = {k[len("model.") :]: v for k, v in saved_meta.items() if k.startswith("model.")}
    state = get_model_state_dict(model)
    if not saved:
        raise IncompatibleCheckpointError(f"checkpoint {path}: holds no model weights (no 'model.*' keys)")
    missing = [k for k in state if k not in saved and not any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    unexpected = [k for k in saved if k not in state]
    shapes = []
    for k, v in state.items():
        meta = saved.get(k)
        if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(v.shape):
            shapes.append(f"{k} (checkpoint {list(meta.size)}, model {list(v.shape)})")
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_listing(unexpected)}")
        if shapes:
            problems.append(f"different shapes: {_listing(shapes)}")
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not fit the model ({type(model).__name__}): " + "; ".join(problems) + ". "
            "Build the model with the config the checkpoint was saved with (model=..., model.convert...), "
            "or start from the model config (training.init_from=none)."
        )
    wanted = {k: v for k, v in state.items() if k in saved}
    with _single_process_quiet():
        dcp.load({"model": wanted}, storage_reader=_reader(where))
    set_model_state_dict(model, wanted, options=StateDictOptions(strict=len(wanted) == len(state)))
    return len(wanted)


# ---- the model a checkpoint holds -------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike) -> Path | str | None:
    """The trainer checkpoint ``path`` names: itself when complete (local, fsspec URL or ``hf://``); for a
    local stage directory (``{stage}_checkpoint``, or the ``checkpoints/`` folder in it, see :func:`stage_dir`)
    its ``final`` or else newest ``step_N`` checkpoint. None when it names no trainer checkpoint."""
    text = str(path)
    if text.startswith("hf://"):
        where = resolve(text)
        return text if (Path(where) / ".metadata").is_file() else None
    if is_url(text):
        return text if is_complete(text) else None
    local = Path(path)
    if is_complete(local):
        return local
    if local.is_dir() and not (local / "config.json").is_file():
        found = CheckpointManager(local).latest()
        if found is None and (local / "checkpoints").is_dir():  # {stage}_checkpoint: its checkpoints/ folder
            found = CheckpointManager(local / "checkpoints").latest()
        return found
    return None


def rebuild_model(
    path: str | os.PathLike,
    *,
    schedule: Any = None,
    dtype: torch.dtype | None = None,
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any, Any]:
    """The model of a trainer checkpoint, rebuilt from the config it records, with its weights and tokenizer.

    Args:
        path: a complete trainer checkpoint (local, fsspec URL or ``hf://``).
        schedule: the quantization schedule of a converted model (None: fully quantized).
        dtype: the parameter dtype (None: the recorded ``model.dtype``).
        state: its trainer state, when the caller has read it already (:func:`read_trainer_state`).
    Returns:
        ``(model, tokenizer, config)`` on the CPU, the config being the run's resolved one (a DictConfig).
    Raises:
        ValueError: a checkpoint that records no config (an older trainer's).
        FileNotFoundError: no complete checkpoint, or no tokenizer in it.
    """
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from wrinklefree.train.trainer import build_model

    state = read_trainer_state(path) if state is None else state
    recorded = state.get("config")
    if recorded is None:
        raise ValueError(f"checkpoint {path} does not record its config (trainer_rank0.pt has no 'config')")
    where = resolve(path)
    tok_dir = Path(where) / TOKENIZER_DIR if not is_url(where) else None
    if tok_dir is None or not tok_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {path} has no {TOKENIZER_DIR}/ folder (copy URLs to a local disk first)")
    cfg = OmegaConf.create(recorded)
    if dtype is not None:
        cfg.model.dtype = str(dtype).removeprefix("torch.")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = build_model(cfg, tokenizer, schedule, pretrained_weights=False)
    load_weights(where, model)
    return model, tokenizer, cfg
