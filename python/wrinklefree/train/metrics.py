"""Run names, the metrics file and the optional W&B logger.

Every run writes ``metrics.jsonl`` in its run directory (one JSON object per logged step, with at
least step, loss, lr, tokens_per_s and step_time), whatever else logs. W&B logs in the mode
``WANDB_MODE`` names when it is set (``disabled``: not at all), else online when ``WANDB_API_KEY`` is set
and offline otherwise; a missing package or network never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def run_name(model: str, stage: str, optimizer: str, lr: float, global_batch: int, config: dict) -> str:
    """``model-stage-optimizer-lr-batch-hash``; the hash covers the whole resolved config."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{model}-{stage}-{optimizer}-lr{lr:g}-b{global_batch}-{digest}"


class MetricsLogger:
    """Writes metrics to ``{run_dir}/metrics.jsonl`` and to W&B when enabled. Only rank 0 should hold one.

    ``append``: continue the file (a resumed run); False starts it anew (a fresh run)."""

    def __init__(self, run_dir: Path, *, wandb_cfg: dict | None = None, run_config: dict | None = None,
                 name: str = "run", append: bool = True) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w", buffering=1)
        self.wandb = None
        self.wandb_mode = "disabled"
        if wandb_cfg and wandb_cfg.get("enabled", False):
            self.wandb = self._start_wandb(wandb_cfg, run_config or {}, name)

    def _start_wandb(self, cfg: dict, run_config: dict, name: str):
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "disabled":  # asked for explicitly: no W&B at all, not even an offline run directory
            return None
        try:
            import wandb
        except ImportError:
            print(
                "[wrinklefree] W&B: the wandb package is not installed; logging to metrics.jsonl only", file=sys.stderr
            )
            return None
        try:
            run = wandb.init(
                project=cfg.get("project", "wrinklefree"),
                entity=cfg.get("entity"),
                name=name,
                config=run_config,
                dir=str(self.run_dir),
                mode=mode,
                resume="allow",
                id=name,
            )
        except Exception as e:  # a W&B outage must not stop training
            print(f"[wrinklefree] W&B could not start ({e}); logging to metrics.jsonl only", file=sys.stderr)
            return None
        self.wandb_mode = mode
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=step)
            except Exception as e:
                print(f"[wrinklefree] W&B log failed ({e}); continuing without it", file=sys.stderr)
                self.wandb = None

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
            self.wandb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v
