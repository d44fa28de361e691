"""Fused training ops: the fully quantized BitLinear and BitNet's ``relu(gate)^2 * up``.

``bitlinear_train(x, weight, norm_weight, eps)`` is a training BitLinear once the quantization
warm-up is over (``lam = 1``): optional RMSNorm (the SubLN), int8 activations, ternary weight,
the product accumulated exactly in int32, float32 result. Its backward is the straight-through
estimator of DESIGN.md section 2: ``dx = dy @ (codes * s_w)`` (through the RMSNorm, if any) and
``dW = dy^T @ (q / s_x)``, computed from the int8 activations saved by the forward, so a layer keeps
K bytes per token for its backward instead of a float copy of its input.

Kernels: the quantizer ops (on CUDA their Triton kernels), then on CUDA the Triton matmuls of
:mod:`wrinklefree.triton_kernels` (int8 tensor cores for the forward), elsewhere (and where Triton
is missing) the float32 matmuls of the reference, which give the same forward bits
(:func:`wrinklefree.ops.reference.int8_matmul`). Both are
``torch.library`` custom ops with fake kernels and registered autograd, so they trace under
torch.compile and work on FSDP2-sharded modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wrinklefree.ops import reference
from wrinklefree.ops._backend import FLOAT_DTYPES, check_same_device, check_tensor, triton_for
from wrinklefree.ops.quant import act_quant_int8, rmsnorm_act_quant_with_inv, ternary_quant

_EMPTY = (0,)


def _check(x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float) -> None:
    op = "bitlinear_train"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: weight must be [out, {x.shape[1]}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if norm_weight is not None:
        check_tensor(op, "norm_weight", norm_weight, dtypes=FLOAT_DTYPES, ndim=1)
        if norm_weight.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: norm_weight must have {x.shape[1]} elements, got {norm_weight.shape[0]}")
        check_same_device(op, x=x, weight=weight, norm_weight=norm_weight)
    else:
        check_same_device(op, x=x, weight=weight)
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


# ---- forward ----------------------------------------------------------------------------------


@torch.library.custom_op("wrinklefree::bitlinear_train_fwd", mutates_args=())
def _fwd(
    x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y float32 [N, M], q int8 [N, K], x_scale [N], inv_rms [N] or [0], codes int8
    [M, K], w_scale 0-dim)``; everything after ``y`` is saved for the backward."""
    _check(x, weight, norm_weight, eps)
    if norm_weight is not None:
        q, x_scale, inv = rmsnorm_act_quant_with_inv(x, norm_weight, eps)
    else:
        q, x_scale = act_quant_int8(x)
        inv = x.new_empty(_EMPTY, dtype=torch.float32)
    codes, w_scale = ternary_quant(weight)
    tk = triton_for(x)
    if tk is not None:
        y = tk.bitlinear.forward(q, codes, x_scale, w_scale, torch.float32)
    else:
        y = reference.int8_matmul(q, codes, x_scale, w_scale)
    return y, q, x_scale, inv, codes, w_scale


@_fwd.register_fake
def _(x, weight, norm_weight, eps):
    _check(x, weight, norm_weight, eps)
    n, k = x.shape
    m = weight.shape[0]
    f32 = torch.float32
    inv = x.new_empty((n,) if norm_weight is not None else _EMPTY, dtype=f32)
    return (x.new_empty((n, m), dtype=f32), x.new_empty((n, k), dtype=torch.int8), x.new_empty((n,), dtype=f32), inv,
            weight.new_empty((m, k), dtype=torch.int8), weight.new_empty((), dtype=f32))  # fmt: skip


# ---- backward ---------------------------------------------------------------------------------


@torch.library.custom_op("wrinklefree::bitlinear_train_bwd", mutates_args=())
def _bwd(
    dy: Tensor,
    x: Tensor | None,
    x_dtype: torch.dtype,
    norm_weight: Tensor | None,
    q: Tensor,
    x_scale: Tensor,
    inv_rms: Tensor,
    codes: Tensor,
    w_scale: Tensor,
    weight_dtype: torch.dtype,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx [N, K] in x_dtype, dW [M, K] in weight_dtype or [0], d norm_weight float32 [K] or [0])``;
    ``x`` (the forward input) is needed, and passed, only with a ``norm_weight``."""
    has_norm = norm_weight is not None
    tk = triton_for(dy)

    def empty() -> Tensor:  # a fresh one per output: a custom op's outputs may not alias each other
        return dy.new_empty(_EMPTY, dtype=torch.float32)

    if tk is not None:
        dh = tk.bitlinear.grad_input(dy, codes, w_scale, torch.float32 if has_norm else x_dtype)
        dw = tk.bitlinear.grad_weight(dy, q, x_scale, weight_dtype) if need_weight_grad else empty()
        if not has_norm:
            return dh, dw, empty()
        dx, dnorm = tk.quant.rmsnorm_backward(dh, x, norm_weight, inv_rms)
        return dx, dw, dnorm
    dx, dw, dnorm = reference.bitlinear_grads(
        dy, x, norm_weight, q, x_scale, inv_rms if has_norm else None, codes, w_scale, need_weight_grad=need_weight_grad
    )
    dw = dw.to(weight_dtype) if need_weight_grad else empty()
    return dx.to(x_dtype), dw, dnorm if has_norm else empty()


@_bwd.register_fake
def _(dy, x, x_dtype, norm_weight, q, x_scale, inv_rms, codes, w_scale, weight_dtype, need_weight_grad):
    m, k = codes.shape
    f32 = torch.float32
    dw = dy.new_empty((m, k) if need_weight_grad else _EMPTY, dtype=weight_dtype if need_weight_grad else f32)
    dnorm = dy.new_empty((k,) if norm_weight is not None else _EMPTY, dtype=f32)
    return dy.new_empty((dy.shape[0], k), dtype=x_dtype), dw, dnorm


def _setup_context(ctx, inputs, output) -> None:
    x, weight, norm_weight, eps = inputs
    _, q, x_scale, inv, codes, w_scale = output
    # x is needed only to differentiate the RMSNorm; without one the int8 q is all that is kept
    ctx.save_for_backward(x if norm_weight is not None else None, norm_weight, q, x_scale, inv, codes, w_scale)
    ctx.weight_dtype, ctx.x_dtype = weight.dtype, x.dtype
    ctx.mark_non_differentiable(q, x_scale, inv, codes, w_scale)


def _backward(ctx, dy, *_unused):
    x, norm_weight, q, x_scale, inv, codes, w_scale = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1]
    dx, dw, dnorm = _bwd(
        dy.contiguous(), x, ctx.x_dtype, norm_weight, q, x_scale, inv, codes, w_scale, ctx.weight_dtype, need_w
    )
    return dx, (dw if need_w else None), (dnorm.to(norm_weight.dtype) if norm_weight is not None else None), None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def bitlinear_train(x: Tensor, weight: Tensor, norm_weight: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """A training BitLinear at full quantization, with the straight-through backward.

    Args:
        x: float [N, K] (float32, bfloat16, float16), contiguous.
        weight: the latent full-precision weight [M, K]; quantized to ternary on every call.
        norm_weight: the SubLN gain [K] to apply (fused) before the int8 quantization, or None.
        eps: the SubLN epsilon.
    Returns:
        float32 [N, M]: ``(int32(q @ codes^T) / s_x) * s_w``, equal to
        :func:`wrinklefree.ops.reference.bitlinear_train_forward` bit for bit.
    """
    return _fwd(x, weight, norm_weight, float(eps))[0]


# ---- relu(gate)^2 * up -------------------------------------------------------------------------


def _check_glu(gate: Tensor, up: Tensor) -> None:
    check_tensor("relu2_glu", "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("relu2_glu", "up", up, dtypes=(gate.dtype,))
    if gate.shape != up.shape:
        raise ValueError(f"relu2_glu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    check_same_device("relu2_glu", gate=gate, up=up)


@torch.library.custom_op("wrinklefree::relu2_glu", mutates_args=())
def _relu2_glu(gate: Tensor, up: Tensor) -> Tensor:
    _check_glu(gate, up)
    tk = triton_for(gate)
    if tk is not None:
        return tk.glu.relu2_glu(gate, up)
    return reference.relu2_glu(gate, up)


@_relu2_glu.register_fake
def _(gate, up):
    _check_glu(gate, up)
    return torch.empty_like(gate)


@torch.library.custom_op("wrinklefree::relu2_glu_bwd", mutates_args=())
def _relu2_glu_bwd(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    tk = triton_for(gate)
    if tk is not None:
        return tk.glu.relu2_glu_backward(dh, gate, up)
    return reference.relu2_glu_backward(dh, gate, up)


@_relu2_glu_bwd.register_fake
def _(dh, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _glu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _glu_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return _relu2_glu_bwd(dh.contiguous(), gate, up)


_relu2_glu.register_autograd(_glu_backward, setup_context=_glu_setup)


def relu2_glu(gate: Tensor, up: Tensor) -> Tensor:
    """``relu(gate)^2 * up`` (BitNet's gated FFN activation), computed in float32, returned in the
    inputs' dtype; the backward recomputes ``relu(gate)`` instead of saving the product.

    Args:
        gate, up: float tensors of one shape and dtype, contiguous.
    """
    return _relu2_glu(gate, up)
