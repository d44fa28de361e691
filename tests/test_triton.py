"""The Triton kernels (wrinklefree.triton_kernels) and the fused training ops built on them.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 there); with one they run compiled on CUDA tensors. Either way every integer
output is compared with wrinklefree.ops.reference bit for bit, and the float gradients within
rounding. The PTX tests compile each kernel for sm_80 and sm_90 (no GPU needed) and check that
the quantizers use only correctly rounded float operations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wrinklefree import ops
from wrinklefree.nn import bitlinear as bitlinear_mod
from wrinklefree.nn.bitlinear import BitLinear
from wrinklefree.nn.schedule import QuantSchedule
from wrinklefree.nn.subln import SubLN
from wrinklefree.ops import reference

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install '.[test]')")

from wrinklefree.triton_kernels import bitlinear as tb  # noqa: E402
from wrinklefree.triton_kernels import glu as tg  # noqa: E402
from wrinklefree.triton_kernels import quant as tq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def rows(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (within float16), a zero row, outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n).unsqueeze(1)
    if n > 2:
        x[1] = 0.0
    x.view(-1)[:: max(1, x.numel() // 5)] *= 40.0
    return x.to(dtype)


def same(got, want) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} elements differ"


def close(got, want, rel=1e-5) -> None:
    got, want = got.cpu().to(torch.float64), want.cpu().to(torch.float64)
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1e-30)
    err = (got - want).abs().max() / scale
    assert err <= rel, f"max error {err:.3g} of the largest magnitude, allowed {rel}"


# ---- quantizers: bit for bit ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n, k", [(1, 1), (3, 7), (17, 300), (128, 128), (4, 2560), (2, 4096 + 905)])
def test_act_quant_matches_reference(dtype, n, k):
    x = rows(n, k, dtype, seed=n * 7 + k)
    q, scale = tq.act_quant_int8(x.to(DEVICE))
    want_q, want_scale = reference.act_quant_int8(x)
    same(q, want_q)
    same(scale, want_scale)


def test_act_quant_rounds_half_to_even():
    halves = torch.arange(-254, 255, dtype=torch.float32) / 2  # -127, -126.5, ..., 127: scale is 1
    x = halves.repeat(3, 1)
    q, scale = tq.act_quant_int8(x.to(DEVICE))
    assert torch.all(scale.cpu() == 1.0)
    same(q[0], torch.round(halves).to(torch.int8))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n, k", [(1, 1), (3, 7), (17, 300), (5, 1024), (4, 2560), (2, 3 * 4096 + 17)])
def test_rmsnorm_act_quant_matches_reference(dtype, n, k):
    x = rows(n, k, dtype, seed=n * 11 + k)
    w = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5).to(dtype)
    q, scale, inv = tq.rmsnorm_act_quant(x.to(DEVICE), w.to(DEVICE), 1e-5)
    want_q, want_scale = reference.rmsnorm_act_quant(x, w, 1e-5)
    same(q, want_q)
    same(scale, want_scale)
    same(inv, reference.rms_inv(x, 1e-5))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1, 1023), (1, 1025), (300, 700)])
def test_ternary_quant_matches_reference(dtype, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 0.02).to(dtype)
    codes, scale = tq.ternary_quant(w.to(DEVICE))
    want_codes, want_scale = reference.ternary_quant(w)
    same(codes, want_codes)
    same(scale, want_scale)


def rows_with_non_finite(k: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(k)) * 3.0
    x[0, k // 2] = float("nan")
    x[1, k - 1] = float("inf")
    x[2, 0] = -float("inf")
    x[3, k // 3] = float("inf")
    x[3, k - 1] = float("nan")
    x[5] = 0.0  # rmsnorm with eps = 0: inv_rms = inf, and 0 * inf is NaN
    return x.to(dtype)


def same_nan(got, want) -> None:
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [7, 300, 4096 + 905])
def test_quantizers_rows_with_nan_or_inf(dtype, k):
    # reference.py's rule: a row holding a NaN gets scale NaN, one holding an inf scale 0, and
    # all codes 0 (a max of floats on the GPU would drop the NaN)
    x = rows_with_non_finite(k, dtype)
    q, scale = tq.act_quant_int8(x.to(DEVICE))
    want_q, want_scale = reference.act_quant_int8(x)
    same(q, want_q)
    same_nan(scale, want_scale)
    assert not q[:4].any()
    gain = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5
    for eps in (1e-5, 0.0):
        q, scale, _ = tq.rmsnorm_act_quant(x.to(DEVICE), gain.to(DEVICE), eps)
        want_q, want_scale = reference.rmsnorm_act_quant(x, gain, eps)
        same(q, want_q)
        same_nan(scale, want_scale)
    for special in (float("nan"), float("inf")):
        w = x[4:5].clone()
        w[0, 3] = special
        codes, scale = tq.ternary_quant(w.to(DEVICE))
        want_codes, want_scale = reference.ternary_quant(w)
        same(codes, want_codes)
        same_nan(scale, want_scale)
        assert not codes.any()


@pytest.mark.slow
def test_ternary_quant_reduces_blocks_of_block_sums():
    # more than 1024 blocks of 1024: the block sums are summed by a second level of the tree
    w = torch.randn(1025 * 1024 + 5, generator=torch.Generator().manual_seed(3)) * 0.02
    codes, scale = tq.ternary_quant(w.to(DEVICE))
    want_codes, want_scale = reference.ternary_quant(w)
    same(scale, want_scale)
    same(codes, want_codes)


def test_ternary_quant_hand_worked():
    # mean|w| = 1 -> inv = 1: 2 clamps to 1; +-0.5 round half to even -> 0; 1.5 -> 2 -> 1
    w = torch.tensor([[2.0, 0.5, -0.5, -1.0, 1.5, -1.5, 0.0, 1.0]])
    codes, scale = tq.ternary_quant(w.to(DEVICE))
    assert scale.item() == 1.0
    assert codes.cpu().tolist() == [[1, 0, 0, -1, 1, -1, 0, 1]]


# ---- RMSNorm backward and relu^2 GLU: float, against autograd -----------------------------------


@pytest.mark.parametrize("n, k", [(1, 5), (3, 300), (9, 4096 + 3)])
def test_rmsnorm_backward_matches_autograd(n, k):
    x = torch.randn(n, k) * torch.logspace(-2, 1, n).unsqueeze(1)
    w = torch.rand(k) + 0.5
    dh = torch.randn(n, k)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference.rmsnorm(xr, wr, 1e-5).backward(dh)
    inv = reference.rms_inv(x, 1e-5)
    dx, dw = tq.rmsnorm_backward(dh.to(DEVICE), x.to(DEVICE), w.to(DEVICE), inv.to(DEVICE))
    close(dx, xr.grad, 1e-5)
    close(dw, wr.grad, 1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (3, 2049)])
def test_relu2_glu_forward_and_backward(dtype, shape):
    g, u, dh = (torch.randn(shape) for _ in range(3))
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    want = torch.relu(gr) ** 2 * ur
    want.backward(dh)
    h = tg.relu2_glu(g.to(dtype).to(DEVICE), u.to(dtype).to(DEVICE))
    dg, du = tg.relu2_glu_backward(dh.to(dtype).to(DEVICE), g.to(dtype).to(DEVICE), u.to(dtype).to(DEVICE))
    rel = 1e-6 if dtype == torch.float32 else 2e-2  # inputs rounded to the dtype
    for got, ref in ((h, want.detach()), (dg, gr.grad), (du, ur.grad)):
        assert got.dtype == dtype
        close(got, ref, rel)


# ---- BitLinear matmuls --------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (3, 7, 130), (17, 300, 257), (130, 33, 64)]


@pytest.mark.parametrize("n, m, k", SHAPES)
def test_bitlinear_forward_is_exact(n, m, k):
    g = torch.Generator().manual_seed(n + m + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    codes = torch.randint(-1, 2, (m, k), dtype=torch.int8, generator=g)
    xs = torch.rand(n, generator=g) * 100 + 0.5
    ws = torch.tensor(0.0213)
    y = tb.forward(q.to(DEVICE), codes.to(DEVICE), xs.to(DEVICE), ws.to(DEVICE), torch.float32)
    same(y, reference.int8_matmul(q, codes, xs, ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, m, k", SHAPES)
def test_bitlinear_gradients(dtype, n, m, k):
    g = torch.Generator().manual_seed(n * m + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    codes = torch.randint(-1, 2, (m, k), dtype=torch.int8, generator=g)
    xs = torch.rand(n, generator=g) * 100 + 0.5
    ws = torch.tensor(0.0213)
    dy = torch.randn(n, m, generator=g).to(dtype)
    dx = tb.grad_input(dy.to(DEVICE), codes.to(DEVICE), ws.to(DEVICE), torch.float32)
    dw = tb.grad_weight(dy.to(DEVICE), q.to(DEVICE), xs.to(DEVICE), torch.float32)
    dy32 = dy.to(torch.float32)
    close(dx, (dy32 @ codes.float()) * ws, 1e-5)  # dy and codes are exact in any dtype
    # dy / x_scale is rounded to dy's dtype before the tensor-core product
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    close(dw, (dy32 / xs[:, None]).T @ q.float(), rel)


# ---- the fused ops and BitLinear ----------------------------------------------------------------


@pytest.mark.parametrize("norm", [False, True])
def test_bitlinear_train_op_matches_reference(norm):
    x = rows(9, 130, torch.float32, seed=4)
    x[1] = torch.randn(130)
    w = torch.randn(17, 130) * 0.05
    nw = torch.rand(130) + 0.5 if norm else None
    y = ops.bitlinear_train(x.to(DEVICE), w.to(DEVICE), nw.to(DEVICE) if norm else None, 1e-5)
    same(y, reference.bitlinear_train_forward(x, w, nw, 1e-5))

    xr = x.to(DEVICE).requires_grad_()
    wr = w.to(DEVICE).requires_grad_()
    nwr = nw.to(DEVICE).requires_grad_() if norm else None
    dy = torch.randn(9, 17)
    ops.bitlinear_train(xr, wr, nwr, 1e-5).backward(dy.to(DEVICE))
    dx, dw, dnorm = reference.bitlinear_train_backward(dy, x, w, nw, 1e-5)
    close(xr.grad, dx, 1e-5)
    close(wr.grad, dw, 1e-5)
    if norm:
        close(nwr.grad, dnorm, 1e-5)


def test_bitlinear_train_ops_pass_opcheck():
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(7, 64, device=DEVICE, requires_grad=True)
    nw = torch.rand(64, device=DEVICE, requires_grad=True)
    for norm in (None, nw):
        torch.library.opcheck(torch.ops.wrinklefree.bitlinear_train_fwd.default, (x, w, norm, 1e-5))
    g, u = torch.randn(4, 9, device=DEVICE, requires_grad=True), torch.randn(4, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.wrinklefree.relu2_glu.default, (g, u))


@pytest.mark.parametrize("subln", [False, True])
def test_fused_bitlinear_trains_like_the_fake_quant_path(subln, monkeypatch):
    # the fused op at lam = 1 and the fake-quantized float path compute the same function and the
    # same straight-through gradients, up to float rounding
    torch.manual_seed(0)
    layer = BitLinear(96, 40, subln=subln).to(DEVICE)
    x = torch.randn(2, 5, 96, device=DEVICE)
    dy = torch.randn(2, 5, 40, device=DEVICE)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(bitlinear_mod, "FUSED", fused)
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(dy)
        grads = [xr.grad, layer.weight.grad] + ([layer.subln.weight.grad] if subln else [])
        results.append((y.detach(), [t.clone() for t in grads]))
    (y_f, g_f), (y_u, g_u) = results
    close(y_f, y_u, 1e-2 if subln else 1e-5)  # SubLN: a few int8 roundings may flip
    for a, b in zip(g_f, g_u, strict=True):
        close(a, b, 5e-2 if subln else 1e-4)


def test_bitlinear_uses_the_fused_op_only_when_fully_quantized(monkeypatch):
    calls = []
    real = ops.bitlinear_train
    monkeypatch.setattr(ops, "bitlinear_train", lambda *a: calls.append(1) or real(*a))
    schedule = QuantSchedule(warmup_steps=2)
    layer = BitLinear(64, 8, schedule=schedule)
    x = torch.randn(3, 64)
    layer(x)
    schedule.step()
    layer(x)
    assert calls == []  # lam = 0, 0.5: the fake-quantized float path
    schedule.step()
    layer(x)
    assert calls == [1] and schedule.full


def test_torch_compile_traces_the_fused_op():
    layer = BitLinear(64, 16, subln=True).to(DEVICE)
    layer.subln = SubLN(64).to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    compiled(x.requires_grad_()).sum().backward()
    assert layer.weight.grad is not None and layer.subln.weight.grad is not None


def test_op_errors_name_the_argument():
    with pytest.raises(ValueError, match="weight must be"):
        ops.bitlinear_train(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="norm_weight must have 8"):
        ops.bitlinear_train(torch.randn(2, 8), torch.randn(3, 8), torch.ones(7))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bitlinear_train(torch.zeros(2, 8, dtype=torch.int32), torch.randn(3, 8))
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        ops.relu2_glu(torch.randn(2, 3), torch.randn(3, 2))


# ---- PTX: the kernels compile for sm_80 and sm_90 with exact float ops -------------------------


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # what a launch without options gets today
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_ptx.py")), "80", "90"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_to_ptx_with_exact_float_ops(ptx, arch):
    assert len(ptx) >= 11
    for name, entry in ptx.items():
        text = entry["ptx"][arch]
        assert f".target sm_{arch}" in text, name
        if name == "bitlinear_forward":
            assert "mma" in text and ".s8" in text, "the int8 product must run on tensor cores"
        if not entry["exact"]:
            continue
        # bit-exactness: correctly rounded division and square root, no contraction into fma
        for bad in ("fma.rn.f32", "div.approx", "div.full", "rcp.approx", "sqrt.approx", ".ftz."):
            assert bad not in text, f"{name}: {bad} in the PTX"
        if name in ("act_quant", "rmsnorm_quant"):
            assert "div.rn.f32" in text, name
        if name == "rmsnorm_quant":
            assert "sqrt.rn.f64" in text and "div.rn.f64" in text
