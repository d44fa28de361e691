"""Fake quantization for training: quantize-dequantize with the straight-through estimator.

The forward value is the dequantized tensor blended with the original by the warm-up factor
``lam`` (DESIGN.md section 2): ``x' = x + lam * (q(x) - x)``, computed as ``torch.lerp`` so that
``lam = 0`` gives ``x`` and ``lam = 1`` gives ``q(x)`` exactly. The gradient is the identity
(straight-through) for every ``lam``, so at ``lam = 0`` a BitLinear trains exactly like an
nn.Linear. The quantizers are the kernel ops of :mod:`.quant`, so training sees the same codes
and scales as packing and inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wrinklefree.ops.quant import act_quant_int8, ternary_quant

Lam = float | Tensor


def straight_through(value: Tensor, x: Tensor) -> Tensor:
    """``value`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return value.detach() + (x - x.detach())


def _blend(x: Tensor, q: Tensor, lam: Lam) -> Tensor:
    if isinstance(lam, Tensor):
        return torch.lerp(x, q, lam.to(device=x.device, dtype=x.dtype, non_blocking=True))
    if lam == 1.0:
        return q
    if lam == 0.0:
        return x
    return torch.lerp(x, q, lam)


def _check_lam(op: str, lam: Lam) -> None:
    if isinstance(lam, Tensor):
        if lam.dim() != 0:
            raise ValueError(f"{op}: lam must be a float or a 0-dim tensor, got shape {tuple(lam.shape)}")
    elif not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"{op}: lam must be a number in [0, 1] or a 0-dim tensor, got {lam!r}")


def ternary_fake_quant(w: Tensor, lam: Lam = 1.0) -> Tensor:
    """Absmean ternary fake quantization of a weight, per tensor, with the STE.

    Args:
        w: float weight [M, K] (float32, bfloat16 or float16).
        lam: warm-up factor in [0, 1] (float or 0-dim tensor).
    Returns:
        tensor like ``w``: ``lerp(w, codes * scale, lam)``; gradient to ``w`` is the identity.
    """
    _check_lam("ternary_fake_quant", lam)
    if w.dim() != 2:
        raise ValueError(f"ternary_fake_quant: w must be 2-D [out, in], got shape {tuple(w.shape)}")
    wd = w.detach()
    codes, scale = ternary_quant(wd.contiguous())
    q = codes.to(w.dtype) * scale.to(w.dtype)  # each element is +-scale or 0: exact in any float dtype
    return straight_through(_blend(wd, q, lam), w)


def act_fake_quant(x: Tensor, lam: Lam = 1.0) -> Tensor:
    """Per-token absmax int8 fake quantization of activations, with the STE.

    Args:
        x: float activations [..., K]; each row over the last dim gets its own scale.
        lam: warm-up factor in [0, 1] (float or 0-dim tensor).
    Returns:
        tensor like ``x``: ``lerp(x, q / scale, lam)``; gradient to ``x`` is the identity.
    """
    _check_lam("act_fake_quant", lam)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"act_fake_quant: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    xd = x.detach()
    q, scale = act_quant_int8(xd.reshape(-1, x.shape[-1]).contiguous())
    deq = (q.to(torch.float32) / scale[:, None]).to(x.dtype).view(x.shape)
    return straight_through(_blend(xd, deq, lam), x)
