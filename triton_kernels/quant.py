"""Triton quantizers: per-row int8 activations, absmean ternary weights, fused RMSNorm + int8.

Each launcher takes contiguous torch tensors on one device (CUDA, or CPU under
``TRITON_INTERPRET=1``) and returns what the op of the same name in :mod:`wrinklefree.ops`
returns, bit for bit equal to :mod:`wrinklefree.ops.reference`. Nothing here reads a value back to
the host: the weight scale is reduced, stored and applied on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wrinklefree.ops.reference import ACT_ABSMAX_FLOOR as ACT_FLOOR
from wrinklefree.ops.reference import WEIGHT_SCALE_FLOOR as WEIGHT_FLOOR
from wrinklefree.triton_kernels._common import EXACT, PAIR_CHUNK, log2_ceil, pairwise_tree, round_half_even

MAX_ROW_BLOCK = 4096  # a row longer than this is processed in chunks of this many elements


def _row_block(k: int) -> int:
    return min(triton.next_power_of_2(k), MAX_ROW_BLOCK)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


# ---- act_quant_int8 ---------------------------------------------------------------------------


@triton.jit
def _abs_max_bits(v):
    """max |v| as its int32 bit pattern: NaN > inf > numbers, so a NaN wins, as in the reference
    (tl.max of floats would drop it on the GPU)."""
    return tl.max(tl.abs(v).to(tl.int32, bitcast=True), axis=0)


@triton.jit
def _act_scale(amax_bits, FLOOR: tl.constexpr):
    """127 / max(max|x|, floor): NaN for a row holding a NaN, 0 for one holding an inf."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    return tl.div_rn(127.0, tl.maximum(amax, FLOOR, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _quantize_row(y, scale):
    """int8 codes of float32 ``y`` at ``scale``: clamp(round(y * scale), -128, 127); all 0 where the
    scale is NaN or 0 (a row holding a NaN or an inf: its products are 0 or NaN, and NaN is 0)."""
    v = tl.minimum(tl.maximum(y * scale, -128.0), 127.0)
    return tl.where(scale > 0.0, round_half_even(v), 0.0).to(tl.int8)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, scale_ptr, K, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * K
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((), dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, _abs_max_bits(x))
    scale = _act_scale(amax, FLOOR)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(q_row + k0 + offs, _quantize_row(x, scale), mask=m)


def act_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization of ``x`` [N, K] (float32/bfloat16/float16, contiguous)."""
    n, k = x.shape
    q = torch.empty((n, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    block = _row_block(k)
    _act_quant_kernel[(n,)](x, q, scale, k, BLOCK=block, FLOOR=ACT_FLOOR, num_warps=_warps(block), **EXACT)
    return q, scale


# ---- ternary_quant ----------------------------------------------------------------------------


@triton.jit
def _abs_block_sum_kernel(w_ptr, out_ptr, n, CHUNK: tl.constexpr, LOG2: tl.constexpr):
    """out[c] = pairwise sum of |w| over elements [c * CHUNK, (c + 1) * CHUNK), zeros past n."""
    c = tl.program_id(0).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + c, pairwise_tree(tl.abs(v).to(tl.float64), LOG2))


@triton.jit
def _block_sum_kernel(in_ptr, out_ptr, n, CHUNK: tl.constexpr, LOG2: tl.constexpr):
    """One level of block sums: out[g] = pairwise sum of in[g * CHUNK : (g + 1) * CHUNK]."""
    g = tl.program_id(0).to(tl.int64)
    offs = g * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(in_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + g, pairwise_tree(v, LOG2))


@triton.jit
def _ternary_codes_kernel(w_ptr, total_ptr, codes_ptr, scale_ptr, n, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
    """codes = clamp(round(w * (1 / s)), -1, 1) with s = max(float32(total / n), floor)."""
    pid = tl.program_id(0).to(tl.int64)
    total = tl.load(total_ptr)
    # div.rn.f64; a NaN total (a NaN weight) stays NaN
    s = tl.maximum((total / n.to(tl.float64)).to(tl.float32), FLOOR, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.div_rn(1.0, s)
    if pid == 0:
        tl.store(scale_ptr, s)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(w * inv, -1.0), 1.0)
    # all 0 at a NaN or inf scale (inv NaN or 0), as in the reference
    tl.store(codes_ptr + offs, tl.where(inv > 0.0, round_half_even(v), 0.0).to(tl.int8), mask=m)


def abs_sum(w: torch.Tensor) -> torch.Tensor:
    """float64 pairwise sum of |w| over all elements, as a 1-element device tensor."""
    n = w.numel()
    log2 = log2_ceil(PAIR_CHUNK)
    count = triton.cdiv(n, PAIR_CHUNK)
    sums = torch.empty(count, dtype=torch.float64, device=w.device)
    _abs_block_sum_kernel[(count,)](w, sums, n, CHUNK=PAIR_CHUNK, LOG2=log2, **EXACT)
    while count > 1:  # blocks of block sums: the same tree, one level of 1024 at a time
        nxt = triton.cdiv(count, PAIR_CHUNK)
        out = torch.empty(nxt, dtype=torch.float64, device=w.device)
        _block_sum_kernel[(nxt,)](sums, out, count, CHUNK=PAIR_CHUNK, LOG2=log2, **EXACT)
        sums, count = out, nxt
    return sums


def ternary_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization of ``w`` (float, contiguous): ``(codes int8 like w, scale
    float32 0-dim)``, the scale computed and applied on the device."""
    n = w.numel()
    total = abs_sum(w)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device)
    block = 4096
    _ternary_codes_kernel[(triton.cdiv(n, block),)](w, total, codes, scale, n, BLOCK=block, FLOOR=WEIGHT_FLOOR, **EXACT)
    return codes, scale


# ---- rmsnorm_act_quant ------------------------------------------------------------------------


@triton.jit
def _row_sum_squares(
    x_row, K, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, NCHUNK: tl.constexpr, LOG2_NCHUNK: tl.constexpr
):
    """Pairwise float64 sum of x^2 over a row of K: a tree per BLOCK (a power of two), then a tree
    over the chunk sums, which together are the tree over the whole padded row."""
    offs = tl.arange(0, BLOCK)
    if NCHUNK == 1:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32).to(tl.float64)
        total = pairwise_tree(x * x, LOG2_BLOCK)
    else:
        idx = tl.arange(0, NCHUNK)
        sums = tl.zeros((NCHUNK,), dtype=tl.float64)
        for c in range(0, tl.cdiv(K, BLOCK)):
            m = c * BLOCK + offs < K
            x = tl.load(x_row + c * BLOCK + offs, mask=m, other=0.0).to(tl.float32).to(tl.float64)
            sums = tl.where(idx == c, pairwise_tree(x * x, LOG2_BLOCK), sums)
        total = pairwise_tree(sums, LOG2_NCHUNK)
    return total


@triton.jit
def _rmsnorm_quant_kernel(
    x_ptr,
    w_ptr,
    q_ptr,
    scale_ptr,
    inv_ptr,
    K,
    eps,
    BLOCK: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
    NCHUNK: tl.constexpr,
    LOG2_NCHUNK: tl.constexpr,
    FLOOR: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * K
    q_row = q_ptr + row * K
    ss = _row_sum_squares(x_row, K, BLOCK, LOG2_BLOCK, NCHUNK, LOG2_NCHUNK)
    # float64 `/` and sqrt are IEEE-rounded (div.rn.f64, sqrt.rn.f64); div_rn/sqrt_rn take float32 only
    ms = ss / K.to(tl.float64)
    inv = (1.0 / tl.sqrt(ms + eps)).to(tl.float32)
    tl.store(inv_ptr + row, inv)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((), dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + k0 + offs, mask=m, other=0.0)
        amax = tl.maximum(amax, _abs_max_bits((x * inv) * g))
    scale = _act_scale(amax, FLOOR)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + k0 + offs, mask=m, other=0.0)
        tl.store(q_row + k0 + offs, _quantize_row((x * inv) * g, scale), mask=m)


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """RMSNorm of ``x`` [N, K] with gain ``weight`` [K], then per-row int8 quantization.

    Returns ``(q int8 [N, K], scale float32 [N], inv_rms float32 [N])``; the first two equal
    :func:`wrinklefree.ops.reference.rmsnorm_act_quant`, ``inv_rms`` is what the backward needs.
    """
    n, k = x.shape
    w32 = weight.to(torch.float32).contiguous()
    q = torch.empty((n, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    inv = torch.empty(n, dtype=torch.float32, device=x.device)
    block = _row_block(k)
    nchunk = triton.next_power_of_2(triton.cdiv(k, block))
    _rmsnorm_quant_kernel[(n,)](
        x, w32, q, scale, inv, k, float(eps), BLOCK=block, LOG2_BLOCK=log2_ceil(block), NCHUNK=nchunk,
        LOG2_NCHUNK=log2_ceil(nchunk), FLOOR=ACT_FLOOR, num_warps=_warps(block), **EXACT,
    )  # fmt: skip
    return q, scale, inv


@triton.jit
def _rmsnorm_backward_kernel(dh_ptr, x_ptr, w_ptr, inv_ptr, dx_ptr, dw_ptr, N, K, BLOCK: tl.constexpr):
    """Rows pid, pid + P, ...: dx = inv * g - inv^3 * x * mean(g * x) with g = dh * w, and this
    program's partial dw = sum over its rows of dh * x * inv (row pid of dw_ptr, float32)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    dw_row = dw_ptr + pid.to(tl.int64) * K
    for row in range(pid, N, n_prog):
        base = (tl.full((), 0, tl.int64) + row) * K  # 64-bit offsets (row is a plain int when interpreted)
        inv = tl.load(inv_ptr + row)
        dot = tl.zeros((), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            dh = tl.load(dh_ptr + base + k0 + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + base + k0 + offs, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + k0 + offs, mask=m, other=0.0)
            dot += tl.sum(dh * w * x, axis=0)
        c = inv * inv * inv * (dot / K)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            dh = tl.load(dh_ptr + base + k0 + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + base + k0 + offs, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + k0 + offs, mask=m, other=0.0)
            dx = inv * (dh * w) - c * x
            tl.store(dx_ptr + base + k0 + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            acc = tl.load(dw_row + k0 + offs, mask=m, other=0.0)
            tl.store(dw_row + k0 + offs, acc + dh * x * inv, mask=m)


def rmsnorm_backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor):
    """Gradients of ``y = (x * inv_rms) * weight`` given ``dh = dL/dy`` [N, K].

    Returns ``(dx like x, dweight float32 [K])``; float results, equal to autograd's up to rounding.
    """
    n, k = x.shape
    w32 = weight.to(torch.float32).contiguous()
    block = _row_block(k)
    n_prog = max(1, min(n, 4 * _sm_count(x.device)))
    dx = torch.empty_like(x)
    partial = torch.zeros((n_prog, k), dtype=torch.float32, device=x.device)
    _rmsnorm_backward_kernel[(n_prog,)](dh, x, w32, inv_rms, dx, partial, n, k, BLOCK=block, num_warps=_warps(block))
    return dx, partial.sum(dim=0)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so that tests cover the partial-sum path
