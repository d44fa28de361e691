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
from torch.distributed.checkpoint.api import CheckpointException

from wrinklefree.export.gguf_writer import load_tokenizer
from wrinklefree.models.hf_bitnet import bitnet_blocker, bitnet_config, bitnet_state_dict, load_bitnet
from wrinklefree.nn import QuantSchedule
from wrinklefree.train.checkpoint import (
    TOKENIZER_DIR,
    is_url,
    one_line,
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
        FileNotFoundError: not a checkpoint (no ``.metadata``), one without its tokenizer, or an
            incomplete one (``trainer_rank0.pt`` or a ``.distcp`` file holding model weights missing).
        ValueError: a corrupt checkpoint (``.metadata``, ``trainer_rank0.pt``, the tokenizer or a
            ``.distcp`` file that does not read, or a truncated ``.distcp`` file: checked before the model
            is built), a checkpoint without a recorded config (an older trainer's), a float model
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
    _check_weight_files(path, Path(where))
    load_tokenizer(tok_dir, f"checkpoint {path} is incomplete or corrupt:")

    try:
        model, tokenizer, _ = rebuild_model(where, state=state)  # schedule None: fully quantized
    except CheckpointException as e:  # torch.distributed.checkpoint's (a BaseException): a shard that does not read
        raise ValueError(
            f"checkpoint {path} is incomplete or corrupt: its weights do not read ({_first_failure(e)})"
        ) from e
    model.eval()
    blocker = bitnet_blocker(model)
    if blocker is not None:
        raise ValueError(f"checkpoint {path} cannot be exported to GGUF: {blocker}")
    bitnet = load_bitnet(bitnet_state_dict(model), bitnet_config(model))
    return bitnet, tokenizer


def _check_weight_files(path: str | os.PathLike, where: Path) -> None:
    """Every shard file the model weights are stored in (``.metadata`` lists them) is there and long enough."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(where).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata: an unpickling error of some kind
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: .metadata does not read ({one_line(e)})") from e
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return  # a layout this check does not know; loading reports what is wrong
    needed: dict[str, int] = {}  # file -> the bytes the model's tensors need
    for index, info in storage.items():
        if not index.fqn.startswith("model."):
            continue  # the optimizer's state: not read by the exporter
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = where / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete or corrupt: {name} is missing")
        have = file.stat().st_size
        if have < size:
            raise ValueError(
                f"checkpoint {path} is incomplete or corrupt: {name} is truncated ({have} bytes, the model's "
                f"weights need {size})"
            )


def _first_failure(e: BaseException) -> str:
    """The first rank's error of a torch.distributed.checkpoint CheckpointException, in one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) and inner else inner  # (exception, traceback)
        if isinstance(inner, BaseException):
            return f"{type(inner).__name__}: {one_line(inner)}"
    return one_line(e)


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
