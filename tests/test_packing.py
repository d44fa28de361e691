"""pack / unpack for i2_s, tq2_0, tq1_0: hand-worked bytes, the gguf package's quantizer, round trips."""

import struct

import gguf  # noqa: E402
import numpy as np
import pytest
import torch

from wrinklefree import _C, ops
from wrinklefree.ops import reference


def random_codes(m, k):
    return torch.randint(-1, 2, (m, k), dtype=torch.int8)


def test_format_table():
    assert set(ops.FORMATS) == {"i2_s", "tq2_0", "tq1_0"}
    i2s, tq2, tq1 = ops.FORMATS["i2_s"], ops.FORMATS["tq2_0"], ops.FORMATS["tq1_0"]
    assert (i2s.ggml_type, i2s.block_values, i2s.block_bytes, i2s.tail_bytes) == (36, 128, 32, 32)
    # ggml's own ids and sizes for the types it knows
    assert tq2.ggml_type == gguf.GGMLQuantizationType.TQ2_0
    assert tq1.ggml_type == gguf.GGMLQuantizationType.TQ1_0
    assert (tq2.block_values, tq2.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ2_0]
    assert (tq1.block_values, tq1.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ1_0]
    assert i2s.nbytes(3, 256) == 3 * 256 // 4 + 32
    for name, f in ops.FORMATS.items():  # the Python size formula agrees with the core's
        assert f.nbytes(5, 768) == _C.packed_bytes(name, 5, 768)


def test_i2s_hand_worked_bytes():
    # One row of 128 values. Byte b holds values b, 32+b, 64+b, 96+b in bits 7-6, 5-4, 3-2, 1-0,
    # coded -1 -> 0, 0 -> 1, +1 -> 2.
    w = torch.zeros(1, 128)
    w[0, [0, 96, 5, 37, 69, 101]] = 1.0
    w[0, [32, 31, 63, 95, 127]] = -1.0
    codes, scale = ops.ternary_quant(w)
    assert scale.item() == 11 / 128  # mean |w| of 11 ones over 128 values, exact in binary
    packed = ops.pack(codes, scale, "i2_s")
    expected = [0x55] * 32
    expected[0] = 0b10_00_01_10  # +1 (value 0), -1 (32), 0 (64), +1 (96)
    expected[5] = 0b10_10_10_10  # +1 at 5, 37, 69, 101
    expected[31] = 0b00_00_00_00  # -1 at 31, 63, 95, 127
    tail = bytes([0x00, 0x00, 0xB0, 0x3D]) + bytes(28)  # float32 11/128 = 0x3DB00000, little endian
    assert packed.tolist() == expected + list(tail)
    assert struct.unpack("<f", tail[:4])[0] == 11 / 128


@pytest.mark.parametrize("fmt", ["i2_s", "tq2_0", "tq1_0"])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("k", [256, 768, 2560])
def test_pack_matches_reference_and_round_trips(isa, fmt, m, k):
    codes = random_codes(m, k)
    codes[0, :256] = 0  # an all-zero block: its tq scale is 0, as ggml writes it
    scale = torch.tensor(0.0371)
    packed = ops.pack(codes, scale, fmt)
    assert packed.dtype == torch.uint8 and packed.numel() == ops.FORMATS[fmt].nbytes(m, k)
    assert torch.equal(packed, reference.pack(codes, scale, fmt))
    out_codes, out_scale = ops.unpack(packed, (m, k), fmt)
    assert torch.equal(out_codes, codes)
    ref_codes, ref_scale = reference.unpack(packed, (m, k), fmt)
    assert torch.equal(ref_codes, codes) and torch.equal(ref_scale, out_scale)
    if fmt == "i2_s":
        assert out_scale.shape == () and out_scale.item() == scale.item()
    else:
        assert out_scale.shape == (m, k // 256)
        expected = torch.full((m, k // 256), scale.item()).half().float()
        expected[0, 0] = 0.0
        assert torch.equal(out_scale, expected)


@pytest.mark.parametrize("m,k", [(1, 128), (5, 384), (7, 1152)])
def test_i2s_allows_k_multiple_of_128(m, k):
    codes = random_codes(m, k)
    packed = ops.pack(codes, torch.tensor(0.5), "i2_s")
    assert packed.numel() == m * k // 4 + 32
    assert torch.equal(packed, reference.pack(codes, torch.tensor(0.5), "i2_s"))
    assert torch.equal(ops.unpack(packed, (m, k), "i2_s")[0], codes)


@pytest.mark.parametrize("fmt", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("per_block", [False, True])
def test_tq_bytes_equal_gguf_quantizer(fmt, per_block):
    m, k = 6, 768
    codes = random_codes(m, k)
    codes[2, 256:512] = 0
    if per_block:
        scale = torch.rand(m, k // 256) * 0.1 + 0.01
        dense = codes.float() * scale.repeat_interleave(256, dim=1)
    else:
        scale = torch.tensor(0.0271)
        dense = codes.float() * scale
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    expected = gguf.quants.quantize(dense.numpy().astype(np.float32), qtype)
    packed = ops.pack(codes, scale, fmt)
    assert packed.numpy().tobytes() == expected.tobytes()
    # and the gguf package decodes our bytes to the same values
    decoded = gguf.quants.dequantize(packed.numpy().reshape(m, -1), qtype)
    _, unpacked_scale = ops.unpack(packed, (m, k), fmt)
    codes_back, _ = ops.unpack(packed, (m, k), fmt)
    np.testing.assert_array_equal(decoded, (codes_back.float() * unpacked_scale.repeat_interleave(256, 1)).numpy())


@pytest.mark.parametrize("fmt", ["i2_s", "tq2_0", "tq1_0"])
def test_reference_pack_and_unpack_stay_on_the_inputs_device(fmt):
    # The reference is what CUDA tensors are packed with: it must make no tensor of its own on the
    # CPU. The meta device shows that here (mixing it with a CPU tensor fails), and gives the shapes.
    m, k = 3, 512
    codes = torch.zeros(m, k, dtype=torch.int8, device="meta")
    buf = reference.pack(codes, torch.ones((), device="meta"), fmt)
    assert buf.device.type == "meta" and buf.shape == (ops.FORMATS[fmt].nbytes(m, k),)
    out, scale = reference.unpack(buf, (m, k), fmt)
    assert out.device.type == "meta" and out.shape == (m, k) and scale.device.type == "meta"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_unpack_rejects_invalid_codes(backend):
    ops.set_backend(backend)
    try:
        packed = ops.pack(random_codes(2, 128), torch.tensor(1.0), "i2_s")
        packed[32 + 3] = 0xFF  # code 3 is unused in i2_s
        with pytest.raises(ValueError, match="not valid i2_s: row 1 holds the unused 2-bit code 3"):
            ops.unpack(packed, (2, 128), "i2_s")
        packed = ops.pack(random_codes(1, 256), torch.tensor(1.0), "tq2_0")
        packed[0] = 0xFF
        with pytest.raises(ValueError, match="not valid tq2_0"):
            ops.unpack(packed, (1, 256), "tq2_0")
    finally:
        ops.set_backend("native")


@pytest.mark.parametrize("fmt", ["tq2_0", "tq1_0"])
def test_nan_block_scales_keep_their_bits(isa, fmt):
    # hand-worked: a NaN scale goes to fp16 quiet, with the top 10 bits of its payload; an fp16
    # NaN (a signalling one too) comes back quiet with its payload, as vcvtph2ps converts it
    to_half = {0x7FC12345: 0x7E09, 0x7FFFE000: 0x7FFF, 0x7FA00000: 0x7F00, 0xFFC00000: 0xFE00}
    codes = random_codes(1, 256 * len(to_half))
    scales = torch.tensor([np.uint32(b).view(np.int32) for b in to_half], dtype=torch.int32).view(torch.float32)
    packed = ops.pack(codes, scales.view(1, -1), fmt)
    halves = packed.view(len(to_half), -1)[:, -2:].contiguous().view(torch.int16).view(-1).to(torch.int32) & 0xFFFF
    assert halves.tolist() == list(to_half.values())
    to_float = {0x7C01: 0x7FC02000, 0xFC01: 0xFFC02000, 0x7D00: 0x7FE00000, 0x7E09: 0x7FC12000}
    blocks = packed.view(len(to_half), -1)
    blocks[:, -2:] = (
        torch.tensor([np.uint16(h).view(np.int16) for h in to_float], dtype=torch.int16).view(torch.uint8).view(-1, 2)
    )
    _, got = ops.unpack(packed, (1, 256 * len(to_half)), fmt)
    assert [b & 0xFFFFFFFF for b in got.view(torch.int32).view(-1).tolist()] == list(to_float.values())


def test_pack_errors_name_the_argument():
    codes = random_codes(2, 256)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        ops.pack(codes, one, "q4_0")
    with pytest.raises(ValueError, match="i2_s needs K \\(the last dimension\\) to be a multiple of 128, got K=100"):
        ops.pack(random_codes(2, 100), one, "i2_s")
    with pytest.raises(ValueError, match="tq2_0 needs K .* multiple of 256, got K=128"):
        ops.pack(random_codes(2, 128), one, "tq2_0")
    with pytest.raises(TypeError, match="pack: codes must have dtype int8"):
        ops.pack(codes.float(), one, "i2_s")
    with pytest.raises(ValueError, match="pack: codes must be 2-D"):
        ops.pack(codes.view(-1), one, "i2_s")
    with pytest.raises(ValueError, match="codes must be contiguous"):
        ops.pack(random_codes(256, 256).T, one, "i2_s")
    with pytest.raises(ValueError, match="codes must be in \\{-1, 0, 1\\}"):
        ops.pack(torch.full((1, 128), 2, dtype=torch.int8), one, "i2_s")
    with pytest.raises(ValueError, match="scale for i2_s must hold 1 value, got 2"):
        ops.pack(codes, torch.ones(2), "i2_s")
    with pytest.raises(ValueError, match="scale for tq1_0 must hold 1 value or one per block \\(2\\), got 3"):
        ops.pack(codes, torch.ones(3), "tq1_0")
    with pytest.raises(TypeError, match="pack: scale must have dtype float32"):
        ops.pack(codes, torch.tensor(1.0, dtype=torch.float64), "i2_s")


def test_unpack_errors_name_the_argument():
    packed = ops.pack(random_codes(2, 256), torch.tensor(1.0), "i2_s")
    with pytest.raises(ValueError, match="unpack: buf holds 159 bytes; a \\[2, 256\\] i2_s tensor needs 160"):
        ops.unpack(packed[:-1].contiguous(), (2, 256), "i2_s")
    with pytest.raises(TypeError, match="unpack: buf must have dtype uint8"):
        ops.unpack(packed.to(torch.int8), (2, 256), "i2_s")
    with pytest.raises(ValueError, match="shape must be \\[M, K\\]"):
        ops.unpack(packed, (2, 16, 16), "i2_s")
    with pytest.raises(TypeError, match="unpack: shape must be \\[M, K\\] \\(a tuple or list of two ints\\), got int"):
        ops.unpack(packed, 512, "i2_s")
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.unpack(packed, (5, 100), "i2_s")
