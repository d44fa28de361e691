"""Quantization ops: ternary weights, int8 activations, fused RMSNorm + int8 activations.

Each op is a ``torch.library`` custom op (``torch.ops.wrinklefree.<name>``) with a fake kernel, so
it traces under torch.compile. The CPU kernel is the compiled C++ core. On CUDA the ops run the
Triton kernels of :mod:`wrinklefree.triton_kernels` where Triton is installed, else the compiled
CUDA core (``wrinklefree._C_cuda``) where it has the op, else the plain-PyTorch reference. All
backends give the same bits (see :mod:`wrinklefree.ops.reference`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from wrinklefree import _C
from wrinklefree.ops import reference
from wrinklefree.ops._backend import (
    FLOAT_DTYPES,
    call_op,
    check_same_device,
    check_tensor,
    cuda_core,
    dtype_code,
    triton_for,
    use_native,
)

# ---- ternary_quant ----------------------------------------------------------------------------


def _check_ternary_quant(w: Tensor) -> None:
    check_tensor("ternary_quant", "w", w, dtypes=FLOAT_DTYPES, ndim=2)


@torch.library.custom_op("wrinklefree::ternary_quant", mutates_args=())
def _ternary_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_ternary_quant(w)
    return reference.ternary_quant(w)


@_ternary_quant.register_kernel("cpu")
def _ternary_quant_cpu(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_ternary_quant(w)
    if not use_native():
        return reference.ternary_quant(w)
    codes = torch.empty(w.shape, dtype=torch.int8)
    s = _C.ternary_quant(w.data_ptr(), dtype_code(w), w.numel(), codes.data_ptr())
    return codes, torch.tensor(s, dtype=torch.float32)


@_ternary_quant.register_kernel("cuda")
def _ternary_quant_cuda(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_ternary_quant(w)
    tk = triton_for(w)
    if tk is not None:
        return tk.quant.ternary_quant(w)
    core = cuda_core() if use_native() else None
    if core is None:
        return reference.ternary_quant(w)
    n = w.numel()
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device)
    workspace = torch.empty(core.ternary_quant_workspace(n), dtype=torch.float64, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    core.ternary_quant(w.data_ptr(), dtype_code(w), n, codes.data_ptr(), scale.data_ptr(), workspace.data_ptr(),
                       workspace.numel(), w.device.index, stream)  # fmt: skip
    return codes, scale


@_ternary_quant.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_ternary_quant(w)
    return torch.empty_like(w, dtype=torch.int8), w.new_empty((), dtype=torch.float32)


def ternary_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization of a weight matrix (DESIGN.md section 2).

    Args:
        w: float32, bfloat16 or float16 [M, K], contiguous.
    Returns:
        codes: int8 [M, K] in {-1, 0, 1}.
        scale: float32 0-dim tensor, ``max(mean|w|, 1e-5)``; ``codes * scale`` dequantizes.
    """
    return call_op(_ternary_quant, _ternary_quant_cpu, _check_ternary_quant, (w,), 1)


# ---- act_quant_int8 ---------------------------------------------------------------------------


def _check_act_quant(x: Tensor) -> None:
    check_tensor("act_quant_int8", "x", x, dtypes=FLOAT_DTYPES, ndim=2)


@torch.library.custom_op("wrinklefree::act_quant_int8", mutates_args=())
def _act_quant_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_act_quant(x)
    return reference.act_quant_int8(x)


@_act_quant_int8.register_kernel("cpu")
def _act_quant_int8_cpu(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_act_quant(x)
    if not use_native():
        return reference.act_quant_int8(x)
    n, k = x.shape
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    _C.act_quant_int8(x.data_ptr(), dtype_code(x), n, k, q.data_ptr(), scale.data_ptr())
    return q, scale


@_act_quant_int8.register_kernel("cuda")
def _act_quant_int8_cuda(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_act_quant(x)
    tk = triton_for(x)
    if tk is not None:
        return tk.quant.act_quant_int8(x)
    core = cuda_core() if use_native() else None
    if core is None:
        return reference.act_quant_int8(x)
    n, k = x.shape
    q = torch.empty((n, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    # The kernel runs on torch's current stream of x's device, so it is ordered after whatever
    # produced x and before whatever reads q, and the caching allocator's stream bookkeeping holds.
    stream = torch.cuda.current_stream(x.device).cuda_stream
    core.act_quant_int8(x.data_ptr(), dtype_code(x), n, k, q.data_ptr(), scale.data_ptr(), x.device.index, stream)
    return q, scale


@_act_quant_int8.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_act_quant(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def act_quant_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization of activations (DESIGN.md section 2).

    Args:
        x: float32, bfloat16 or float16 [N, K], contiguous.
    Returns:
        q: int8 [N, K], ``clamp(round(x * scale), -128, 127)``.
        scale: float32 [N], ``127 / max(max|x|, 1e-5)``; ``q / scale`` dequantizes.
    """
    return call_op(_act_quant_int8, _act_quant_int8_cpu, _check_act_quant, (x,), 1)


# ---- rmsnorm_act_quant ------------------------------------------------------------------------


def _check_rmsnorm_act_quant(x: Tensor, weight: Tensor, eps: float) -> None:
    op = "rmsnorm_act_quant"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, ndim=1)
    check_same_device(op, x=x, weight=weight)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: weight must have x.shape[1]={x.shape[1]} elements, got {weight.shape[0]}")
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


@torch.library.custom_op("wrinklefree::rmsnorm_act_quant", mutates_args=())
def _rmsnorm_act_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_rmsnorm_act_quant(x, weight, eps)
    return reference.rmsnorm_act_quant(x, weight, eps)


@_rmsnorm_act_quant.register_kernel("cpu")
def _rmsnorm_act_quant_cpu(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_rmsnorm_act_quant(x, weight, eps)
    if not use_native():
        return reference.rmsnorm_act_quant(x, weight, eps)
    return _rmsnorm_act_quant_native_cpu(x, weight, eps, None)


def _rmsnorm_act_quant_native_cpu(
    x: Tensor, weight: Tensor, eps: float, inv_rms: Tensor | None
) -> tuple[Tensor, Tensor]:
    n, k = x.shape
    w32 = weight.to(torch.float32).contiguous()
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    inv_ptr = inv_rms.data_ptr() if inv_rms is not None else 0
    _C.rmsnorm_act_quant(
        x.data_ptr(), dtype_code(x), w32.data_ptr(), n, k, float(eps), q.data_ptr(), scale.data_ptr(), inv_ptr
    )
    return q, scale


@_rmsnorm_act_quant.register_kernel("cuda")
def _rmsnorm_act_quant_cuda(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_rmsnorm_act_quant(x, weight, eps)
    tk = triton_for(x)
    if tk is not None:
        return tk.quant.rmsnorm_act_quant(x, weight, eps)[:2]
    return reference.rmsnorm_act_quant(x, weight, eps)


@_rmsnorm_act_quant.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_rmsnorm_act_quant(x, weight, eps)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def rmsnorm_act_quant(x: Tensor, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """RMSNorm followed by per-row int8 quantization, fused (the SubLN -> BitLinear input).

    ``y = (x * inv_rms) * weight`` in float32 with ``inv_rms = 1 / sqrt(mean(x^2) + eps)``
    (mean in float64, fixed order), then :func:`act_quant_int8` of ``y``; ``y`` is never stored.

    Args:
        x: float32, bfloat16 or float16 [N, K], contiguous.
        weight: float [K], the norm's gain.
        eps: added to the mean square, >= 0.
    Returns:
        ``(q int8 [N, K], scale float32 [N])`` as :func:`act_quant_int8`.
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"rmsnorm_act_quant: eps must be a float, got {type(eps).__name__}")
    args = (x, weight, float(eps))
    return call_op(_rmsnorm_act_quant, _rmsnorm_act_quant_cpu, _check_rmsnorm_act_quant, args, 2)


def rmsnorm_act_quant_with_inv(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rmsnorm_act_quant` plus each row's ``inv_rms`` float32 [N] (what the RMSNorm's backward
    needs), taken from the same pass where the kernel gives it. For use inside other ops' kernels:
    it calls the kernels directly, not through the dispatcher."""
    _check_rmsnorm_act_quant(x, weight, eps)
    if use_native() and x.is_cpu:
        inv = torch.empty(x.shape[0], dtype=torch.float32)
        return (*_rmsnorm_act_quant_native_cpu(x, weight, eps, inv), inv)
    tk = triton_for(x)
    if tk is not None:
        return tk.quant.rmsnorm_act_quant(x, weight, eps)
    return (*rmsnorm_act_quant(x, weight, eps), reference.rms_inv(x, eps))
