"""Plain-PyTorch references for every kernel op: the definition each kernel is tested against.

They follow DESIGN.md section 2 exactly, including the order of floating-point operations, so the
integer outputs of every backend match them bit for bit:

* reductions that feed a rounding step (the weight mean, the RMSNorm sum of squares) are float64
  pairwise sums (:func:`pairwise_sum`): the sequence is padded with zeros to a power of two and
  ``S(v) = S(first half) + S(second half)``. The order is fixed, so every backend gives the same
  bits, and it splits into independent power-of-two blocks (zeros add exactly nothing), so CPU
  threads, SIMD lanes and GPU programs can each take a block;
* scales and products are float32, multiplying by the reciprocal (``x * (127 / a)``);
* rounding is half-to-even (``torch.round``);
* non-finite values: a NaN propagates through max and mean, and rounds to code 0. So a row (or
  weight) holding a NaN gets scale NaN and all codes 0; an activation row holding an inf gets
  scale ``127 / inf = 0`` and all codes 0 (``inf * 0`` is NaN); a weight holding an inf gets scale
  inf and all codes 0 (``w * (1 / inf)`` is 0 or NaN).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

WEIGHT_SCALE_FLOOR = 1e-5
ACT_ABSMAX_FLOOR = 1e-5
PAIR_CHUNK = 1024  # kernels sum blocks of this many elements, then combine the block sums pairwise


def _pairwise_rows(v: Tensor) -> Tensor:
    """Pairwise sum over the last dim of float64 ``v`` [R, L] -> [R], L padded to a power of two."""
    width = 1 << max(v.shape[1] - 1, 0).bit_length()
    if width != v.shape[1]:
        v = torch.nn.functional.pad(v, (0, width - v.shape[1]))  # adding +0.0 changes nothing
    while v.shape[1] > 1:
        v = v[:, 0::2] + v[:, 1::2]  # one level of the tree: neighbours, in order
    return v[:, 0]


def pairwise_sum(v: Tensor) -> Tensor:
    """Fixed-order float64 sum over the last dim of ``v`` [R, L] -> [R] (see module docstring).

    Summed in blocks of :data:`PAIR_CHUNK` whose sums are then combined pairwise, which equals the
    pairwise sum of the whole row and keeps the padding small.
    """
    v = v.to(torch.float64)
    rows, length = v.shape
    if length <= PAIR_CHUNK:
        return _pairwise_rows(v)
    v = torch.nn.functional.pad(v, (0, (-length) % PAIR_CHUNK))
    blocks = _pairwise_rows(v.reshape(-1, PAIR_CHUNK)).view(rows, -1)
    return _pairwise_rows(blocks)


def _round_nan_to_zero(v: Tensor) -> Tensor:
    """Round half to even; a NaN rounds to 0 (torch's NaN -> int8 cast is undefined)."""
    return torch.nan_to_num(torch.round(v), nan=0.0)


def ternary_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization of a weight tensor.

    ``s = max(mean(|w|), 1e-5)``, ``codes = clamp(round(w * (1/s)), -1, 1)``.
    Returns ``(codes int8, same shape as w; s float32 0-dim)``; ``codes * s`` dequantizes.
    """
    flat = w.reshape(1, -1).abs()
    n = flat.numel()
    total = pairwise_sum(flat)[0]
    s = torch.clamp((total / n).to(torch.float32), min=WEIGHT_SCALE_FLOOR)
    inv = torch.ones_like(s) / s
    codes = torch.clamp(_round_nan_to_zero(w.to(torch.float32) * inv), -1, 1).to(torch.int8)
    return codes, s


def _absmax_quant(y: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.clamp(y.abs().amax(dim=-1), min=ACT_ABSMAX_FLOOR)
    # A true float32 division: `127.0 / a` would compute reciprocal(a) * 127, rounding twice.
    scale = torch.full_like(a, 127.0) / a
    q = torch.clamp(_round_nan_to_zero(y * scale[:, None]), -128, 127).to(torch.int8)
    return q, scale


def act_quant_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization of activations x [N, K].

    ``scale = 127 / max(max|x|, 1e-5)`` (float32), ``q = clamp(round(x * scale), -128, 127)``.
    Returns ``(q int8 [N, K], scale float32 [N])``; ``q / scale`` dequantizes.
    """
    return _absmax_quant(x.to(torch.float32))


def sqrt_rn(v: Tensor) -> Tensor:
    """The IEEE (correctly rounded) square root of float64 ``v``. torch's CPU ``sqrt`` of float64 is
    a vectorized library routine that can be an ulp off (2.593417014796253 for the root of
    6.725811812634708, whose IEEE root is 2.5934170147962528); numpy's is the hardware instruction.
    CUDA's is IEEE. The gradient is torch's: the correction, exact in float64, is a constant (zero
    where both roots are inf or NaN)."""
    root = torch.sqrt(v)
    if v.device.type != "cpu":
        return root
    ieee = torch.from_numpy(np.sqrt(v.detach().numpy()))
    return root + torch.nan_to_num(ieee - root.detach(), nan=0.0)


def rms_inv(x: Tensor, eps: float) -> Tensor:
    """``inv_rms`` [N] of the rows of ``x`` [N, K]: ``float32(1 / sqrt(sum(x^2) / K + eps))`` with
    the sum a float64 pairwise sum, the square root and division in float64, IEEE-rounded."""
    ms = pairwise_sum(x.to(torch.float32).to(torch.float64).square()) / x.shape[-1]
    return (1.0 / sqrt_rn(ms + eps)).to(torch.float32)


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as the fused op computes it, in float32: ``(x * inv_rms) * weight``."""
    return (x.to(torch.float32) * rms_inv(x, eps)[:, None]) * weight.to(torch.float32)


def rmsnorm_act_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm (the SubLN before a BitLinear) followed by :func:`act_quant_int8`."""
    return _absmax_quant(rmsnorm(x, weight, eps))


# ---- training BitLinear (ops.bitlinear_train) ------------------------------------------------


def int8_matmul(q: Tensor, codes: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """``(int32(q @ codes^T) / x_scale[:, None]) * w_scale`` in float32, for int8 ``q`` [N, K] and
    ternary ``codes`` [M, K]. The integer products are exact in a float32 matmul: every partial sum
    is an integer below 128 * K < 2**24 (K < 131072)."""
    if q.shape[1] >= 1 << 17:
        raise ValueError(f"int8_matmul: K must be < 131072 for the float32 reference, got {q.shape[1]}")
    acc = q.to(torch.float32) @ codes.to(torch.float32).T
    return (acc / x_scale[:, None]) * w_scale


def bitlinear_train_forward(x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
    """The training BitLinear at full quantization: optional RMSNorm, int8 activations, ternary
    weight, exact integer product, float32 result ``[N, M]``."""
    if norm_weight is not None:
        q, x_scale = rmsnorm_act_quant(x, norm_weight, eps)
    else:
        q, x_scale = act_quant_int8(x)
    codes, w_scale = ternary_quant(weight)
    return int8_matmul(q, codes, x_scale, w_scale)


def bitlinear_grads(dy: Tensor, x: Tensor | None, norm_weight: Tensor | None, q: Tensor, x_scale: Tensor,
                    inv_rms: Tensor | None, codes: Tensor, w_scale: Tensor, *,
                    need_weight_grad: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """Straight-through gradients of a training BitLinear from what its forward saved: the
    quantizers pass the gradient unchanged, so ``dh = dy @ (codes * s_w)`` and
    ``dW = dy^T @ (q / s_x)``; the RMSNorm (``x``, ``norm_weight``, ``inv_rms``; all None without
    one) is differentiated exactly. float32 ``(dx [N, K], dW [M, K] (None unless need_weight_grad),
    d norm_weight [K] or None)``."""
    dy = dy.to(torch.float32)
    dh = (dy @ codes.to(torch.float32)) * w_scale
    dw = (dy / x_scale[:, None]).T @ q.to(torch.float32) if need_weight_grad else None
    if norm_weight is None:
        return dh, dw, None
    x32, inv = x.to(torch.float32), inv_rms[:, None]
    g = dh * norm_weight.to(torch.float32)
    dx = inv * g - inv**3 * x32 * (g * x32).mean(dim=1, keepdim=True)
    return dx, dw, (dh * x32 * inv).sum(dim=0)


def bitlinear_train_backward(dy: Tensor, x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float):
    """Gradients of :func:`bitlinear_train_forward` (see :func:`bitlinear_grads`)."""
    if norm_weight is not None:
        q, x_scale = rmsnorm_act_quant(x, norm_weight, eps)
    else:
        q, x_scale = act_quant_int8(x)
    codes, w_scale = ternary_quant(weight)
    inv = rms_inv(x, eps) if norm_weight is not None else None
    return bitlinear_grads(dy, x, norm_weight, q, x_scale, inv, codes, w_scale)


def relu2_glu(gate: Tensor, up: Tensor) -> Tensor:
    """``relu(gate)^2 * up`` in float32, returned in ``gate``'s dtype."""
    r = torch.relu(gate.to(torch.float32))
    return (r * r * up.to(torch.float32)).to(gate.dtype)


def relu2_glu_backward(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """``(d gate, d up)`` of :func:`relu2_glu`: ``2 relu(gate) up dh`` and ``relu(gate)^2 dh``."""
    r = torch.relu(gate.to(torch.float32))
    dh32 = dh.to(torch.float32)
    return (2.0 * r * up.to(torch.float32) * dh32).to(gate.dtype), (r * r * dh32).to(up.dtype)


# ---- packed formats ---------------------------------------------------------------------------
# Layouts: DESIGN.md section 3 (and the comments in csrc/cpu/formats.h).

_POW3 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)


def _block_scales(codes: Tensor, scale: Tensor, block: int) -> Tensor:
    """Per-block float32 scales (a tensor scale broadcast); 0 for all-zero blocks, as ggml writes."""
    any_nonzero = (codes.reshape(-1, block) != 0).any(dim=1)
    per_block = scale.reshape(-1).to(torch.float32).expand(any_nonzero.shape[0])
    return torch.where(any_nonzero, per_block, torch.zeros((), dtype=torch.float32, device=codes.device))


def _fp16_bytes(d: Tensor) -> Tensor:
    return d.to(torch.float16).view(torch.uint8).view(-1, 2)


def _trits_to_bytes(t: Tensor, n_digits: int) -> Tensor:
    """t [B, n_digits, W] digits 0..2, most significant first -> [B, W] bytes (ceil(q*256/243))."""
    # a 4-digit byte is shifted up by one digit, so the weights are 81, 27, 9, 3 either way
    q = (t.to(torch.int32) * _POW3[:n_digits].to(t.device).view(1, -1, 1)).sum(dim=1)
    return ((q * 256 + 242) // 243).to(torch.uint8)


def _bytes_to_trits(b: Tensor, n_digits: int) -> Tensor:
    """[B, W] bytes -> [B, n_digits, W] digits 0..2."""
    pow3 = torch.tensor([1, 3, 9, 27, 81][:n_digits], dtype=torch.int32, device=b.device).view(1, -1, 1)
    q = (b.to(torch.int32).unsqueeze(1) * pow3) & 0xFF
    return (q * 3) >> 8


def pack(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """Pack ternary codes int8 [M, K] with their scale into the bytes of ``fmt`` (uint8, 1-D), on
    the codes' device."""
    m, k = codes.shape
    c = codes.to(torch.int32) + 1  # -1, 0, 1 -> 0, 1, 2
    if fmt == "i2_s":
        blocks = c.reshape(-1, 4, 32)  # [block, sub-block s (bits 7-6 .. 1-0), byte]
        packed = (blocks[:, 0] << 6) | (blocks[:, 1] << 4) | (blocks[:, 2] << 2) | blocks[:, 3]
        tail = torch.zeros(32, dtype=torch.uint8, device=codes.device)
        tail[:4] = scale.reshape(1).to(device=codes.device, dtype=torch.float32).view(torch.uint8)
        return torch.cat([packed.to(torch.uint8).reshape(-1), tail])
    d = _fp16_bytes(_block_scales(codes, scale, 256))
    blocks = c.reshape(-1, 256)
    if fmt == "tq2_0":
        halves = blocks.reshape(-1, 2, 4, 32)  # [block, half, n, m]: value 128h + 32n + m
        qs = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
        qs = qs.reshape(-1, 64).to(torch.uint8)
    elif fmt == "tq1_0":
        qs = torch.cat(
            [
                _trits_to_bytes(blocks[:, :160].reshape(-1, 5, 32), 5),
                _trits_to_bytes(blocks[:, 160:240].reshape(-1, 5, 16), 5),
                _trits_to_bytes(blocks[:, 240:].reshape(-1, 4, 4), 4),
            ],
            dim=1,
        )
    else:
        raise ValueError(f"fmt must be one of 'i2_s', 'tq2_0', 'tq1_0'; got {fmt!r}")
    return torch.cat([qs, d], dim=1).reshape(-1)


def _check_no_code_3(codes: Tensor, fmt: str) -> None:
    # 2-bit formats store codes 0, 1, 2; 3 (here 2, after the -1) is no ternary value.
    if codes.device.type == "meta":
        return  # no values to check
    bad = (codes == 2).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(f"unpack: buf is not valid {fmt}: row {int(bad[0, 0])} holds the unused 2-bit code 3")


def unpack(buf: Tensor, shape: tuple[int, int], fmt: str) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack`: codes int8 [M, K] and the scale (float32 0-dim for i2_s, per block
    [M, K // 256] for tq1_0/tq2_0)."""
    m, k = shape
    if fmt == "i2_s":
        body = buf[: m * k // 4].to(torch.int32).reshape(-1, 1, 32)
        shifts = torch.tensor([6, 4, 2, 0], dtype=torch.int32, device=buf.device).view(1, 4, 1)
        codes = ((body >> shifts) & 3).reshape(m, k) - 1
        _check_no_code_3(codes, fmt)
        scale = buf[m * k // 4 : m * k // 4 + 4].clone().view(torch.float32).reshape(())
        return codes.to(torch.int8), scale
    bytes_per_block = {"tq2_0": 66, "tq1_0": 54}[fmt]
    blocks = buf.reshape(-1, bytes_per_block)
    d = blocks[:, -2:].clone().view(torch.float16).to(torch.float32).reshape(m, k // 256)
    qs = blocks[:, :-2].to(torch.int32)
    if fmt == "tq2_0":
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=buf.device).view(1, 1, 4, 1)
        vals = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3  # [block, half, n, m]
        codes = vals.reshape(m, k) - 1
        _check_no_code_3(codes, fmt)
    else:
        codes = (
            torch.cat(
                [
                    _bytes_to_trits(qs[:, :32], 5).reshape(-1, 160),
                    _bytes_to_trits(qs[:, 32:48], 5).reshape(-1, 80),
                    _bytes_to_trits(qs[:, 48:52], 4).reshape(-1, 16),
                ],
                dim=1,
            ).reshape(m, k)
            - 1
        )
    return codes.to(torch.int8), d


# ---- matmul -----------------------------------------------------------------------------------


def i2s_matmul(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """int8 activations q [N, K] (scales [N]) times I2_S weights -> float32 [N, out_features].

    ``out = float32(D - S) / x_scale * w_scale`` with ``D = sum_k code * q`` (codes 0, 1, 2),
    ``S = sum_k q``, both exact integers.
    """
    k = q.shape[1]
    codes, w_scale = unpack(packed, (out_features, k), "i2_s")
    q64 = q.to(torch.int64)
    dot = q64 @ (codes.to(torch.int64) + 1).T  # exact: int64 accumulation
    rowsum = q64.sum(dim=1, keepdim=True)
    return ((dot - rowsum).to(torch.float32) / x_scale[:, None]) * w_scale


def bitlinear_infer(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """act_quant_int8 then i2s_matmul: a BitLinear forward on packed weights."""
    q, scale = act_quant_int8(x)
    return i2s_matmul(q, scale, packed, out_features)
