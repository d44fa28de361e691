"""Trainer checkpoints as export sources: rebuild the trained model from what the checkpoint records.

A checkpoint written by ``python -m wrinklefree.train`` (DESIGN.md section 5) is a
torch.distributed.checkpoint directory (``.metadata``, ``*.distcp``) with ``trainer_rank0.pt``, which
holds the resolved config, and ``tokenizer/``, the run's tokenizer. From these
:func:`load_training_checkpoint` rebuilds the model on the CPU (no process group), loads its weights
and turns it into the transformers `bitnet` model that :func:`~wrinklefree.export.export_gguf` takes
(the same conversion as ``save_bitnet`` + ``load_bitnet``, in memory).

    model, tokenizer = load_training_checkpoint("outputs/checkpoints/run/unified_checkpoint/checkpoints/final")
    export_gguf(model, "model.gguf", "tq2_0", tokenizer=tokenizer)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from wrinklefree.models.hf_bitnet import bitnet_config, bitnet_state_dict, load_bitnet
from wrinklefree.nn import QuantSchedule
from wrinklefree.train.checkpoint import (
    TOKENIZER_DIR,
    is_url,
    read_trainer_state,
    rebuild_model,
    resolve,
)

_RESAVE_HINT = (
    "it was saved by an older trainer; re-save it with the current one: python -m wrinklefree.train "
    "<the run's options> training.resume.checkpoint_path={path} training.max_steps=<its step> "
    "(no steps run; the final checkpoint is written again, with its config and tokenizer)"
)


def load_training_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Rebuild the fully quantized model of a trainer checkpoint, as a transformers `bitnet` model.

    Args:
        path: a checkpoint directory (``.../checkpoints/{step_N|final}``, or ``hf://owner/repo/subdir``).
    Returns:
        ``(model, tokenizer)``: a BitNetForCausalLM with our (packed) BitLinear layers in eval mode on the
        CPU, as :func:`~wrinklefree.models.hf_bitnet.load_bitnet` returns, and the run's tokenizer; both go
        to :func:`~wrinklefree.export.export_gguf`.
    Raises:
        FileNotFoundError: not a (complete) checkpoint, or one without its tokenizer.
        ValueError: a checkpoint without a recorded config (an older trainer's), a float model
            (``training.convert=false``), or one saved before the quantization warm-up finished (its
            weights were trained partly in full precision: the ternary model is not what was trained);
            and what transformers' BitNet cannot hold (``save_bitnet``'s refusals: LRC, Q-Sparse, SubLN
            other than before o_proj and down_proj, q/k norms).
    """
    from omegaconf import OmegaConf  # the trainer's dependencies: [train] only

    where = resolve(path)
    if is_url(where):
        raise ValueError(f"checkpoint {path}: the exporter reads local (or hf://) checkpoints; copy it to a local disk")
    state = read_trainer_state(where)
    recorded = state.get("config")
    if recorded is None:
        raise ValueError(
            f"checkpoint {path} does not record its config (trainer_rank0.pt has no 'config'): "
            + _RESAVE_HINT.format(path=path)
        )
    tok_dir = Path(where) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {path} has no {TOKENIZER_DIR}/ folder: " + _RESAVE_HINT.format(path=path))
    cfg = OmegaConf.create(recorded)
    if not cfg.training.convert:
        raise ValueError(
            f"checkpoint {path} holds a full-precision model (trained with training.convert=false): nothing "
            "ternary to export; convert and train it first (e.g. training=stage2_pretrain)"
        )
    _check_warmup_finished(path, state.get("quant_schedule"))

    model, tokenizer, _ = rebuild_model(where, state=state)  # schedule None: fully quantized
    model.eval()
    bitnet = load_bitnet(bitnet_state_dict(model), bitnet_config(model))
    return bitnet, tokenizer


def _check_warmup_finished(path: str | os.PathLike, recorded: dict[str, Any] | None) -> None:
    """Refuse a checkpoint whose quantization warm-up factor was below 1 when it was saved."""
    if recorded is None:
        raise ValueError(f"checkpoint {path} records no quantization schedule: " + _RESAVE_HINT.format(path=path))
    schedule = QuantSchedule()
    schedule.load_state_dict(recorded)
    lam = float(schedule.lam)
    if lam < 1.0:
        raise ValueError(
            f"checkpoint {path} was saved during the quantization warm-up (lam = {lam:.4g} < 1 at step "
            f"{schedule.current_step} of {schedule.warmup_steps}): its weights were trained partly in full "
            "precision, so the exported ternary model would not be the model that was trained; export a "
            "checkpoint from after the warm-up"
        )
