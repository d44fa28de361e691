"""Held-out perplexity: the same token sequences scored by a PyTorch model or by the CPU engine over a GGUF file.

    sequences = heldout_sequences(cfg.data, tokenizer, n=64)
    model_perplexity(model, sequences).ppl          # transformers / converted BitNet model
    engine_perplexity(Engine("model.gguf"), sequences).ppl

Each sequence predicts its tokens 1..S-1 from the ones before (the causal shift); the result is the mean
negative log-likelihood over all predicted tokens and ``exp`` of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wrinklefree.inference.sampling import is_int
from wrinklefree.objectives.lm import logits_of, next_token_ce


@dataclass(frozen=True)
class Perplexity:
    """``nll``: mean negative log-likelihood per predicted token (nats); ``tokens``: how many were predicted."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        try:
            return math.exp(self.nll)
        except OverflowError:  # past float64's range
            return math.inf


def heldout_sequences(data_cfg: Mapping[str, Any], tokenizer, n: int, *, seed: int = 0) -> list[Tensor]:
    """The first ``n`` held-out sequences (``data.eval_fraction`` of the documents, ``data.seq_len`` tokens each)
    of a ``data`` config, as ``[seq_len]`` int64 tensors: the documents the trainer's eval loss reads.

    Raises:
        ValueError: ``data.eval_fraction`` is 0 (nothing is held out) or ``n`` < 1.
    """
    from wrinklefree.data import build_loader, sources_from_config

    if not is_int(n) or n < 1:
        raise ValueError(f"heldout_sequences: n must be an integer >= 1, got {n!r}")
    fraction = float(data_cfg["eval_fraction"])
    if not 0 < fraction <= 0.5:
        reason = ", so no document is held out" if fraction == 0 else ""
        raise ValueError(f"heldout_sequences: data.eval_fraction must be in (0, 0.5], got {fraction}{reason}")
    loader = build_loader(
        sources_from_config(data_cfg["sources"]),
        tokenizer,
        seq_len=int(data_cfg["seq_len"]),
        batch_size=1,
        seed=seed,
        eval_fraction=fraction,
        split="eval",
    )
    out = []
    for batch in loader:
        out.append(batch["input_ids"][0].to(torch.int64))
        if len(out) == n:
            break
    if not out:
        raise ValueError("heldout_sequences: the held-out split is empty (too little data for data.eval_fraction)")
    return out


def _checked(what: str, sequences: Sequence[Tensor] | Tensor, n_ctx: int | None) -> list[Tensor]:
    """``sequences`` (a list of 1-D token tensors, or one [n, S] tensor) as a list, each of 2 to ``n_ctx`` tokens."""
    seqs = list(sequences.unbind(0)) if isinstance(sequences, Tensor) and sequences.dim() == 2 else list(sequences)
    if not seqs:
        raise ValueError(f"{what}: no sequences")
    for i, ids in enumerate(seqs):
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"{what}: sequence {i} must be a 1-D tensor of token ids, got {ids!r:.80}")
        if len(ids) < 2:
            raise ValueError(f"{what}: sequence {i} has {len(ids)} tokens; a perplexity needs at least 2")
        if n_ctx is not None and len(ids) > n_ctx:
            raise ValueError(f"{what}: a sequence of {len(ids)} tokens exceeds n_ctx={n_ctx}")
    return seqs


@torch.no_grad()
def model_perplexity(model: nn.Module, sequences: Sequence[Tensor] | Tensor, batch_size: int = 8) -> Perplexity:
    """Perplexity of a causal LM (``model(input_ids=...)`` returning logits or an output with ``.logits``), in
    eval mode (the model's mode is restored after). Sequences of one length batch together."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"model_perplexity: batch_size must be an integer >= 1, got {batch_size!r}")
    n_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqs = _checked("model_perplexity", sequences, n_ctx)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        by_length: dict[int, list[Tensor]] = {}
        for ids in seqs:
            by_length.setdefault(len(ids), []).append(ids)
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                ids = torch.stack(group[i : i + batch_size]).to(device)
                total += next_token_ce(logits_of(model(input_ids=ids)), ids, reduction="sum").item()
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return Perplexity(total / count, count)


def engine_perplexity(engine, sequences: Sequence[Tensor]) -> Perplexity:
    """Perplexity of a GGUF model run by :class:`wrinklefree.inference.Engine` (one sequence per KV cache)."""
    seqs = _checked("engine_perplexity", sequences, engine.n_ctx)
    total, count = 0.0, 0
    for ids in seqs:
        tokens = [int(t) for t in ids]
        engine.reset()
        logits = engine.logits(tokens, all_logits=True)[:-1]
        target = torch.tensor(tokens[1:], dtype=torch.int64)
        total += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(tokens) - 1
    engine.reset()
    return Perplexity(total / count, count)
