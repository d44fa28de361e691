"""Triton matmuls of a training BitLinear (DESIGN.md section 2, straight-through estimator).

Forward: int8 activations ``q`` [N, K] times ternary int8 codes [M, K] on int8 tensor cores,
accumulated exactly in int32; the scales are applied in the epilogue,
``y = (acc / x_scale[n]) * w_scale`` in float32 (the order of the reference, so the result equals
it bit for bit).

Backward, with the quantizers' gradient taken as the identity:
    grad_input  = dy @ (codes * w_scale)              the dequantized ternary weight
    grad_weight = dy^T @ (q / x_scale[:, None])       the saved quantized activations
Neither dequantized tensor is written to memory: codes and q are converted in registers, the
weight scale is applied in the epilogue and ``1 / x_scale`` is folded into the rows of ``dy``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from wrinklefree.triton_kernels._common import EXACT

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(n: int, m: int, k: int, *, int8: bool) -> dict:
    """Tile sizes: tensor-core tiles for large problems, smaller ones for a few rows; at least 16
    (the smallest tl.dot), at most the problem rounded up to a power of two."""
    bm = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    bn = 128 if m >= 128 else max(16, triton.next_power_of_2(m))
    bk = (128 if int8 else 64) if k >= 64 else max(16, triton.next_power_of_2(k))
    warps = 8 if bm * bn >= 128 * 128 else 4
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": 3}


@triton.jit
def _tile_ids(N, M, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (tile row, tile column), grouped so that neighbours share operand tiles in L2."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BM)
    m_tiles = tl.cdiv(M, BN)
    per_group = GROUP * m_tiles
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_tiles - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _dot_int8(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with ``b`` int8 taken in ``a``'s dtype (exact: |b| <= 128). Triton's
    interpreter multiplies bfloat16 tiles as raw bits, so there both run as float32, which holds
    bfloat16 values exactly and accumulates in float32 as the tensor cores do."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def _forward_kernel(
    q_ptr,
    c_ptr,
    xs_ptr,
    ws_ptr,
    y_ptr,
    N,
    M,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    tn, tm = _tile_ids(N, M, BM, BN, GROUP)
    rn = tn * BM + tl.arange(0, BM)
    rm = tm * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = c_ptr + rm[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=(rn[:, None] < N) & (k0 + rk[None, :] < K), other=0)
        b = tl.load(b_ptrs, mask=(rm[None, :] < M) & (k0 + rk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    xs = tl.load(xs_ptr + rn, mask=rn < N, other=1.0)
    ws = tl.load(ws_ptr)
    y = tl.div_rn(acc.to(tl.float32), xs[:, None]) * ws
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(y_ptr + rn[:, None].to(tl.int64) * M + rm[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    c_ptr,
    ws_ptr,
    dx_ptr,
    N,
    M,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dx [N, K] = (dy [N, M] @ codes [M, K]) * w_scale; tiles of dx are BM x BN, the reduction
    runs over M in steps of BK."""
    tn, tk = _tile_ids(N, K, BM, BN, GROUP)
    rn = tn * BM + tl.arange(0, BM)
    rk = tk * BN + tl.arange(0, BN)
    rm = tl.arange(0, BK)
    a_ptrs = dy_ptr + rn[:, None].to(tl.int64) * M + rm[None, :]
    b_ptrs = c_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for m0 in range(0, M, BK):
        a = tl.load(a_ptrs, mask=(rn[:, None] < N) & (m0 + rm[None, :] < M), other=0.0)
        b = tl.load(b_ptrs, mask=(m0 + rm[:, None] < M) & (rk[None, :] < K), other=0)
        acc = _dot_int8(a, b, acc, PRECISION, INTERPRET)
        a_ptrs += BK
        b_ptrs += BK * K
    acc = acc * tl.load(ws_ptr)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    tl.store(dx_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    dy_ptr,
    q_ptr,
    xs_ptr,
    dw_ptr,
    N,
    M,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dw [M, K] = sum_n dy[n, m] / x_scale[n] * q[n, k]; tiles of dw are BM x BN, the reduction
    runs over the N rows in steps of BK."""
    tm, tk = _tile_ids(M, K, BM, BN, GROUP)
    rm = tm * BM + tl.arange(0, BM)
    rk = tk * BN + tl.arange(0, BN)
    rn = tl.arange(0, BK)
    a_ptrs = dy_ptr + rn[None, :].to(tl.int64) * M + rm[:, None]  # dy^T tile [BM, BK]
    b_ptrs = q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for n0 in range(0, N, BK):
        rows = n0 + rn
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rows[None, :] < N), other=0.0)
        xs = tl.load(xs_ptr + rows, mask=rows < N, other=1.0)
        a = (a.to(tl.float32) / xs[None, :]).to(dy_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=(rows[:, None] < N) & (rk[None, :] < K), other=0)
        acc = _dot_int8(a, b, acc, PRECISION, INTERPRET)
        a_ptrs += BK * M
        b_ptrs += BK * K
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dw_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, cols: int, cfg: dict) -> tuple[int]:
    return (triton.cdiv(rows, cfg["BM"]) * triton.cdiv(cols, cfg["BN"]),)


def _precision(dtype: torch.dtype) -> str:
    # float32 gradients stay float32 ("ieee"); bf16/fp16 run on tensor cores as they are
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(
    q: torch.Tensor, codes: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``y [N, M] = (int32(q @ codes^T) / x_scale[:, None]) * w_scale`` in ``out_dtype``."""
    n, k = q.shape
    m = codes.shape[0]
    y = torch.empty((n, m), dtype=out_dtype, device=q.device)
    cfg = _blocks(n, m, k, int8=True)
    _forward_kernel[_grid(n, m, cfg)](q, codes, x_scale, w_scale, y, n, m, k, GROUP=8, **cfg, **EXACT)
    return y


def grad_input(dy: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``dx [N, K] = (dy @ codes) * w_scale`` for ``dy`` [N, M], ``codes`` int8 [M, K]."""
    n, m = dy.shape
    k = codes.shape[1]
    dx = torch.empty((n, k), dtype=out_dtype, device=dy.device)
    cfg = _blocks(n, k, m, int8=False)
    _grad_input_kernel[_grid(n, k, cfg)](
        dy, codes, w_scale, dx, n, m, k, GROUP=8, PRECISION=_precision(dy.dtype), INTERPRET=INTERPRET, **cfg
    )
    return dx


def grad_weight(dy: torch.Tensor, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``dw [M, K] = dy^T @ (q / x_scale[:, None])`` for ``dy`` [N, M], ``q`` int8 [N, K]."""
    n, m = dy.shape
    k = q.shape[1]
    dw = torch.empty((m, k), dtype=out_dtype, device=dy.device)
    cfg = _blocks(m, k, n, int8=False)
    _grad_weight_kernel[_grid(m, k, cfg)](
        dy, q, x_scale, dw, n, m, k, GROUP=8, PRECISION=_precision(dy.dtype), INTERPRET=INTERPRET, **cfg
    )
    return dw
