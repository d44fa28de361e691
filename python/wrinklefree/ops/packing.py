"""Packed ternary formats: ``pack`` / ``unpack`` for I2_S (bitnet.cpp), TQ2_0 and TQ1_0 (llama.cpp).

The format table itself lives in the C++ core (csrc/cpu/formats.h) and is shared by the packer,
the GGUF writer and the engine; :data:`FORMATS` exposes it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wrinklefree import _C
from wrinklefree.ops import reference
from wrinklefree.ops._backend import call_op, check_same_device, check_tensor, use_native


@dataclass(frozen=True)
class PackedFormat:
    name: str
    ggml_type: int  # GGML tensor type id
    block_values: int  # values per block; the last dimension must be a multiple
    block_bytes: int
    tensor_scale: bool  # one float32 scale per tensor (else one fp16 scale per block)
    tail_bytes: int  # bytes after the blocks (i2_s: scale + padding)

    def nbytes(self, rows: int, cols: int) -> int:
        """Packed size of a [rows, cols] tensor (cols a multiple of block_values).

        Plain Python (no call into the core) so that torch.compile traces through it.
        """
        return rows * (cols // self.block_values) * self.block_bytes + self.tail_bytes


FORMATS: dict[str, PackedFormat] = {f["name"]: PackedFormat(**f) for f in _C.formats()}


def get_format(fmt: str, op: str = "get_format") -> PackedFormat:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{op}: fmt must be one of {sorted(FORMATS)}; got {fmt!r}")
    return FORMATS[fmt]


def _check_shape(op: str, fmt: PackedFormat, rows: int, cols: int) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"{op}: shape must be positive, got [{rows}, {cols}]")
    if cols % fmt.block_values:
        raise ValueError(
            f"{op}: {fmt.name} needs K (the last dimension) to be a multiple of {fmt.block_values}, got K={cols}"
        )


# ---- pack -------------------------------------------------------------------------------------


def _check_pack(codes: Tensor, scale: Tensor, fmt: str) -> PackedFormat:
    op = "pack"
    f = get_format(fmt, op)
    check_tensor(op, "codes", codes, dtypes=(torch.int8,), ndim=2)
    check_tensor(op, "scale", scale, dtypes=(torch.float32,))
    check_same_device(op, codes=codes, scale=scale)
    rows, cols = codes.shape
    _check_shape(op, f, rows, cols)
    n_blocks = rows * cols // f.block_values
    if scale.numel() != 1 and (f.tensor_scale or scale.numel() != n_blocks):
        allowed = "1 value" if f.tensor_scale else f"1 value or one per block ({n_blocks})"
        raise ValueError(f"{op}: scale for {f.name} must hold {allowed}, got {scale.numel()}")
    return f


def _pack_reference(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    if codes.lt(-1).any() or codes.gt(1).any():
        raise ValueError("pack: codes must be in {-1, 0, 1}")
    return reference.pack(codes, scale, fmt)  # device-agnostic torch ops: CUDA codes stay on the GPU


@torch.library.custom_op("wrinklefree::pack", mutates_args=())
def _pack(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    _check_pack(codes, scale, fmt)
    return _pack_reference(codes, scale, fmt)


@_pack.register_kernel("cpu")
def _pack_cpu(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    f = _check_pack(codes, scale, fmt)
    if not use_native():
        return _pack_reference(codes, scale, fmt)
    rows, cols = codes.shape
    out = torch.empty(f.nbytes(rows, cols), dtype=torch.uint8)
    _C.pack(fmt, codes.data_ptr(), rows, cols, scale.data_ptr(), scale.numel(), out.data_ptr())
    return out


@_pack.register_fake
def _(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    f = _check_pack(codes, scale, fmt)
    return codes.new_empty(f.nbytes(*codes.shape), dtype=torch.uint8)


def pack(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """Pack ternary codes into a GGML block format.

    Args:
        codes: int8 [M, K] in {-1, 0, 1}, contiguous; K a multiple of the format's block
            (128 for i2_s, 256 for tq2_0 and tq1_0).
        scale: float32, one value (the tensor scale) or, for tq2_0/tq1_0, one per 256-value block.
            A single scale becomes each block's fp16 scale; a block of zeros gets scale 0, as
            ggml's quantizer writes it.
        fmt: "i2_s", "tq2_0" or "tq1_0".
    Returns:
        uint8 1-D tensor: exactly ``M*K/4 + 32`` bytes for i2_s (codes, float32 scale, 28 zero
        bytes), ``M*K/256`` blocks of 66 (tq2_0) or 54 (tq1_0) bytes.
    """
    return call_op(_pack, _pack_cpu, _check_pack, (codes, scale, fmt), 2)


# ---- unpack -----------------------------------------------------------------------------------


def _check_unpack(buf: Tensor, shape: list[int], fmt: str) -> tuple[PackedFormat, int, int]:
    op = "unpack"
    f = get_format(fmt, op)
    check_tensor(op, "buf", buf, dtypes=(torch.uint8,), ndim=1)
    if len(shape) != 2 or not all(isinstance(s, int) for s in shape):
        raise ValueError(f"{op}: shape must be [M, K] of ints, got {list(shape)}")
    rows, cols = shape
    _check_shape(op, f, rows, cols)
    need = f.nbytes(rows, cols)
    if buf.numel() != need:
        raise ValueError(f"{op}: buf holds {buf.numel()} bytes; a [{rows}, {cols}] {f.name} tensor needs {need}")
    return f, rows, cols


def _unpack_scale_shape(f: PackedFormat, rows: int, cols: int) -> tuple[int, ...]:
    return () if f.tensor_scale else (rows, cols // f.block_values)


@torch.library.custom_op("wrinklefree::unpack", mutates_args=())
def _unpack(buf: Tensor, shape: list[int], fmt: str) -> tuple[Tensor, Tensor]:
    _, rows, cols = _check_unpack(buf, shape, fmt)
    return reference.unpack(buf, (rows, cols), fmt)


@_unpack.register_kernel("cpu")
def _unpack_cpu(buf: Tensor, shape: list[int], fmt: str) -> tuple[Tensor, Tensor]:
    f, rows, cols = _check_unpack(buf, shape, fmt)
    if not use_native():
        return reference.unpack(buf, (rows, cols), fmt)
    codes = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty(_unpack_scale_shape(f, rows, cols), dtype=torch.float32)
    _C.unpack(fmt, buf.data_ptr(), buf.numel(), rows, cols, codes.data_ptr(), scale.data_ptr())
    return codes, scale


@_unpack.register_fake
def _(buf: Tensor, shape: list[int], fmt: str) -> tuple[Tensor, Tensor]:
    f, rows, cols = _check_unpack(buf, shape, fmt)
    return (
        buf.new_empty((rows, cols), dtype=torch.int8),
        buf.new_empty(_unpack_scale_shape(f, rows, cols), dtype=torch.float32),
    )


def unpack(buf: Tensor, shape: tuple[int, int] | list[int], fmt: str) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack`.

    Args:
        buf: uint8 1-D tensor of exactly the packed size of ``shape`` in ``fmt``.
        shape: [M, K] of the packed tensor.
        fmt: "i2_s", "tq2_0" or "tq1_0".
    Returns:
        codes: int8 [M, K] in {-1, 0, 1}.
        scale: float32; 0-dim (the tensor scale) for i2_s, [M, K // 256] for tq2_0/tq1_0.
    """
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"unpack: shape must be [M, K] (a tuple or list of two ints), got {type(shape).__name__}")
    return call_op(_unpack, _unpack_cpu, _check_unpack, (buf, list(shape), fmt), 1)
