"""SubLN: the RMSNorm that BitNet puts in front of a BitLinear (DESIGN.md section 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SubLN(nn.Module):
    """RMSNorm over the last dim: ``weight * (x / sqrt(mean(x^2) + eps))``, computed in float32
    and returned in the input's dtype (the same operations as transformers' Llama/BitNet RMSNorm,
    so a converted model matches theirs).

    Args:
        hidden_size: size of the last dim.
        eps: added to the mean square.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"SubLN: hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
