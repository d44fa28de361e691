"""i2s_matmul and bitlinear_infer against the reference (bit for bit) and against float math; the
engine's TQ1_0 matmul against i2s_matmul."""

import pytest
import torch

from wrinklefree import _C, ops
from wrinklefree.ops import reference


def packed_weight(m, k, scale=0.043):
    codes = torch.randint(-1, 2, (m, k), dtype=torch.int8)
    return codes, ops.pack(codes, torch.tensor(scale), "i2_s")


def int8_acts(n, k):
    x = torch.randn(n, k) * torch.logspace(-2, 1, n).unsqueeze(1)
    return ops.act_quant_int8(x)


@pytest.mark.parametrize("n", [1, 3, 17, 45, 128])
@pytest.mark.parametrize("m", [1, 7, 33, 65])
@pytest.mark.parametrize("k", [128, 384, 640, 2560])
def test_i2s_matmul_matches_reference(isa, n, m, k):
    _, packed = packed_weight(m, k)
    q, x_scale = int8_acts(n, k)
    out = ops.i2s_matmul(q, x_scale, packed, m)
    assert out.dtype == torch.float32 and out.shape == (n, m)
    assert torch.equal(out, reference.i2s_matmul(q, x_scale, packed, m))


def test_i2s_matmul_extreme_activations(isa):
    # all -128 / all 127 rows and codes all -1 / all +1: the largest int32 sums the kernel meets
    k, m = 6912, 4
    codes = torch.tensor([-1, 1, 0, -1], dtype=torch.int8).repeat_interleave(k).view(m, k).contiguous()
    packed = ops.pack(codes, torch.tensor(1.0), "i2_s")
    q = torch.stack([torch.full((k,), -128), torch.full((k,), 127)]).to(torch.int8)
    out = ops.i2s_matmul(q, torch.ones(2), packed, m)
    assert out.tolist() == [[128.0 * k, -128.0 * k, 0.0, 128.0 * k], [-127.0 * k, 127.0 * k, 0.0, -127.0 * k]]
    assert torch.equal(out, reference.i2s_matmul(q, torch.ones(2), packed, m))
    for row in range(2):  # one row takes the decode (GEMV) path, which accumulates differently
        assert torch.equal(ops.i2s_matmul(q[row : row + 1], torch.ones(1), packed, m), out[row : row + 1])
    # and many rows the prefill path, which unpacks the weights first
    assert torch.equal(ops.i2s_matmul(q.repeat(20, 1), torch.ones(40), packed, m), out.repeat(20, 1))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n", [9, 40])
def test_i2s_matmul_independent_of_threads(threads, n_threads, n):
    _, packed = packed_weight(91, 1152)
    q, x_scale = int8_acts(n, 1152)
    expected = reference.i2s_matmul(q, x_scale, packed, 91)
    ops.set_num_threads(n_threads)
    assert torch.equal(ops.i2s_matmul(q, x_scale, packed, 91), expected)


def test_i2s_matmul_equals_dequantized_float_matmul():
    codes, packed = packed_weight(40, 512, scale=0.02)
    q, x_scale = int8_acts(5, 512)
    dense = (q.double() / x_scale.double()[:, None]) @ (codes.double() * 0.02).T
    torch.testing.assert_close(ops.i2s_matmul(q, x_scale, packed, 40).double(), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_bitlinear_infer_is_act_quant_then_matmul(isa, dtype, n):
    _, packed = packed_weight(33, 640)
    x = torch.randn(n, 640).to(dtype)
    q, x_scale = reference.act_quant_int8(x)
    expected = reference.i2s_matmul(q, x_scale, packed, 33)
    assert torch.equal(ops.bitlinear_infer(x, packed, 33), expected)
    assert torch.equal(reference.bitlinear_infer(x, packed, 33), expected)


def test_bitlinear_infer_approximates_linear():
    # a ternary weight times int8-quantized activations stays close to the float product
    w = torch.randn(64, 1024) * 0.02
    codes, scale = ops.ternary_quant(w)
    packed = ops.pack(codes, scale, "i2_s")
    x = torch.randn(4, 1024)
    exact = x @ (codes.float() * scale).T
    out = ops.bitlinear_infer(x, packed, 64)
    assert ((out - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.parametrize("n", [1, 2, 5])
def test_i2s_matmul_long_rows_do_not_overflow(isa, n):
    # K = 2^19 + 128: the one-row AVX-512 path keeps its four sub-block sums shifted left by up
    # to 6 bits; with codes +1 and -1 against -128 everywhere, the shifted whole-row sum is past
    # 2^31, so the lanes must be shifted back before they are added up
    k = (1 << 19) + 128
    codes = torch.stack([torch.ones(k), -torch.ones(k), torch.zeros(k)]).to(torch.int8)
    packed = ops.pack(codes, torch.tensor(1.0), "i2_s")
    q = torch.full((n, k), -128, dtype=torch.int8)
    if n > 1:
        q[-1, ::3] = 127
    x_scale = torch.ones(n)
    assert torch.equal(ops.i2s_matmul(q, x_scale, packed, 3), reference.i2s_matmul(q, x_scale, packed, 3))
    assert ops.i2s_matmul(q[:1], x_scale[:1], packed, 3).tolist() == [[-128.0 * k, 128.0 * k, 0.0]]


def test_i2s_matmul_longest_row():
    # K = 2^22 is the limit (no int32 sum can overflow up to it); one block more is refused
    k = 1 << 22
    packed = ops.pack(torch.ones(1, k, dtype=torch.int8), torch.tensor(1.0), "i2_s")
    assert ops.i2s_matmul(torch.full((1, k), -128, dtype=torch.int8), torch.ones(1), packed, 1).item() == -128.0 * k
    k += 128
    packed = torch.zeros(k // 4 + 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at most 2\\^22"):
        ops.i2s_matmul(torch.zeros(1, k, dtype=torch.int8), torch.ones(1), packed, 1)
    with pytest.raises(ValueError, match="at most 2\\^22"):
        ops.bitlinear_infer(torch.zeros(1, k), packed, 1)
    with pytest.raises(ValueError, match="limit of 2\\^22"):  # the core checks it too
        _C.i2s_matmul(0, 0, 1, k, 0, packed.numel(), 1, 0)


def test_matmul_errors_name_the_argument():
    _, packed = packed_weight(8, 256)
    q, x_scale = int8_acts(2, 256)
    with pytest.raises(ValueError, match="packed holds 95 bytes; out_features=8 x K=256 in i2_s needs"):
        ops.i2s_matmul(q, x_scale, packed[:95].contiguous(), 8)
    with pytest.raises(ValueError, match="packed holds 544 bytes; out_features=7"):
        ops.i2s_matmul(q, x_scale, packed, 7)
    with pytest.raises(TypeError, match="i2s_matmul: q must have dtype int8"):
        ops.i2s_matmul(q.float(), x_scale, packed, 8)
    with pytest.raises(ValueError, match="x_scale must have q.shape\\[0\\]=2 elements, got 1"):
        ops.i2s_matmul(q, x_scale[:1], packed, 8)
    with pytest.raises(TypeError, match="x_scale must have dtype float32"):
        ops.i2s_matmul(q, x_scale.double(), packed, 8)
    with pytest.raises(ValueError, match="multiple of 128, got K=200"):
        ops.i2s_matmul(q[:, :200].contiguous(), x_scale, packed, 8)
    with pytest.raises(ValueError, match="q must be contiguous"):
        ops.i2s_matmul(torch.zeros(256, 2, dtype=torch.int8).T, x_scale, packed, 8)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        ops.i2s_matmul(q, x_scale, packed, 0)
    with pytest.raises(ValueError, match="out_features must be a positive int, got True"):
        ops.i2s_matmul(q, x_scale, packed, True)
    with pytest.raises(ValueError, match="all tensors must be on one device, got q on cpu, x_scale on meta"):
        ops.i2s_matmul(q, x_scale.to("meta"), packed, 8)
    with pytest.raises(TypeError, match="bitlinear_infer: x must have dtype float32, bfloat16"):
        ops.bitlinear_infer(torch.ones(2, 256, dtype=torch.float64), packed, 8)
    with pytest.raises(ValueError, match="bitlinear_infer: x must be 2-D"):
        ops.bitlinear_infer(torch.ones(256), packed, 8)


# ---- TQ1_0: the engine's matmul over llama.cpp's 1.69-bit format (wrinklefree._C.tq1_0_matmul) ----


def tq1_0_matmul(q, x_scale, packed, m, w_scale):
    n, k = q.shape
    out = torch.empty(n, m)
    _C.tq1_0_matmul(
        q.data_ptr(), x_scale.data_ptr(), n, k, packed.data_ptr(), packed.numel(), m, w_scale, out.data_ptr()
    )
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 17, 33, 128])
@pytest.mark.parametrize("m", [1, 7, 33, 65])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 10, 27])  # 256 values each: K = 2560 is 10, 6912 is 27
def test_tq1_0_matmul_equals_i2s(isa, n, m, blocks):
    # the same codes in both formats: the same integer sums, the same float step, the same bits
    k = 256 * blocks
    codes, i2s = packed_weight(m, k)
    tq1 = ops.pack(codes, torch.tensor(0.043), "tq1_0")
    q, x_scale = int8_acts(n, k)
    assert torch.equal(tq1_0_matmul(q, x_scale, tq1, m, 0.043), reference.i2s_matmul(q, x_scale, i2s, m))


def test_tq1_0_matmul_extreme_activations(isa):
    # -128 / 127 everywhere against codes all -1 / all +1 / 0: the largest sums of the base-3 bytes
    k, m = 6912, 4
    codes = torch.tensor([-1, 1, 0, -1], dtype=torch.int8).repeat_interleave(k).view(m, k).contiguous()
    tq1 = ops.pack(codes, torch.tensor(1.0), "tq1_0")
    q = torch.stack([torch.full((k,), -128), torch.full((k,), 127)]).to(torch.int8)
    want = [[128.0 * k, -128.0 * k, 0.0, 128.0 * k], [-127.0 * k, 127.0 * k, 0.0, -127.0 * k]]
    assert tq1_0_matmul(q, torch.ones(2), tq1, m, 1.0).tolist() == want
    for row in range(2):  # the one-row path
        assert tq1_0_matmul(q[row : row + 1], torch.ones(1), tq1, m, 1.0).tolist() == want[row : row + 1]


def test_tq1_0_matmul_bad_sizes():
    codes, _ = packed_weight(3, 512)
    tq1 = ops.pack(codes, torch.tensor(1.0), "tq1_0")
    q, x_scale = int8_acts(2, 512)
    with pytest.raises(ValueError, match="tq1_0 needs"):
        tq1_0_matmul(q, x_scale, tq1[:-1], 3, 1.0)
    q, x_scale = int8_acts(2, 384)
    with pytest.raises(ValueError, match="multiple of 256"):
        tq1_0_matmul(q, x_scale, tq1, 3, 1.0)


def test_tq1_0_matmul_longest_row(isa):
    # K = 2^19, the limit: all codes +1 against -128 everywhere puts -2^31 in one int32 lane of the
    # one-row path, exactly; one block more is refused
    k = 1 << 19
    tq1 = ops.pack(torch.ones(1, k, dtype=torch.int8), torch.tensor(1.0), "tq1_0")
    q = torch.full((1, k), -128, dtype=torch.int8)
    assert tq1_0_matmul(q, torch.ones(1), tq1, 1, 1.0).item() == -128.0 * k
    k += 256
    tq1 = ops.pack(torch.ones(1, k, dtype=torch.int8), torch.tensor(1.0), "tq1_0")
    with pytest.raises(ValueError, match="limit of 2\\^19"):
        tq1_0_matmul(torch.zeros(1, k, dtype=torch.int8), torch.ones(1), tq1, 1, 1.0)
