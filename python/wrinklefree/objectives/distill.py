"""Distillation from a frozen full-precision teacher (DESIGN.md section 5): the BitDistill losses.

Three losses, each a plain function of tensors, and :class:`Distillation`, the objective that computes
them (and CE) from one student forward pass and one teacher forward pass:

- ``logits_kd``: ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``, summed over the vocabulary and
  averaged over the tokens (stage 3; tau = 5).
- ``attention_kd``: MiniLMv2-style relation distillation at one layer. Each of the Q, K and V projection
  outputs ``[B, S, H*d]`` is split into ``relation_heads`` heads, L2-normalised, and turned into the
  relation ``R = softmax(A A^T)`` ``[B, heads, S, S]``; the loss is ``KL(R_T || R_S)`` per row,
  averaged over the three states, the heads and the rows (stage 3).
- ``hidden``: hidden-state distillation at every decoder layer's output (stage 1.9, LRC calibration):
  ``mse``, ``nmse`` (``||h_S - h_T||^2 / ||h_T||^2`` per token) or ``cosine`` (``1 - cos``), averaged over
  tokens and layers.

Tokens can be left out with a mask ``[B, S]`` (True: counted); a left-out token is neither a row nor a
column of the relation matrices.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wrinklefree.objectives.lm import logits_of, next_token_ce

HIDDEN_LOSSES = ("mse", "nmse", "cosine")
_PROJECTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkv])_proj$")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, S] over the positions ``mask`` keeps (all when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _paired(where: str, student: Sequence[Tensor], teacher: Sequence[Tensor], what: str, need: str):
    """``zip(student, teacher)``, after checking that both hold the same number (at least one) of ``what``."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"{where}: the student has {len(student)} {what} and the teacher {len(teacher)}; {need} (at least one)"
        )
    return zip(student, teacher, strict=True)


def logits_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 5.0, mask: Tensor | None = None
) -> Tensor:
    """``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))`` per token, averaged over the tokens ``mask`` keeps.

    Args:
        student_logits, teacher_logits: ``[B, S, V]`` (or any ``[..., V]``); the vocabularies must agree
            (the caller slices a padded one). Computed in float32.
        temperature: tau > 0; the tau^2 factor keeps the gradient's scale independent of it.
        mask: ``[B, S]`` bool, True for the tokens counted; None counts every token.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits_kd_loss: student_logits {list(student_logits.shape)} and teacher_logits "
            f"{list(teacher_logits.shape)} must have the same shape"
        )
    if not temperature > 0:
        raise ValueError(f"logits_kd_loss: temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return temperature**2 * _masked_mean(kl, mask)


def relation_log_probs(states: Tensor, relation_heads: int, mask: Tensor | None = None) -> Tensor:
    """``log softmax(A A^T)`` of ``states`` ``[B, S, D]`` split into ``relation_heads`` L2-normalised heads.

    Returns:
        ``[B, relation_heads, S, S]`` float32 log-probabilities over the last dimension; columns of
        tokens ``mask`` leaves out get probability 0.
    """
    b, s, d = states.shape
    if d % relation_heads:
        raise ValueError(
            f"attention relation: the state width {d} is not a multiple of relation_heads={relation_heads}"
        )
    a = F.normalize(states.float().view(b, s, relation_heads, d // relation_heads).transpose(1, 2), dim=-1)
    scores = a @ a.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    relation_heads: int = 32,
    mask: Tensor | None = None,
) -> Tensor:
    """``KL(R_T || R_S)`` of the relation matrices of each state pair (Q, K, V), averaged over the states,
    the relation heads and the rows (the tokens ``mask`` keeps).

    The student's and the teacher's widths may differ (each is split into the same number of heads);
    batch and sequence must agree.
    """
    rows = []
    pairs = _paired("attention_relation_loss", student_states, teacher_states, "states", "one per Q, K, V projection")
    for s_state, t_state in pairs:
        if s_state.shape[:2] != t_state.shape[:2]:
            raise ValueError(
                f"attention_relation_loss: student {list(s_state.shape)} and teacher {list(t_state.shape)} states "
                "differ in batch or sequence length"
            )
        log_r_s = relation_log_probs(s_state, relation_heads, mask)
        log_r_t = relation_log_probs(t_state, relation_heads, mask)
        p_t = log_r_t.exp()
        # 0 * log 0 is 0: masked columns have p_t = 0 and -inf logs on both sides
        kl = torch.where(p_t > 0, p_t * (log_r_t - log_r_s), torch.zeros_like(p_t)).sum(-1)  # [B, heads, S]
        rows.append(_masked_mean(kl.mean(1), mask))
    return torch.stack(rows).mean()


def hidden_state_loss(
    student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], kind: str = "cosine", mask: Tensor | None = None
) -> Tensor:
    """Distance between the student's and the teacher's hidden states ``[B, S, D]``, averaged over layers.

    Args:
        kind: ``mse`` (mean squared error over tokens and features), ``nmse`` (``||h_S - h_T||^2 / ||h_T||^2``
            per token, so that every layer and token weighs the same whatever its scale), or ``cosine``
            (``1 - cos(h_S, h_T)`` per token).
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_state_loss: kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
    layers = []
    need = "layer-wise distillation needs the same number of layers"
    for h_s, h_t in _paired("hidden_state_loss", student_hidden, teacher_hidden, "hidden states", need):
        if h_s.shape != h_t.shape:
            raise ValueError(
                f"hidden_state_loss: student {list(h_s.shape)} and teacher {list(h_t.shape)} hidden states differ"
            )
        h_s, h_t = h_s.float(), h_t.float()
        if kind == "mse":
            per_token = (h_s - h_t).pow(2).mean(-1)
        elif kind == "nmse":
            per_token = (h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-12)
        else:
            per_token = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
        layers.append(_masked_mean(per_token, mask))
    return torch.stack(layers).mean()


# ---- capturing Q, K and V ------------------------------------------------------------------------


def attention_projections(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The q_proj, k_proj and v_proj modules of decoder layer ``layer`` (negative: from the end) of a
    Llama-family model (any module named ``...layers.N.self_attn.{q,k,v}_proj``)."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        m = _PROJECTION.search(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = module
    if not found:
        raise ValueError(
            f"attention relation: {type(model).__name__} has no modules named layers.N.self_attn.{{q,k,v}}_proj"
        )
    n = max(found) + 1
    if not -n <= layer < n:
        raise ValueError(f"attention relation: layer={layer} is out of range for a model of {n} layers")
    projections = found.get(layer % n, {})
    if set(projections) != {"q", "k", "v"}:
        raise ValueError(f"attention relation: layer {layer % n} lacks some of q_proj, k_proj, v_proj")
    return projections["q"], projections["k"], projections["v"]


class ProjectionCapture:
    """Forward hooks that keep the outputs of one layer's Q, K and V projections while :attr:`active`.

    Registered once on the unwrapped model: the hooks fire however the model is wrapped (DDP, FSDP2).
    """

    def __init__(self, model: nn.Module, layer: int) -> None:
        self.states: list[Tensor | None] = [None, None, None]
        self.active = False
        self._handles = [
            module.register_forward_hook(self._hook(i)) for i, module in enumerate(attention_projections(model, layer))
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args, output: Tensor) -> None:
            if self.active:
                self.states[index] = output

        return hook

    def take(self) -> list[Tensor]:
        """The three captured states, cleared from the capture."""
        states, self.states = self.states, [None, None, None]
        if any(s is None for s in states):
            raise RuntimeError("attention relation: the forward pass did not run the chosen layer's Q, K and V")
        return states  # type: ignore[return-value]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- the objective -------------------------------------------------------------------------------


@dataclass
class _Outputs:
    logits: Tensor
    hidden: Sequence[Tensor] | None
    qkv: list[Tensor] | None


def _run(model: nn.Module, ids: Tensor, capture: ProjectionCapture | None, hidden: bool) -> _Outputs:
    if capture is not None:
        capture.active = True
    try:
        out = model(input_ids=ids, output_hidden_states=hidden) if hidden else model(input_ids=ids)
    finally:
        if capture is not None:
            capture.active = False
    logits = logits_of(out)
    # hidden_states: the embeddings' output, then each decoder layer's: the layers' outputs are distilled
    states = out.hidden_states[1:] if hidden else None
    return _Outputs(logits, states, capture.take() if capture is not None else None)


class Distillation(nn.Module):
    """CE and the distillation losses against a frozen teacher, from one forward pass of each model.

    An objective of several losses for :class:`~wrinklefree.objectives.ObjectiveManager`: ``losses`` names
    them, and ``forward(model, batch, active)`` returns the unweighted ones asked for. The teacher is put in
    eval mode with ``requires_grad`` off and runs under ``torch.no_grad``: it never receives a gradient.

    Args:
        teacher: the full-precision model, with the student's tokenizer (its vocabulary may be a padded
            prefix of the student's or the other way round: the logits are compared over the shared ids).
        student: the unwrapped student (its Q/K/V projections are hooked for ``attention_kd``).
        temperature: tau of ``logits_kd``.
        relation_layer: the decoder layer of ``attention_kd`` (negative: from the end), in each model; None
            leaves ``attention_kd`` out (no hooks are registered).
        relation_heads: the relation heads Q, K and V are split into.
        hidden_loss: ``hidden``'s distance (:data:`HIDDEN_LOSSES`).
        ignore_index: label id CE skips.
    """

    losses = ("ce", "logits_kd", "attention_kd", "hidden")

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float = 5.0,
        relation_layer: int | None = -1,
        relation_heads: int = 32,
        hidden_loss: str = "cosine",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"Distillation: temperature must be > 0, got {temperature}")
        if relation_heads < 1:
            raise ValueError(f"Distillation: relation_heads must be >= 1, got {relation_heads}")
        if hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"Distillation: hidden_loss must be one of {HIDDEN_LOSSES}, got {hidden_loss!r}")
        teacher.eval().requires_grad_(False)
        # kept out of the module tree: the teacher is not part of what is trained, saved or moved
        self.__dict__["teacher"] = teacher
        self.temperature = float(temperature)
        self.relation_layer = relation_layer
        self.relation_heads = int(relation_heads)
        self.hidden_loss = hidden_loss
        self.ignore_index = ignore_index
        self._student_capture = self._teacher_capture = None
        if relation_layer is not None:
            self._student_capture = ProjectionCapture(student, relation_layer)
            self._teacher_capture = ProjectionCapture(teacher, relation_layer)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], active: Collection[str]) -> dict[str, Tensor]:
        unknown = set(active) - set(self.losses)
        if unknown:
            raise ValueError(f"Distillation: unknown losses {sorted(unknown)}; available: {', '.join(self.losses)}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        want_qkv, want_hidden = "attention_kd" in active, "hidden" in active
        if want_qkv and self._student_capture is None:
            raise ValueError("Distillation: attention_kd needs a relation_layer (it was built with None)")
        student = _run(model, ids, self._student_capture if want_qkv else None, want_hidden)
        needs_teacher = want_qkv or want_hidden or "logits_kd" in active
        teacher = None
        if needs_teacher:  # in eval mode since __init__: the trainer's model.train() does not reach it
            with torch.no_grad():
                teacher = _run(self.teacher, ids, self._teacher_capture if want_qkv else None, want_hidden)

        parts: dict[str, Tensor] = {}
        if "ce" in active:
            parts["ce"] = next_token_ce(student.logits, ids, mask=mask, ignore_index=self.ignore_index)
        if "logits_kd" in active:
            v = min(student.logits.shape[-1], teacher.logits.shape[-1])
            parts["logits_kd"] = logits_kd_loss(
                student.logits[..., :v], teacher.logits[..., :v], self.temperature, mask
            )
        if want_qkv:
            parts["attention_kd"] = attention_relation_loss(student.qkv, teacher.qkv, self.relation_heads, mask)
        if want_hidden:
            parts["hidden"] = hidden_state_loss(student.hidden, teacher.hidden, self.hidden_loss, mask)
        return parts

    def extra_repr(self) -> str:
        return (
            f"teacher={type(self.teacher).__name__}, temperature={self.temperature}, relation_layer="
            f"{self.relation_layer}, relation_heads={self.relation_heads}, hidden_loss={self.hidden_loss}"
        )
