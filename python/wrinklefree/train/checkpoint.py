"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically (DESIGN.md section 5).

Layout: ``{output_dir}/checkpoints/{experiment}/{stage}_checkpoint/checkpoints/{step_N|final}/``
holding the DCP shards of the model and optimizer (``.distcp`` files + ``.metadata``) and
``trainer_rank{R}.pt`` with everything else (step, schedules, data position, RNG states).

A save goes to a temporary directory beside the target, which rank 0 renames into place once
every rank has written its part: a run killed during a save leaves the previous checkpoint as
it was, and an unfinished one is never mistaken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

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


def stage_dir(output_dir: str | os.PathLike, experiment: str, stage: str) -> Path:
    """Where a stage's checkpoints live (DESIGN.md section 5)."""
    return Path(output_dir) / "checkpoints" / experiment / f"{stage}_checkpoint" / "checkpoints"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


class CheckpointManager:
    """Saves and finds the checkpoints of one stage of one experiment.

    Args:
        directory: the stage's checkpoint directory (:func:`stage_dir`).
        keep: how many ``step_N`` checkpoints to keep (oldest removed after a save; ``final``
            is never removed). 0 keeps all.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    # ---- finding ----------------------------------------------------------------------------

    def steps(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the complete ``step_N`` checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / ".metadata").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (``final`` if present), or None."""
        final = self.directory / "final"
        if (final / ".metadata").is_file():
            return final
        steps = self.steps()
        return steps[-1][1] if steps else None

    # ---- saving -----------------------------------------------------------------------------

    def save(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``name`` (``step_N`` or ``final``); every rank must call this."""
        target = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir()
        _barrier()
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            if target.exists():  # replacing: move the old one aside first, then drop it
                old = self.directory / f"{_TMP_PREFIX}old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            self._prune()
        _barrier()
        return target

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for _, path in self.steps()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

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

        Works across layouts: a checkpoint saved by N ranks loads into M ranks (DCP reshards).
        """
        path = Path(path)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint: {path} is not a checkpoint directory (no .metadata)")
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        own = path / f"trainer_rank{_rank()}.pt"
        trainer_state = torch.load(own if own.is_file() else path / "trainer_rank0.pt", weights_only=False)
        if restore_rng and own.is_file():
            set_rng_state(trainer_state["rng"])
        return trainer_state
