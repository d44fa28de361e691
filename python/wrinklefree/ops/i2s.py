"""Matmul on packed I2_S weights: ``i2s_matmul`` (int8 activations) and ``bitlinear_infer``
(float activations, quantized on the fly), the inference path of a packed BitLinear.

The CPU kernel unpacks the 2-bit codes in registers and multiplies them with the int8
activations (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw or scalar, chosen at run time), accumulating in
int32; it is threaded over output rows. On CUDA the compiled core ``wrinklefree._C_cuda`` runs a
GEMV streaming the packed weights for up to 8 activation rows (decode) and an int8 tensor-core GEMM
beyond (prefill), on torch's current stream, without synchronizing. All give the reference's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wrinklefree import _C
from wrinklefree.ops import quant, reference
from wrinklefree.ops._backend import (
    FLOAT_DTYPES,
    call_op,
    check_same_device,
    check_tensor,
    cuda_core,
    dtype_code,
    use_native,
)
from wrinklefree.ops.packing import FORMATS

# The longest row (K) the matmul takes: no int32 sum of the kernels can overflow up to it.
I2S_MAX_K: int = _C.I2S_MAX_K


def _check_packed(op: str, packed: Tensor, out_features: int, k: int) -> None:
    check_tensor(op, "packed", packed, dtypes=(torch.uint8,), ndim=1)
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
        raise ValueError(f"{op}: out_features must be a positive int, got {out_features!r}")
    if k % 128:
        raise ValueError(f"{op}: i2_s needs K (the last dimension of the input) to be a multiple of 128, got K={k}")
    if k > I2S_MAX_K:
        limit = f"2^{I2S_MAX_K.bit_length() - 1} = {I2S_MAX_K}"
        raise ValueError(f"{op}: K (the last dimension of the input) must be at most {limit}, got K={k}")
    need = FORMATS["i2_s"].nbytes(out_features, k)
    if packed.numel() != need:
        raise ValueError(
            f"{op}: packed holds {packed.numel()} bytes; out_features={out_features} x K={k} in i2_s needs "
            f"M*K/4 + 32 = {need}"
        )


# ---- i2s_matmul -------------------------------------------------------------------------------


def _check_i2s_matmul(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> None:
    op = "i2s_matmul"
    check_tensor(op, "q", q, dtypes=(torch.int8,), ndim=2)
    check_tensor(op, "x_scale", x_scale, dtypes=(torch.float32,), ndim=1)
    check_same_device(op, q=q, x_scale=x_scale, packed=packed)
    if x_scale.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: x_scale must have q.shape[0]={q.shape[0]} elements, got {x_scale.shape[0]}")
    _check_packed(op, packed, out_features, q.shape[1])


@torch.library.custom_op("wrinklefree::i2s_matmul", mutates_args=())
def _i2s_matmul(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_i2s_matmul(q, x_scale, packed, out_features)
    return reference.i2s_matmul(q, x_scale, packed, out_features)


@_i2s_matmul.register_kernel("cpu")
def _i2s_matmul_cpu(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_i2s_matmul(q, x_scale, packed, out_features)
    if not use_native():
        return reference.i2s_matmul(q, x_scale, packed, out_features)
    n, k = q.shape
    out = torch.empty((n, out_features), dtype=torch.float32)
    _C.i2s_matmul(
        q.data_ptr(), x_scale.data_ptr(), n, k, packed.data_ptr(), packed.numel(), out_features, out.data_ptr()
    )
    return out


def _i2s_matmul_reference(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """The reference on the tensors' device. It multiplies in int64, which CUDA matmul does not
    do, so CUDA tensors go through the CPU (the fallback and the "reference" backend only)."""
    if q.device.type == "cpu":
        return reference.i2s_matmul(q, x_scale, packed, out_features)
    out = reference.i2s_matmul(q.cpu(), x_scale.cpu(), packed.cpu(), out_features)
    return out.to(q.device)


@_i2s_matmul.register_kernel("cuda")
def _i2s_matmul_cuda(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_i2s_matmul(q, x_scale, packed, out_features)
    core = cuda_core() if use_native() else None
    if core is None:
        return _i2s_matmul_reference(q, x_scale, packed, out_features)
    n, k = q.shape
    out = torch.empty((n, out_features), dtype=torch.float32, device=q.device)
    # On torch's current stream of q's device: ordered after whatever produced q, x_scale and
    # packed, before whatever reads out (the caching allocator's stream bookkeeping holds).
    stream = torch.cuda.current_stream(q.device).cuda_stream
    core.i2s_matmul(
        q.data_ptr(),
        x_scale.data_ptr(),
        n,
        k,
        packed.data_ptr(),
        packed.numel(),
        out_features,
        out.data_ptr(),
        q.device.index,
        stream,
    )
    return out


@_i2s_matmul.register_fake
def _(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_i2s_matmul(q, x_scale, packed, out_features)
    return q.new_empty((q.shape[0], out_features), dtype=torch.float32)


def i2s_matmul(q: Tensor, x_scale: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """int8 activations times packed I2_S weights.

    ``out[n, m] = float32(D - S) / x_scale[n] * w_scale`` with ``D = sum_k code[m, k] * q[n, k]``
    (codes 0, 1, 2 for -1, 0, +1) and ``S = sum_k q[n, k]`` computed exactly in int32.

    Args:
        q: int8 [N, K], K a multiple of 128 (from :func:`act_quant_int8`).
        x_scale: float32 [N], the activation scales (127 / absmax).
        packed: uint8 [M*K/4 + 32], from ``pack(codes, scale, "i2_s")``.
        out_features: M.
    Returns:
        float32 [N, M].
    """
    return call_op(_i2s_matmul, _i2s_matmul_cpu, _check_i2s_matmul, (q, x_scale, packed, out_features), 3)


# ---- bitlinear_infer --------------------------------------------------------------------------


def _check_bitlinear_infer(x: Tensor, packed: Tensor, out_features: int) -> None:
    op = "bitlinear_infer"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_same_device(op, x=x, packed=packed)
    _check_packed(op, packed, out_features, x.shape[1])


@torch.library.custom_op("wrinklefree::bitlinear_infer", mutates_args=())
def _bitlinear_infer(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_bitlinear_infer(x, packed, out_features)
    return reference.bitlinear_infer(x, packed, out_features)


@_bitlinear_infer.register_kernel("cpu")
def _bitlinear_infer_cpu(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_bitlinear_infer(x, packed, out_features)
    if not use_native():
        return reference.bitlinear_infer(x, packed, out_features)
    n, k = x.shape
    out = torch.empty((n, out_features), dtype=torch.float32)
    _C.bitlinear_infer(
        x.data_ptr(), dtype_code(x), n, k, packed.data_ptr(), packed.numel(), out_features, out.data_ptr()
    )
    return out


@_bitlinear_infer.register_kernel("cuda")
def _bitlinear_infer_cuda(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_bitlinear_infer(x, packed, out_features)
    core = cuda_core() if use_native() else None
    if core is None:
        q, scale = reference.act_quant_int8(x)
        return _i2s_matmul_reference(q, scale, packed, out_features)
    q, scale = quant._act_quant_int8_cuda(x)
    return _i2s_matmul_cuda(q, scale, packed, out_features)


@_bitlinear_infer.register_fake
def _(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    _check_bitlinear_infer(x, packed, out_features)
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def bitlinear_infer(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """BitLinear forward on packed weights: per-row int8 quantization of ``x``, then
    :func:`i2s_matmul`, in one call.

    Args:
        x: float32, bfloat16 or float16 [N, K], contiguous, K a multiple of 128.
        packed: uint8 [M*K/4 + 32] I2_S weights.
        out_features: M.
    Returns:
        float32 [N, M].
    """
    return call_op(_bitlinear_infer, _bitlinear_infer_cpu, _check_bitlinear_infer, (x, packed, out_features), 2)
