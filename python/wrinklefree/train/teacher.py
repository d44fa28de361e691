"""Models named by a path: the distillation teacher, and the model a trainer checkpoint holds.

``training.teacher`` (null: ``model.pretrained``) names the frozen teacher of the distillation objectives
(``logits_kd``, ``attention_kd``, ``hidden``). It may be:

- a Hugging Face hub id or a local transformers directory (``config.json`` + weights), read with
  ``AutoModelForCausalLM.from_pretrained``;
- a checkpoint of ``python -m wrinklefree.train`` (a directory with ``.metadata``, a stage directory, an
  fsspec URL or ``hf://owner/name/subdir``), rebuilt from the config it records (e.g. the tiny teacher
  that ``training=fp_pretrain`` trains).

The teacher takes the student's dtype and device, is put in eval mode and has ``requires_grad`` off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wrinklefree.train.checkpoint import (
    TOKENIZER_DIR,
    CheckpointManager,
    is_complete,
    is_url,
    load_weights,
    read_trainer_state,
    resolve,
)


def trainer_checkpoint(path: str | os.PathLike) -> Path | str | None:
    """The trainer checkpoint ``path`` names: itself when complete (local, fsspec URL or ``hf://``), the
    ``final`` or newest ``step_N`` one of a local stage directory; None when it names no trainer checkpoint."""
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
        return CheckpointManager(local).latest()
    return None


def rebuild(
    path: str | os.PathLike, *, schedule: Any = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any, Any]:
    """The model of a trainer checkpoint, rebuilt from the config it records, with its weights and tokenizer.

    Args:
        path: a complete trainer checkpoint (local, fsspec URL or ``hf://``).
        schedule: the quantization schedule of a converted model (None: fully quantized).
        dtype: the parameter dtype (None: the recorded ``model.dtype``).
    Returns:
        ``(model, tokenizer, config)`` on the CPU, the config being the run's resolved one (a DictConfig).
    Raises:
        ValueError: a checkpoint that records no config (an older trainer's).
        FileNotFoundError: no complete checkpoint, or no tokenizer in it.
    """
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from wrinklefree.train.trainer import build_model

    state = read_trainer_state(path)
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


def load_teacher(spec: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The frozen teacher ``spec`` names (see the module docstring), in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    checkpoint = trainer_checkpoint(spec)
    if checkpoint is not None:
        model, _, _ = rebuild(checkpoint, dtype=dtype)
    elif Path(spec).exists() and not (Path(spec) / "config.json").is_file():
        raise FileNotFoundError(
            f"training.teacher={spec}: neither a transformers model directory (config.json) nor a trainer "
            "checkpoint (.metadata, or a stage directory holding final/ or step_N/)"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model
