"""Language-modelling objectives on one batch of token ids (DESIGN.md section 5).

Both predict token i from the model's output at position i - 1 (the causal shift), so the same
model serves both and the diffusion objective needs no architectural change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def logits_of(output) -> Tensor:
    """The logits of a causal LM's output: a transformers output's ``.logits``, or the tensor itself."""
    return output.logits if hasattr(output, "logits") else output


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    return logits_of(model(input_ids=input_ids))


def next_token_ce(
    logits: Tensor,
    ids: Tensor,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of token i given the logits at position i - 1 (the causal shift), in float32.

    Args:
        logits: ``[B, S, V]``; ids: ``[B, S]``.
        mask: ``[B, S]`` bool, True for the tokens counted as targets; None counts every one.
        ignore_index: target id skipped (besides the tokens ``mask`` leaves out).
        reduction: ``mean`` over the counted targets, or ``sum``.
    """
    labels = ids[:, 1:]
    if mask is not None:
        labels = labels.masked_fill(~mask[:, 1:].bool(), ignore_index)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction=reduction
    )


class CrossEntropy(nn.Module):
    """Next-token cross-entropy, mean over the predicted positions (ignoring ``ignore_index``)."""

    name = "ce"

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        return next_token_ce(_logits(model, ids), ids, ignore_index=self.ignore_index)


class DiffusionLM(nn.Module):
    """Masked-diffusion loss (LLaDA-style) on the same batch as CE.

    Per sequence, ``t ~ U(eps, 1)`` (or the fixed ``mask_prob``); every token other than the
    ``never_mask`` ids (BOS/EOS/pad) is replaced by ``mask_token_id`` with probability ``t``; the
    model sees the masked sequence and the loss is the cross-entropy of the original tokens at the
    masked positions only, weighted by ``1 / t``, summed and divided by the number of predicted
    positions (an unbiased bound on the data likelihood). ``complementary`` also runs the
    complementary mask (every token is then masked exactly once) and averages the two.

    Args:
        mask_token_id: the id fed for masked tokens.
        never_mask: ids that are never masked.
        mask_prob: a fixed masking probability in (0, 1], or None for ``t ~ U(eps, 1)``.
        eps: the smallest t.
        complementary: add the complementary mask's loss (twice the compute).
    """

    name = "dlm"

    def __init__(
        self,
        mask_token_id: int,
        never_mask: Iterable[int] = (),
        mask_prob: float | None = None,
        eps: float = 1e-3,
        complementary: bool = False,
    ) -> None:
        super().__init__()
        if mask_prob is not None and not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"DiffusionLM: mask_prob must be in (0, 1] or None, got {mask_prob}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"DiffusionLM: eps must be in (0, 1), got {eps}")
        self.mask_token_id = int(mask_token_id)
        self.register_buffer("never_mask", torch.tensor(sorted({int(i) for i in never_mask}), dtype=torch.long))
        self.mask_prob = mask_prob
        self.eps = eps
        self.complementary = complementary

    def sample_mask(self, ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(mask bool [B, S], t float [B])`` for a batch of ids [B, S]."""
        b = ids.shape[0]
        if self.mask_prob is None:
            t = self.eps + (1 - self.eps) * torch.rand(b, generator=generator, device=ids.device)
        else:
            t = torch.full((b,), self.mask_prob, device=ids.device)
        mask = torch.rand(ids.shape, generator=generator, device=ids.device) < t[:, None]
        maskable = ~torch.isin(ids, self.never_mask.to(ids.device))
        return mask & maskable, t

    def _loss(self, model: nn.Module, ids: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        noisy = torch.where(mask, torch.full_like(ids, self.mask_token_id), ids)
        logits = _logits(model, noisy)[:, :-1]
        target, target_mask = ids[:, 1:], mask[:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none").view_as(target)
        weighted = ce * target_mask / t[:, None]
        return weighted.sum() / target.numel()

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        mask, t = self.sample_mask(ids)
        loss = self._loss(model, ids, mask, t)
        if self.complementary:
            maskable = ~torch.isin(ids, self.never_mask.to(ids.device))
            loss = 0.5 * (loss + self._loss(model, ids, ~mask & maskable, 1 - t + self.eps))
        return loss
