"""Triton ``relu(gate)^2 * up``, BitNet's gated FFN activation, forward and backward in one pass each.

Computed in float32 and stored in the inputs' dtype; the backward recomputes ``relu(gate)`` from
the saved inputs instead of keeping the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _relu2_glu_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.maximum(g, 0.0)
    tl.store(out_ptr + offs, (r * r * u).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _relu2_glu_backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.maximum(g, 0.0)
    tl.store(dg_ptr + offs, (2.0 * r * u * dh).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + offs, (r * r * dh).to(du_ptr.dtype.element_ty), mask=m)


def relu2_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``relu(gate)^2 * up`` for contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    _relu2_glu_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
    return out


def relu2_glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of :func:`relu2_glu` given the output's gradient ``dh``."""
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _relu2_glu_backward_kernel[(triton.cdiv(n, BLOCK),)](dh, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du
