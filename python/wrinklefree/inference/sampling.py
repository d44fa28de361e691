"""Choosing the next token from a logits vector: greedy, or seeded sampling with top-k, top-p and temperature,
after a repetition penalty.

The order follows llama.cpp's default sampler chain (penalties, top-k, top-p, temperature, draw), so a setting
means the same here as there: the nucleus of top-p is taken from the distribution at temperature 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    Attributes:
        temperature: >= 0; 0 picks the most likely token (greedy) and ignores top_k, top_p and seed. However
            small, a temperature > 0 is computed without overflow: the draws tend to the most likely token.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: in (0, 1]; keep the smallest set of most likely tokens whose probability reaches top_p (nucleus).
        repetition_penalty: > 0; 1 is off. Logits of tokens already seen are divided by it when positive and
            multiplied by it when negative (CTRL, as in llama.cpp), so values above 1 make repeats less likely.
        seed: seed of the random draws (reproducible output), in [0, 2**64); None draws a fresh seed.

    Raises:
        ValueError: a value of the wrong type or out of range (the message names the parameter).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_real(self.temperature) or not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_real(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_int(value: object) -> bool:
    """Whether ``value`` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: an int, a float or the like (a bool is not)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def apply_repetition_penalty(logits: Tensor, previous: Sequence[int], penalty: float) -> Tensor:
    """``logits`` with the entries of the distinct ``previous`` tokens penalised (a new tensor when changed).

    Args:
        logits: float32 [n_vocab].
        previous: token ids already in the context; each is penalised once however often it occurs.
        penalty: > 0; positive logits are divided by it, negative ones multiplied.
    """
    if penalty == 1.0 or not previous:
        return logits
    ids = torch.tensor(sorted(set(previous)), dtype=torch.long)
    seen = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


class Sampler:
    """Draws tokens according to :class:`SamplingParams`, from its own ``torch.Generator`` so that a seed gives
    the same tokens whatever else uses torch's global random state."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def __call__(self, logits: Tensor, previous: Sequence[int] = ()) -> int:
        """The next token id.

        Args:
            logits: float32 [n_vocab], the model's scores for the next token; not modified.
            previous: ids of the tokens the repetition penalty applies to.
        """
        p = self.params
        logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        n = logits.numel()
        if 0 < p.top_k < n:
            values, ids = torch.topk(logits, p.top_k)  # sorted, most likely first
        else:
            values, ids = torch.sort(logits, descending=True)
        if p.top_p < 1.0:
            probs = torch.softmax(values, dim=0)
            # Keep a token while the mass before it is still short of top_p: the smallest prefix reaching top_p.
            keep = int(((torch.cumsum(probs, dim=0) - probs) < p.top_p).sum())
            values, ids = values[:keep], ids[:keep]
        # Shifted so that the most likely token scores 0 (values is sorted), in float64: however small the
        # temperature, nothing overflows; the others' scores may go to -inf, leaving the draw to the best.
        probs = torch.softmax((values.double() - values[0].double()) / p.temperature, dim=0)
        return int(ids[torch.multinomial(probs, 1, generator=self._generator)])
