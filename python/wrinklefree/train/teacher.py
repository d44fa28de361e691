"""The distillation teacher: a frozen model named by a path.

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

from pathlib import Path

import torch
from torch import nn

from wrinklefree.train.checkpoint import find_checkpoint, rebuild_model


def load_teacher(spec: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The frozen teacher ``spec`` names (see the module docstring), in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    checkpoint = find_checkpoint(spec)
    if checkpoint is not None:
        model, _, _ = rebuild_model(checkpoint, dtype=dtype)
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
