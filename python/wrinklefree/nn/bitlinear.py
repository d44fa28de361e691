"""BitLinear: a drop-in nn.Linear with ternary weights and int8 activations (DESIGN.md section 2).

Training: the weight stays a full-precision latent tensor; each forward fake-quantizes the weight
(absmean, per tensor) and the input (absmax int8, per token) with the straight-through estimator,
blended by the warm-up factor of the model's :class:`~wrinklefree.nn.QuantSchedule`. Optionally a
SubLN (RMSNorm) first normalizes the input, and Q-Sparse keeps only the largest inputs.

Once the warm-up is over (``lam = 1``), training runs the fused op :func:`wrinklefree.ops.bitlinear_train`
instead: SubLN and int8 quantization in one pass, the product of int8 activations and ternary
codes accumulated exactly (int8 tensor cores on GPU), and a backward that keeps the int8
activations instead of a float copy of the input. ``WF_FUSED_BITLINEAR=0`` turns it off.

Inference: :meth:`BitLinear.pack` freezes the layer to I2_S codes and scale (about M*K/4 bytes)
and the forward runs the packed matmul kernel of :mod:`wrinklefree.ops`.

:class:`BitLinearLRC` adds a trainable full-precision low-rank correction ``U V^T`` on the
unquantized input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wrinklefree import ops
from wrinklefree.nn.qsparse import QSparse
from wrinklefree.nn.schedule import QuantSchedule
from wrinklefree.nn.subln import SubLN
from wrinklefree.ops.fake_quant import act_fake_quant, ternary_fake_quant

I2S_BLOCK = 128  # I2_S packs the input dim in blocks of this many values
FUSED = os.environ.get("WF_FUSED_BITLINEAR", "1") != "0"


class BitLinear(nn.Linear):
    """``y = Q_a(x) Q_w(W)^T + b`` with ternary ``Q_w`` and int8 ``Q_a`` (fake-quantized, STE).

    Same constructor and state-dict keys as :class:`torch.nn.Linear` (``weight`` [out, in],
    ``bias`` [out]), so a Linear's weights load unchanged; ``isinstance(layer, nn.Linear)`` holds.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        subln: put a SubLN (RMSNorm over ``in_features``, key ``subln.weight``) before the input
            quantization.
        subln_eps: the SubLN epsilon.
        schedule: the shared warm-up schedule; None means fully quantized (``lam = 1``).
        qsparse: a :class:`~wrinklefree.nn.QSparse` applied to the (normalized) input; None: dense.

    Input [..., in_features] of any float dtype; output [..., out_features] in the input's dtype
    (under autocast, in the autocast dtype, as nn.Linear's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        subln: bool = False,
        subln_eps: float = 1e-5,
        schedule: QuantSchedule | None = None,
        qsparse: QSparse | None = None,
    ) -> None:
        if schedule is not None and not isinstance(schedule, QuantSchedule):
            got = type(schedule).__name__
            raise TypeError(f"{type(self).__name__}: schedule must be a QuantSchedule or None, got {got}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.subln = SubLN(in_features, subln_eps, device=device, dtype=dtype) if subln else None
        self.schedule = schedule
        self.qsparse = qsparse
        self.register_buffer("packed", None)  # I2_S bytes once packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> BitLinear:
        """A BitLinear sharing ``linear``'s parameters (no copy; works on the meta device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BitLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, **kwargs)
        layer.weight = w
        if linear.bias is not None:
            layer.bias = linear.bias
        if layer.subln is not None:
            layer.subln = SubLN(layer.in_features, layer.subln.eps, device=w.device, dtype=w.dtype)
        layer.train(linear.training)
        return layer

    # ---- quantization factor ------------------------------------------------------------------

    @property
    def lam(self) -> float | Tensor:
        """The warm-up factor in force: the schedule's tensor, or 1.0 without a schedule."""
        return 1.0 if self.schedule is None else self.schedule.lam

    # ---- forward ------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{type(self).__name__}: input must be a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input last dim must be {self.in_features}, got {tuple(x.shape)}")

    def _empty(self, x: Tensor) -> Tensor:
        """The output for an input with no rows: empty, as nn.Linear's (still in the autograd graph)."""
        y = x.sum(-1, keepdim=True).expand(*x.shape[:-1], self.out_features).to(_out_dtype(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def fully_quantized(self) -> bool:
        """True once the warm-up is over (``lam = 1``), known on the host."""
        return self.schedule is None or self.schedule.full

    def _use_fused(self) -> bool:
        return FUSED and not self.is_packed and self.qsparse is None and self.fully_quantized

    def _fused(self, h: Tensor, norm: SubLN | None) -> Tensor:
        """The fused training op on ``h`` [..., in] (with ``norm`` applied inside, if given)."""
        h2 = _kernel_dtype(h.reshape(-1, self.in_features).contiguous())
        nw = norm.weight if norm is not None else None
        y = ops.bitlinear_train(h2, self.weight, nw, norm.eps if norm is not None else 0.0)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(_out_dtype(h)).reshape(*h.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return self._empty(x)
        if self._use_fused():
            return self._fused(x, self.subln)
        if self.is_packed and self.subln is not None and self.qsparse is None and not _needs_grad(x):
            # inference: SubLN and the int8 quantization in one pass (the fused kernel op)
            x2 = x.reshape(-1, self.in_features).contiguous()
            q, x_scale = ops.rmsnorm_act_quant(_kernel_dtype(x2), self.subln.weight.detach(), self.subln.eps)
            return self._finish(self._i2s_matmul(q, x_scale), x)
        h = self.subln(x) if self.subln is not None else x
        return self._ternary_linear(h).to(_out_dtype(x))  # SubLN returns its weight's dtype

    def _ternary_linear(self, h: Tensor) -> Tensor:
        """The matmul on an already normalized input ``h`` [..., in]: Q-Sparse, then the fake-quantized
        product (training) or the packed kernel (inference)."""
        if self.qsparse is not None:
            h = self.qsparse(h)
        if self.is_packed:
            h2 = _kernel_dtype(h.reshape(-1, self.in_features).contiguous())
            y = _PackedProduct.apply(h2, self) if _needs_grad(h2) else self._packed_product(h2)
            return self._finish(y, h)
        if self._use_fused():
            return self._fused(h, None)
        lam = self.lam
        out_dtype = _out_dtype(h)
        if not torch.is_autocast_enabled(h.device.type):  # a float input of another dtype than the weight's
            h = h.to(self.weight.dtype)
        return F.linear(act_fake_quant(h, lam), ternary_fake_quant(self.weight, lam), self.bias).to(out_dtype)

    # ---- packed inference ---------------------------------------------------------------------

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    @property
    def padded_in_features(self) -> int:
        """``in_features`` rounded up to the I2_S block: packed weights carry zero columns there."""
        return -(-self.in_features // I2S_BLOCK) * I2S_BLOCK

    @torch.no_grad()
    def pack(self) -> BitLinear:
        """Freeze to I2_S: quantize the weight once, keep ``M * K_pad / 4 + 32`` bytes, drop it.

        The input dim is zero-padded to a multiple of 128 where needed (zero codes add nothing).
        The packed layer is for inference (no gradient to the weight); its ``state_dict`` holds
        ``packed`` instead of ``weight``. Returns ``self``.
        """
        if self.is_packed:
            return self
        w = self.weight.detach()
        if w.is_meta:
            raise ValueError(f"{type(self).__name__}.pack: the weight is on the meta device; materialize it first")
        codes, scale = ops.ternary_quant(w.to(torch.float32).contiguous())  # on the weight's device
        pad = self.padded_in_features - self.in_features
        if pad:
            codes = F.pad(codes, (0, pad))
        self._set_packed(ops.pack(codes, scale, "i2_s"))
        return self

    def _set_packed(self, buf: Tensor) -> None:
        """Replace the latent weight by packed I2_S bytes (shape [M * K_pad / 4 + 32], uint8)."""
        expected = self.out_features * self.padded_in_features // 4 + 32
        if buf.dtype != torch.uint8 or buf.shape != (expected,):
            raise ValueError(
                f"{type(self).__name__}: packed must be uint8 [{expected}] for out_features={self.out_features}, "
                f"in_features={self.in_features}, got {buf.dtype} {tuple(buf.shape)}"
            )
        del self.weight
        self.register_parameter("weight", None)
        self.packed = buf

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A packed state dict (``packed`` instead of ``weight``) packs the layer it is loaded into: the
        # weight is dropped and the bytes copied in, checked against this layer's shape.
        packed = state_dict.get(prefix + "packed")
        if packed is not None and not self.is_packed:
            self._set_packed(torch.empty_like(packed, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_ternary(cls, codes: Tensor, scale: float | Tensor, bias: Tensor | None = None, **kwargs) -> BitLinear:
        """A packed layer from ternary ``codes`` int8 [out, in] in {-1, 0, 1} and the weight scale."""
        if codes.dim() != 2:
            raise ValueError(f"BitLinear.from_ternary: codes must be 2-D [out, in], got {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias is not None, **kwargs)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        if layer.subln is not None:
            layer.subln = SubLN(in_features, layer.subln.eps, device=codes.device)
        pad = layer.padded_in_features - in_features
        c = F.pad(codes.to(torch.int8), (0, pad)) if pad else codes.to(torch.int8).contiguous()
        s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device).reshape(())
        layer._set_packed(ops.pack(c, s, "i2_s"))
        return layer.eval()

    def ternary_weight(self) -> tuple[Tensor, Tensor]:
        """``(codes int8 [out, in], scale float32 0-dim)``: what the layer multiplies by."""
        if self.is_packed:
            codes, scale = ops.unpack(self.packed, (self.out_features, self.padded_in_features), "i2_s")
            return codes[:, : self.in_features], scale
        return ops.ternary_quant(self.weight.detach().contiguous())

    def _packed_product(self, h2: Tensor) -> Tensor:
        """float32 [N, out], without the bias: ``h2`` [N, in] (a kernel dtype) times the packed weight."""
        h2 = h2.detach()
        if self.padded_in_features == self.in_features:
            # quantize and multiply in one op call (the same bits as the two ops)
            return ops.bitlinear_infer(h2, self.packed, self.out_features)
        return self._i2s_matmul(*ops.act_quant_int8(h2))

    def _i2s_matmul(self, q: Tensor, x_scale: Tensor) -> Tensor:
        """float32 [N, out], without the bias: int8 rows ``q`` [N, in] times the packed weight."""
        pad = self.padded_in_features - self.in_features
        if pad:
            q = F.pad(q, (0, pad))
        return ops.i2s_matmul(q, x_scale, self.packed, self.out_features)

    def _finish(self, y: Tensor, like: Tensor) -> Tensor:
        """The packed product ``y`` float32 [N, out] plus bias, shaped and typed like ``like``."""
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(_out_dtype(like)).reshape(*like.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.is_packed:
            s += ", packed=i2_s"
        return s


class _PackedProduct(torch.autograd.Function):
    """A packed layer's product for an input that needs a gradient: the input gets the straight-through
    gradient of DESIGN.md section 2 (the int8 quantization passes it unchanged), through the
    dequantized ternary weight, as from a frozen layer; the weight itself gets none."""

    @staticmethod
    def forward(ctx, h2: Tensor, layer: BitLinear) -> Tensor:
        ctx.layer, ctx.dtype = layer, h2.dtype
        return layer._packed_product(h2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        codes, scale = ctx.layer.ternary_weight()
        return (grad.to(torch.float32) @ (codes.to(torch.float32) * scale)).to(ctx.dtype), None


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _out_dtype(x: Tensor) -> torch.dtype:
    """The output dtype for input ``x``: its own, or the autocast dtype where autocast is on (as nn.Linear)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _kernel_dtype(x: Tensor) -> Tensor:
    """``x`` in a dtype the kernels take (float32, bfloat16, float16)."""
    return x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.to(torch.float32)


class BitLinearLRC(BitLinear):
    """BitLinear plus a trainable full-precision low-rank correction on the unquantized input:
    ``y = BitLinear(x) + (h V^T) U^T`` with ``h`` the input after SubLN, ``V`` = ``lrc_v``
    [rank, in] and ``U`` = ``lrc_u`` [out, rank].

    ``U`` starts at zero, so wrapping a BitLinear does not change its function; ``V`` starts
    random so that ``U`` gets a gradient from the first step.

    Args:
        rank: an int >= 1, or a float in (0, 1] taken as a fraction of ``min(in, out)``.
        Others as :class:`BitLinear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rank: int | float = 0.1, **kwargs) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype, **kwargs)
        self.rank = lrc_rank(rank, in_features, out_features)
        self.lrc_v = nn.Parameter(torch.empty(self.rank, in_features, device=device, dtype=dtype))
        self.lrc_u = nn.Parameter(torch.empty(out_features, self.rank, device=device, dtype=dtype))
        self.reset_lrc()

    def reset_lrc(self) -> None:
        if self.lrc_v.is_meta:
            return
        nn.init.kaiming_uniform_(self.lrc_v, a=math.sqrt(5))
        nn.init.zeros_(self.lrc_u)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, rank: int | float) -> BitLinearLRC:
        """Wrap ``layer`` (sharing its weight, bias and SubLN) with a zero-initialized correction."""
        if layer.is_packed:
            raise ValueError("BitLinearLRC.from_bitlinear: add the correction before packing")
        w = layer.weight
        with torch.device("meta"):
            new = cls(layer.in_features, layer.out_features, layer.bias is not None, dtype=w.dtype, rank=rank)
        new.weight, new.bias, new.subln = layer.weight, layer.bias, layer.subln
        new.schedule, new.qsparse = layer.schedule, layer.qsparse
        new.lrc_v = nn.Parameter(torch.empty(new.rank, layer.in_features, device=w.device, dtype=w.dtype))
        new.lrc_u = nn.Parameter(torch.empty(layer.out_features, new.rank, device=w.device, dtype=w.dtype))
        new.reset_lrc()
        new.train(layer.training)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | float = 0.1, **kwargs) -> BitLinearLRC:
        """A BitLinearLRC sharing ``linear``'s parameters, with a zero-initialized correction."""
        return cls.from_bitlinear(BitLinear.from_linear(linear, **kwargs), rank)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return self._empty(x)
        h = self.subln(x) if self.subln is not None else x  # normalized once, for both paths
        # the fused op normalizes inside, as a plain BitLinear does, so a zero U changes nothing
        y = self._fused(x, self.subln) if self._use_fused() else self._ternary_linear(h).to(_out_dtype(x))
        return y + F.linear(F.linear(h.to(self.lrc_v.dtype), self.lrc_v), self.lrc_u).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def lrc_rank(rank: int | float, in_features: int, out_features: int) -> int:
    """The LRC rank: an int as given, a float as a fraction of ``min(in, out)`` (at least 1)."""
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int or a float fraction, got {type(rank).__name__}")
    if isinstance(rank, int):
        if not 1 <= rank <= limit:
            raise ValueError(f"rank must be in [1, min(in, out)={limit}], got {rank}")
        return rank
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"rank as a fraction must be in (0, 1], got {rank}")
    return max(1, round(rank * limit))


# ---- model-wide helpers -----------------------------------------------------------------------


def bitlinear_modules(model: nn.Module) -> Iterator[tuple[str, BitLinear]]:
    """``(name, layer)`` for every BitLinear in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            yield name, m


def set_schedule(model: nn.Module, schedule: QuantSchedule | None) -> QuantSchedule | None:
    """Make every BitLinear (and its Q-Sparse) in ``model`` read ``schedule``; returns it."""
    if schedule is not None and not isinstance(schedule, QuantSchedule):
        raise TypeError(f"set_schedule: schedule must be a QuantSchedule or None, got {type(schedule).__name__}")
    for _, m in bitlinear_modules(model):
        m.schedule = schedule
        if m.qsparse is not None:
            m.qsparse.schedule = schedule
    return schedule


@torch.no_grad()
def pack_model(model: nn.Module) -> nn.Module:
    """Pack every BitLinear of ``model`` to I2_S for inference (see :meth:`BitLinear.pack`)."""
    for _, m in bitlinear_modules(model):
        m.pack()
    return model.eval()


@torch.no_grad()
def reset_added_parameters(model: nn.Module) -> nn.Module:
    """Initialize what :func:`~wrinklefree.convert` adds to a model: SubLN gains to one, LRC factors as
    :class:`BitLinearLRC` starts them. For a model converted on the meta device and then materialized
    with ``to_empty``, whose new parameters hold garbage until then (a checkpoint that holds them makes
    this unnecessary). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, SubLN):
            m.reset_parameters()
        elif isinstance(m, BitLinearLRC):
            m.reset_lrc()
    return model
