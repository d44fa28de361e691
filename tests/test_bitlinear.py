"""BitLinear, BitLinearLRC, SubLN, the fake-quant ops and the warm-up schedule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wrinklefree import BitLinear, BitLinearLRC, QuantSchedule, SubLN, ops
from wrinklefree.nn import pack_model, set_schedule
from wrinklefree.ops import reference
from wrinklefree.ops.fake_quant import act_fake_quant, ternary_fake_quant


def fake_quant_reference(x, w, bias=None):
    """DESIGN.md section 2 written out: dequantized int8 activations times dequantized ternary weights."""
    q, xs = reference.act_quant_int8(x.reshape(-1, x.shape[-1]))
    codes, s = reference.ternary_quant(w)
    xd = (q.float() / xs[:, None]).reshape(x.shape)
    return F.linear(xd, codes.float() * s, bias)


def make_pair(k, m, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias)
    layer = BitLinear(k, m, bias=bias)
    layer.load_state_dict(lin.state_dict())
    return lin, layer


# ---- drop-in -----------------------------------------------------------------------------------


def test_bitlinear_is_a_linear_with_the_same_state_dict():
    lin, layer = make_pair(40, 7)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == lin.state_dict().keys()
    for key, value in lin.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    # and the constructor takes nn.Linear's arguments, positionally and by name
    b = BitLinear(40, 7, False, device="cpu", dtype=torch.float64)
    assert b.bias is None and b.weight.dtype == torch.float64 and b.weight.shape == (7, 40)


@pytest.mark.parametrize("shape", [(1, 256), (3, 5, 130), (17, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_fake_quantized_matmul(shape, bias):
    k = shape[-1]
    _, layer = make_pair(k, 19, bias)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 19) and y.dtype == torch.float32
    torch.testing.assert_close(y, fake_quant_reference(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_bf16_input_and_weight():
    _, layer = make_pair(128, 32)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fake_quant_reference(x.float(), layer.weight.float(), layer.bias.float()),
                               rtol=2e-2, atol=2e-2)  # fmt: skip


def test_gradient_is_straight_through():
    # fully quantized: d/dx and d/dW are those of F.linear on the quantized tensors, passed to the latents
    _, layer = make_pair(64, 24)
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 24)
    layer(x).backward(g)
    xq = act_fake_quant(x.detach()).detach()
    wq = ternary_fake_quant(layer.weight.detach()).detach()
    torch.testing.assert_close(x.grad, g @ wq)
    torch.testing.assert_close(layer.weight.grad, g.T @ xq)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


@pytest.mark.parametrize("subln", [False, True])
def test_a_frozen_weight_still_passes_the_input_gradient(subln):
    # LRC calibration freezes the ternary weights: the backward then computes dx (and the SubLN gain's
    # gradient) only; the same dx as with a trainable weight
    layer = BitLinear(64, 24, bias=False, subln=subln)
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 24)
    layer(x).backward(g)
    expected = x.grad.clone()
    x.grad = layer.weight.grad = None
    layer.weight.requires_grad_(False)
    layer(x).backward(g)
    assert layer.weight.grad is None
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_lam_zero_is_exactly_linear_forward_and_backward():
    lin, layer = make_pair(96, 33)
    schedule = set_schedule(layer, QuantSchedule(warmup_steps=100))
    assert float(schedule.lam) == 0.0
    x1 = torch.randn(5, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(5, 33)
    y1, y2 = lin(x1), layer(x2)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(lin.weight.grad, layer.weight.grad)
    assert torch.equal(lin.bias.grad, layer.bias.grad)


def test_lam_blends_between_float_and_quantized():
    lin, layer = make_pair(64, 16)
    schedule = set_schedule(layer, QuantSchedule(warmup_steps=4))
    x = torch.randn(3, 64)
    full = fake_quant_reference(x, layer.weight, layer.bias)
    schedule.set_step(2)  # lam = 0.5
    xb = torch.lerp(x, act_fake_quant(x), 0.5)
    wb = torch.lerp(layer.weight.detach(), ternary_fake_quant(layer.weight.detach()), 0.5)
    torch.testing.assert_close(layer(x), F.linear(xb, wb, layer.bias), rtol=1e-6, atol=1e-6)
    schedule.set_step(4)
    torch.testing.assert_close(layer(x), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), lin(x))


def test_fake_quant_ops_reject_bad_lam_and_shapes():
    with pytest.raises(ValueError, match="lam"):
        act_fake_quant(torch.randn(2, 4), 1.5)
    with pytest.raises(ValueError, match="lam"):
        ternary_fake_quant(torch.randn(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="w must be 2-D"):
        ternary_fake_quant(torch.randn(4))


def test_wrong_input_size_names_the_layer():
    with pytest.raises(ValueError, match="BitLinear: input last dim must be 8"):
        BitLinear(8, 4)(torch.randn(2, 9))


# ---- schedule ----------------------------------------------------------------------------------


def test_schedule_default_is_linear_to_one_at_1000():
    s = QuantSchedule()
    assert s.lam_at(0) == 0.0 and s.lam_at(500) == 0.5 and s.lam_at(1000) == 1.0 and s.lam_at(5000) == 1.0
    for _ in range(250):
        s.step()
    assert s.current_step == 250 and float(s.lam) == 0.25


@pytest.mark.parametrize("kind", ["sigmoid", "exponential"])
def test_schedule_shapes_go_from_zero_to_one_monotonically(kind):
    s = QuantSchedule(100, kind)
    values = [s.lam_at(t) for t in range(0, 101)]
    assert values[0] == pytest.approx(0.0, abs=1e-12) and values[-1] == 1.0
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_schedule_state_dict_round_trip_and_errors():
    s = QuantSchedule(300, "sigmoid", sharpness=6.0)
    s.set_step(120)
    t = QuantSchedule()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() and float(t.lam) == float(s.lam)
    assert math.isclose(float(t.lam), s.lam_at(120), rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown keys"):
        t.load_state_dict({"step": 1, "bogus": 2})
    with pytest.raises(ValueError, match="kind"):
        QuantSchedule(10, "cosine")
    with pytest.raises(ValueError, match="warmup_steps"):
        QuantSchedule(-1)


def test_schedule_is_shared_and_updates_in_place():
    model = nn.Sequential(BitLinear(32, 32), BitLinear(32, 8))
    s = set_schedule(model, QuantSchedule(10))
    lam = s.lam
    s.step()
    assert model[0].lam is lam and model[1].lam is lam and float(lam) == pytest.approx(0.1)


# ---- SubLN -------------------------------------------------------------------------------------


def test_subln_matches_transformers_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = SubLN(48, 1e-6), LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48)
    assert torch.equal(ours(x), theirs(x))


def test_bitlinear_with_subln_normalizes_before_quantizing():
    layer = BitLinear(64, 16, bias=False, subln=True, subln_eps=1e-6)
    with torch.no_grad():
        layer.subln.weight.uniform_(0.5, 2.0)
    x = torch.randn(4, 64) * 10
    expected = fake_quant_reference(layer.subln(x), layer.weight)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "subln.weight"}


# ---- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [128, 256, 200, 33])  # 200 and 33 are padded to the I2_S block
@pytest.mark.parametrize("n", [1, 3, 40])
def test_packed_matches_fake_quant(k, n):
    _, layer = make_pair(k, 24, bias=True, seed=k)
    x = torch.randn(n, k)
    expected = layer(x)
    layer.pack()
    assert layer.is_packed and layer.weight is None
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_packed_matches_fake_quant_with_subln_and_leading_dims():
    layer = BitLinear(256, 48, subln=True)
    x = torch.randn(2, 5, 256)
    expected = layer(x)
    layer.pack()
    y = layer(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [256, 200])  # 256: one bitlinear_infer call; 200: padded, two ops
def test_packed_forward_is_the_ops_bit_for_bit(dtype, k):
    layer = BitLinear(k, 24, bias=True).pack()
    x = torch.randn(3, k).to(dtype)
    with torch.no_grad():
        y = layer(x)
    q, x_scale = ops.act_quant_int8(x)
    q = F.pad(q, (0, layer.padded_in_features - k))
    want = (ops.i2s_matmul(q, x_scale, layer.packed, 24) + layer.bias.detach().float()).to(dtype)
    assert y.dtype == dtype
    assert torch.equal(y, want)


def test_packed_layer_holds_a_quarter_byte_per_weight():
    m, k = 96, 512
    layer = BitLinear(k, m, bias=False).pack()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
    assert weight_bytes == m * k // 4 + 32
    assert set(layer.state_dict()) == {"packed"}


def test_packed_bytes_are_the_ops_packing_of_the_ternary_weight():
    _, layer = make_pair(256, 8, bias=False)
    codes, scale = ops.ternary_quant(layer.weight.detach())
    layer.pack()
    assert torch.equal(layer.packed, ops.pack(codes, scale, "i2_s"))
    got_codes, got_scale = layer.ternary_weight()
    assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale)


def test_packed_state_dict_round_trip():
    layer = BitLinear(128, 12).pack()
    other = BitLinear(128, 12).pack()
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(other(x), layer(x))
    fresh = BitLinear(128, 12)  # an unpacked layer takes a packed state dict by packing itself
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_packed and fresh.weight is None and torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match=r"packed must be uint8 \[448\] for out_features=13, .* \(416,\)"):
        BitLinear(128, 13).load_state_dict(layer.state_dict())


def test_from_ternary_builds_a_packed_layer():
    codes = torch.randint(-1, 2, (10, 300), dtype=torch.int8)
    layer = BitLinear.from_ternary(codes, 0.25, bias=torch.zeros(10))
    x = torch.randn(2, 300)
    q, xs = reference.act_quant_int8(x)
    expected = (q.float() @ codes.float().T) / xs[:, None] * 0.25
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="codes must be 2-D"):
        BitLinear.from_ternary(codes[0], 1.0)


def test_pack_model_packs_every_bitlinear():
    model = nn.Sequential(BitLinear(128, 64), nn.ReLU(), BitLinear(64, 8))
    x = torch.randn(4, 128)
    expected = model(x)
    pack_model(model)
    assert all(m.is_packed for m in (model[0], model[2]))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_pack_on_meta_device_is_a_clear_error():
    with torch.device("meta"):
        layer = BitLinear(128, 8)
    with pytest.raises(ValueError, match="meta device"):
        layer.pack()


# ---- LRC ---------------------------------------------------------------------------------------


def test_lrc_rank_as_int_or_fraction():
    assert BitLinearLRC(64, 32, rank=5).rank == 5
    assert BitLinearLRC(64, 32, rank=0.25).rank == 8
    assert BitLinearLRC(64, 32, rank=0.001).rank == 1
    with pytest.raises(ValueError, match="rank"):
        BitLinearLRC(64, 32, rank=33)
    with pytest.raises(ValueError, match="rank"):
        BitLinearLRC(64, 32, rank=1.5)


def test_lrc_starts_as_the_bitlinear_and_trains_the_correction():
    _, base = make_pair(64, 32)
    base.subln = SubLN(64)
    x = torch.randn(5, 64)
    before = base(x)
    lrc = BitLinearLRC.from_bitlinear(copy.deepcopy(base), rank=4)
    assert torch.equal(lrc(x), before)  # U = 0: the function does not change
    assert lrc.weight is not base.weight and torch.equal(lrc.weight, base.weight)
    lrc(x).square().sum().backward()
    assert lrc.lrc_u.grad.abs().sum() > 0  # V is random, so U learns from the first step
    with torch.no_grad():
        lrc.lrc_u.normal_()
    h = lrc.subln(x)
    torch.testing.assert_close(lrc(x), before + (h @ lrc.lrc_v.T) @ lrc.lrc_u.T, rtol=1e-5, atol=1e-5)


def test_lrc_packed_keeps_the_correction():
    lrc = BitLinearLRC(128, 16, rank=3)
    with torch.no_grad():
        lrc.lrc_u.normal_()
    x = torch.randn(2, 128)
    expected = lrc(x)
    lrc.pack()
    torch.testing.assert_close(lrc(x), expected, rtol=1e-5, atol=1e-5)


# ---- compile -----------------------------------------------------------------------------------


def test_torch_compile_matches_eager_and_follows_the_schedule():
    _, layer = make_pair(64, 16)
    schedule = set_schedule(layer, QuantSchedule(warmup_steps=2))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # lam = 0, 0.5: one graph, the value read from the tensor
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
            schedule.step()
    # lam = 1: one recompile into the fused op, then that graph for good
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            schedule.step()
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


# ---- as a drop-in for others' code: gradients through packed layers, empty batches, dtypes, errors ----


@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("k", [64, 200])  # 200: the packed input dim is padded to 256
def test_packed_layer_passes_the_input_gradient(subln, k):
    """A packed layer is frozen, not cut out of the graph: the input gets the straight-through
    gradient of the unpacked layer (dequantized ternary weight), as from a frozen nn.Linear."""
    layer = BitLinear(k, 24, subln=subln)
    x = torch.randn(2, 5, k, requires_grad=True)
    g = torch.randn(2, 5, 24)
    layer(x).backward(g)
    expected_x, expected_b = x.grad.clone(), layer.bias.grad.clone()
    x.grad = layer.bias.grad = None
    layer.pack().train()
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, expected_b)
    with torch.no_grad():  # and without autograd, the packed fast path gives the same output
        torch.testing.assert_close(layer(x), layer(x.detach().requires_grad_()), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 48), (2, 0, 48)])
@pytest.mark.parametrize("case", ["fused", "warm-up", "packed", "packed+subln", "lrc"])
def test_inputs_with_no_rows_give_empty_outputs(shape, case):
    """As nn.Linear: an empty batch (the last micro-batch, an MoE expert with no tokens) gives an
    empty output, and the backward runs."""
    schedule = QuantSchedule(10) if case == "warm-up" else None
    cls = BitLinearLRC if case == "lrc" else BitLinear
    kwargs = {"rank": 4} if case == "lrc" else {}
    layer = cls(48, 16, subln=case == "packed+subln", schedule=schedule, **kwargs)
    if case.startswith("packed"):
        layer.pack()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 16) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lam_one", [True, False])
@pytest.mark.parametrize("subln", [False, True])
def test_output_is_in_the_input_dtype_in_every_phase(dtype, lam_one, subln):
    layer = BitLinear(64, 16, subln=subln, schedule=None if lam_one else QuantSchedule(10))
    x = torch.randn(3, 64)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)  # the input's rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as nn.Linear under autocast
        assert layer(x).dtype == torch.bfloat16


def test_bad_inputs_and_arguments_are_named():
    layer = BitLinear(8, 4)
    with pytest.raises(TypeError, match="BitLinear: input must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="input last dim must be 8"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="BitLinear: schedule must be a QuantSchedule or None, got float"):
        BitLinear(8, 4, schedule=0.5)
    with pytest.raises(TypeError, match="set_schedule: schedule must be a QuantSchedule or None, got str"):
        set_schedule(nn.Sequential(layer), "linear")


def test_lrc_from_linear_wraps_the_linear_with_a_zero_correction():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    lrc = BitLinearLRC.from_linear(lin, rank=4, subln=True)
    assert lrc.weight is lin.weight and lrc.rank == 4
    assert all(not p.is_meta for p in lrc.parameters())
    assert torch.equal(lrc.lrc_u, torch.zeros(32, 4))
    x = torch.randn(5, 64)
    torch.testing.assert_close(lrc(x), BitLinear.from_linear(lin, subln=True)(x), rtol=0, atol=0)
