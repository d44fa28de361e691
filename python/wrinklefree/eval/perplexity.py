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

from wrinklefree.objectives.lm import logits_of, next_token_ce


@dataclass(frozen=True)
class Perplexity:
    """``nll``: mean negative log-likelihood per predicted token (nats); ``tokens``: how many were predicted."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def heldout_sequences(data_cfg: Mapping[str, Any], tokenizer, n: int, *, seed: int = 0) -> list[Tensor]:
    """The first ``n`` held-out sequences (``data.eval_fraction`` of the documents, ``data.seq_len`` tokens each)
    of a ``data`` config, as ``[seq_len]`` int64 tensors: the documents the trainer's eval loss reads.

    Raises:
        ValueError: ``data.eval_fraction`` is 0 (nothing is held out) or ``n`` < 1.
    """
    from wrinklefree.data import build_loader, sources_from_config

    if n < 1:
        raise ValueError(f"heldout_sequences: n must be >= 1, got {n}")
    fraction = float(data_cfg["eval_fraction"])
    if not fraction > 0:
        raise ValueError("heldout_sequences: data.eval_fraction is 0, so no document is held out")
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


@torch.no_grad()
def model_perplexity(model: nn.Module, sequences: Sequence[Tensor], batch_size: int = 8) -> Perplexity:
    """Perplexity of a causal LM (``model(input_ids=...)`` returning logits or an output with ``.logits``)."""
    if not sequences:
        raise ValueError("model_perplexity: no sequences")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids = torch.stack(list(sequences[i : i + batch_size])).to(device)
        total += next_token_ce(logits_of(model(input_ids=ids)), ids, reduction="sum").item()
        count += ids[:, 1:].numel()
    return Perplexity(total / count, count)


def engine_perplexity(engine, sequences: Sequence[Tensor]) -> Perplexity:
    """Perplexity of a GGUF model run by :class:`wrinklefree.inference.Engine` (one sequence per KV cache)."""
    if not sequences:
        raise ValueError("engine_perplexity: no sequences")
    total, count = 0.0, 0
    for ids in sequences:
        tokens = [int(t) for t in ids]
        if len(tokens) > engine.n_ctx:
            raise ValueError(f"engine_perplexity: a sequence of {len(tokens)} tokens exceeds n_ctx={engine.n_ctx}")
        engine.reset()
        logits = engine.logits(tokens, all_logits=True)[:-1]
        target = torch.tensor(tokens[1:], dtype=torch.int64)
        total += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(tokens) - 1
    engine.reset()
    return Perplexity(total / count, count)
