"""MuonClip: Muon on the hidden matrices, AdamW on the rest, and QK-clip (DESIGN.md section 5).

- :func:`newton_schulz` orthogonalizes a matrix with the 5-step quintic Newton-Schulz iteration
  (coefficients 3.4445, -4.7750, 2.0315; Jordan et al., https://kellerjordan.github.io/posts/muon/).
- :class:`MuonAdamW` is one ``torch.optim.Optimizer``: param groups flagged ``use_muon=True`` get
  Muon (Nesterov momentum 0.95, orthogonalized update), the others AdamW. One object, so the trainer
  checkpoints it with ``state_dict()`` or torch.distributed.checkpoint like any optimizer.
- :class:`MaxLogitTracker` records the per-head maximum pre-softmax attention logit of Hugging Face
  Llama-style attention layers during the forward; :func:`qk_clip` then rescales W_q / W_k rows of the
  heads above ``tau`` (Kimi K2's QK-clip, https://arxiv.org/abs/2507.20534).

FSDP2: parameters and gradients are DTensors sharded on dim 0. Newton-Schulz needs the whole matrix,
so each Muon step all-gathers the momentum-corrected update of every Muon matrix
(``DTensor.full_tensor``), every rank runs Newton-Schulz on the full matrix and keeps its own shard
(``distribute_tensor(..., src_data_rank=None)`` slices locally, no communication). Cost per step: one
all-gather of each Muon matrix (the same bytes as FSDP's forward all-gather of those weights) and
``world_size``-fold redundant Newton-Schulz FLOPs (5 x 3 matmuls of the matrix's size). Correct, not the
fastest: a round-robin variant (one owner rank per matrix, then scatter) would divide the FLOPs by the
world size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.optim.adam import adam as _adam_functional

__all__ = [
    "NS_COEFFICIENTS",
    "MaxLogitTracker",
    "MuonAdamW",
    "find_attention_layers",
    "newton_schulz",
    "qk_clip",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
LR_ADJUST_RULES = ("match_rms_adamw", "original", "none")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate ``U V^T`` of ``g = U S V^T`` with the quintic Newton-Schulz iteration.

    The coefficients trade exactness for speed: after 5 steps the singular values land in roughly
    [0.7, 1.2] instead of exactly 1 (singular values far below ``||g||_F / 500`` stay small), which
    does not hurt Muon.

    Args:
        g: [m, n] float tensor (a plain tensor, not a DTensor).
        steps: iterations.
        coefficients: (a, b, c) of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``.
        eps: guards the Frobenius normalization of an all-zero ``g``.
        dtype: compute dtype; bfloat16 is the usual choice on GPUs.

    Returns:
        [m, n] tensor in ``dtype``.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    # Iterate on the wide orientation so the Gram matrix is the smaller one.
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    # Frobenius norm >= spectral norm, so all singular values start in (0, 1].
    x = x / x.norm().clamp_min(eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def _lr_scale(rule: str, shape: torch.Size) -> float:
    rows, cols = shape[0], shape[1]
    if rule == "match_rms_adamw":
        # Moonlight (arXiv:2502.16982): an orthogonal update has RMS ~ 1/sqrt(max dim); 0.2*sqrt(max dim)
        # brings it to AdamW's typical update RMS (~0.2), so one lr and weight decay serve both.
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


def _orthogonalize(update: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Newton-Schulz of a plain or DTensor update; a DTensor comes back with the same placements."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, dtype=dtype).to(update.dtype)
    full = update.full_tensor()
    ortho = newton_schulz(full, steps, dtype=dtype).to(update.dtype)
    # Every rank holds the same full result: src_data_rank=None slices the local shard without a broadcast.
    return distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True`` (2-D hidden matrices), AdamW for the other groups.

    Muon step for a [rows, cols] parameter ``W`` with gradient ``G`` (fp32 or bf16, plain or DTensor):
    ``B <- m B + (1 - m) G``; ``U = (1 - m) G + m B`` (Nesterov) or ``B``; ``O = newton_schulz(U)``;
    ``W <- W (1 - lr wd) - lr s O`` with ``s`` from ``lr_adjust``: ``"match_rms_adamw"`` (default,
    ``0.2 sqrt(max(rows, cols))``, Moonlight: reuse AdamW's lr and weight decay), ``"original"``
    (``sqrt(max(1, rows / cols))``, Keller Jordan's Muon; wants lr ~0.02) or ``"none"``.
    State: ``momentum_buffer`` (like the parameter).

    AdamW step: ``torch.optim.adam.adam`` with decoupled weight decay (torch's own kernels; foreach by
    default on GPUs). State: ``step``, ``exp_avg``, ``exp_avg_sq`` as in ``torch.optim.AdamW``.

    Args:
        params: param groups (dicts); any group key overrides the defaults below.
        lr, weight_decay: both kinds of groups.
        betas, eps: AdamW groups.
        momentum, nesterov, ns_steps, ns_dtype ("bfloat16" or "float32"), lr_adjust: Muon groups.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        lr_adjust: str = "match_rms_adamw",
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"bad MuonAdamW settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            betas=tuple(betas),
            eps=eps,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            lr_adjust=lr_adjust,
            use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["lr_adjust"] not in LR_ADJUST_RULES:
                raise ValueError(f"lr_adjust must be one of {LR_ADJUST_RULES}, got {group['lr_adjust']!r}")
            if group["ns_dtype"] not in NS_DTYPES:
                raise ValueError(f"ns_dtype must be one of {tuple(NS_DTYPES)}, got {group['ns_dtype']!r}")
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2-D matrices only; got shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
        ns_dtype = NS_DTYPES[group["ns_dtype"]]
        # Every rank must reach the same full_tensor() collectives in the same order: parameters are
        # visited in group order and a missing grad is missing on all ranks under FSDP2.
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - m)
            update = grad.lerp(buf, m) if group["nesterov"] else buf
            ortho = _orthogonalize(update, group["ns_steps"], ns_dtype)
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(ortho, alpha=-lr * _lr_scale(group["lr_adjust"], p.shape))

    def _adamw_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MuonAdamW does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # A CPU float32 step counter, as torch.optim.AdamW keeps it when not capturable/fused.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _adam_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


# ---------------------------------------------------------------------------------------------------
# QK-clip


def find_attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Attention modules with ``q_proj`` and ``k_proj`` (HF Llama, Qwen2/3, Mistral, BitNet), by layer index.

    The key is the module's ``layer_idx`` when it has one, else its order in ``model.modules()``.
    """
    found = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    layers = {}
    for order, module in enumerate(found):
        idx = getattr(module, "layer_idx", None)
        layers[order if idx is None else int(idx)] = module
    return layers


def _head_geometry(attn: nn.Module) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) read from the projection shapes (global shapes under FSDP2)."""
    head_dim = attn.head_dim
    return attn.q_proj.weight.shape[0] // head_dim, attn.k_proj.weight.shape[0] // head_dim, head_dim


def _scale_rows_(linear: nn.Module, row_scale: Tensor) -> None:
    """``weight[r, :] *= row_scale[r]`` and ``bias[r] *= row_scale[r]`` in place; row_scale [out] float32.

    Under FSDP2 the weight is a DTensor sharded on dim 0: only the rows this rank holds are touched, by
    slicing ``row_scale`` with the same placements (no communication).
    """
    for param in (linear.weight, getattr(linear, "bias", None)):
        if param is None:
            continue
        scale = row_scale.view(-1, *([1] * (param.ndim - 1)))
        if isinstance(param, DTensor):
            # A [out, 1, ...] scale sharded like dim 0 of the parameter; shards on other dims hold whole rows.
            placements = [p if not isinstance(p, Shard) or p.dim == 0 else Replicate() for p in param.placements]
            local_scale = distribute_tensor(
                scale.to(param.device), param.device_mesh, placements, src_data_rank=None
            ).to_local()
            local = param.to_local()
            local.mul_(local_scale.to(local.dtype))
        else:
            param.mul_(scale.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def qk_clip(
    model: nn.Module, max_logits: Mapping[int | nn.Module, Tensor], tau: float = 100.0
) -> dict[int | nn.Module, Tensor]:
    """QK-clip: bring each head's max attention logit down to ``tau`` by rescaling W_q / W_k rows.

    Per head h: ``gamma_h = min(1, tau / max_logit_h)``. With one key head per query head (MHA) the
    rows of head h in W_q and W_k (and their biases) are scaled by ``sqrt(gamma_h)`` (DESIGN.md section 5).
    With shared key heads (GQA/MQA) a key head serves several query heads, so, as Kimi K2 does for its
    shared rotary key, the key rows stay untouched and the query rows of head h are scaled by
    ``gamma_h``. Either way the logits of head h scale by exactly ``gamma_h`` and heads at or under
    ``tau`` are left alone. Call it right after ``optimizer.step()`` with the logits of that step's
    forward (:class:`MaxLogitTracker`); all ranks must pass the same values (``pop(reduce=True)``).

    Caveats: with BitLinear projections the latent weights are rescaled, but the per-tensor absmean
    quantization then changes the ternary codes, so quantized logits scale only approximately. Layers
    with ``q_norm``/``k_norm`` (Qwen3) normalize the scale away; they are skipped with a warning.

    Args:
        model: the model (plain or FSDP2-sharded).
        max_logits: layer index (see :func:`find_attention_layers`) or attention module ->
            [num_heads] tensor of max pre-softmax logits (any float dtype, any device).
        tau: the logit cap.

    Returns:
        The same keys -> [num_heads] float32 ``gamma`` applied.
    """
    layers = find_attention_layers(model)
    gammas = {}
    for key, logits in max_logits.items():
        attn = key if isinstance(key, nn.Module) else layers[key]
        num_heads, num_kv, head_dim = _head_geometry(attn)
        logits = logits.detach().float().cpu()
        if logits.shape != (num_heads,):
            raise ValueError(f"layer {key}: expected max logits of shape ({num_heads},), got {tuple(logits.shape)}")
        gamma = torch.where(logits > tau, tau / logits, torch.ones_like(logits))
        gammas[key] = gamma
        if bool((gamma == 1).all()):
            continue
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            warnings.warn(f"qk_clip: layer {key} has q_norm/k_norm, which undo row scaling; skipped", stacklevel=2)
            continue
        if num_kv == num_heads:
            root = gamma.sqrt()
            _scale_rows_(attn.q_proj, root.repeat_interleave(head_dim))
            _scale_rows_(attn.k_proj, root.repeat_interleave(head_dim))
        else:
            _scale_rows_(attn.q_proj, gamma.repeat_interleave(head_dim))
    return gammas


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_ATTN_ARG_ORDER = ("hidden_states", "position_embeddings", "attention_mask")


class MaxLogitTracker:
    """Per-head max pre-softmax attention logit ``max_{i, j allowed} q_i . k_j * scaling`` of each layer.

    Exact for rotate-half RoPE attention in the Hugging Face Llama form (Llama, Qwen2/3, Mistral,
    BitNet): forward hooks on ``q_proj``/``k_proj`` capture the projected queries and keys (after any
    BitLinear fake quantization: what the model used), a pre-hook on the attention module captures the
    ``position_embeddings`` (cos, sin) and ``attention_mask`` it was called with, and a post-hook
    applies ``q_norm``/``k_norm`` when present, the same RoPE, and the mask, then reduces
    ``q k^T * attn.scaling`` in float32 over batch, queries and keys, in chunks of queries to bound
    memory (``B * H * chunk * S`` floats). Allowed pairs: a 4-D boolean mask (True = attend) or additive
    float mask when the layer got one, else causal. Packed documents attended with a causal mask plus
    position resets (flash-attention varlen) are treated as one causal sequence, which can only
    overestimate (clip earlier), never miss a logit.

    Cost: one extra ``Q K^T`` per layer while ``enabled`` (about the attention-score FLOPs of the
    forward), recomputed again under activation checkpointing (harmless for a max). Hooks break
    torch.compile graphs around the attention modules; disable (``enabled = False``) on steps that do not
    clip.

    Usage::

        tracker = MaxLogitTracker(model)
        loss = model(**batch).loss; loss.backward(); optimizer.step()
        qk_clip(model, tracker.pop(), tau=100.0)
    """

    def __init__(self, model: nn.Module, query_chunk: int = 256) -> None:
        self.layers = find_attention_layers(model)
        if not self.layers:
            raise ValueError("MaxLogitTracker: no attention modules with q_proj/k_proj found")
        self.query_chunk = query_chunk
        self.enabled = True
        self._max: dict[int, Tensor] = {}
        self._captured: dict[int, dict] = {}
        self._handles = []
        for idx, attn in self.layers.items():
            self._handles += [
                attn.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True),
                attn.q_proj.register_forward_hook(self._proj_hook(idx, "q")),
                attn.k_proj.register_forward_hook(self._proj_hook(idx, "k")),
                attn.register_forward_hook(self._post_hook(idx)),
            ]

    def remove(self) -> None:
        """Unregister all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured.clear()

    def _pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            if self.enabled:
                bound = dict(zip(_ATTN_ARG_ORDER, args, strict=False))
                bound.update({k: kwargs[k] for k in _ATTN_ARG_ORDER if k in kwargs})
                self._captured[idx] = bound

        return hook

    def _proj_hook(self, idx: int, name: str):
        def hook(module, args, output):
            if self.enabled and idx in self._captured:
                self._captured[idx][name] = output.detach()

        return hook

    def _post_hook(self, idx: int):
        def hook(module, args, output):
            captured = self._captured.pop(idx, None)
            if captured is None or "q" not in captured or "k" not in captured:
                return
            head_max = self._head_max(module, captured)
            prev = self._max.get(idx)
            self._max[idx] = head_max if prev is None else torch.maximum(prev, head_max)

        return hook

    @torch.no_grad()
    def _head_max(self, attn: nn.Module, captured: dict) -> Tensor:
        num_heads, num_kv, head_dim = _head_geometry(attn)
        q = captured["q"].unflatten(-1, (num_heads, head_dim))  # [B, S, H, D]
        k = captured["k"].unflatten(-1, (num_kv, head_dim))
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        q = q.transpose(1, 2).float()  # [B, H, Sq, D]
        k = k.transpose(1, 2).float()  # [B, KV, Sk, D]
        rope = captured.get("position_embeddings")
        if rope is not None:
            cos, sin = (t.float().unsqueeze(1) for t in rope)  # [B, 1, S, D]
            if cos.shape[-1] != head_dim:
                raise NotImplementedError("MaxLogitTracker: partial rotary embeddings are not supported")
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(num_heads // num_kv, dim=1)
        scaling = float(getattr(attn, "scaling", head_dim**-0.5))
        mask = captured.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.ndim == 4 else None
        seq_q, seq_k = q.shape[2], k.shape[2]
        result = torch.full((num_heads,), float("-inf"), device=q.device)
        for start in range(0, seq_q, self.query_chunk):
            stop = min(start + self.query_chunk, seq_q)
            logits = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scaling  # [B, H, c, Sk]
            if mask is not None:
                part = mask[:, :, start:stop, :seq_k]
                allowed = part if part.dtype == torch.bool else part > torch.finfo(part.dtype).min / 2
            else:
                rows = torch.arange(start, stop, device=q.device)[:, None] + (seq_k - seq_q)
                allowed = torch.arange(seq_k, device=q.device)[None, :] <= rows
            logits = logits.masked_fill(~allowed, float("-inf"))
            result = torch.maximum(result, logits.amax(dim=(0, 2, 3)))
        return result

    def pop(self, reduce: bool = True, group: dist.ProcessGroup | None = None) -> dict[int, Tensor]:
        """Max logits since the last pop, layer index -> [num_heads] float32; resets the record.

        Layers not run since the last pop read -inf (then :func:`qk_clip` leaves them alone). With
        ``reduce`` and an initialized process group the maxima are all-reduced (MAX, one collective)
        so that every rank clips the same heads: call it on all ranks.
        """
        out = {}
        for idx, attn in sorted(self.layers.items()):
            num_heads = _head_geometry(attn)[0]
            value = self._max.get(idx)
            out[idx] = torch.full((num_heads,), float("-inf")) if value is None else value
        self._max = {}
        if reduce and dist.is_available() and dist.is_initialized():
            keys = list(out)
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            flat = torch.cat([out[k].to(device) for k in keys])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
            out = dict(zip(keys, flat.split([out[k].numel() for k in keys]), strict=True))
        return out
