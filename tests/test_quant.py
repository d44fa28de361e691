"""ternary_quant, act_quant_int8, rmsnorm_act_quant against their references, bit for bit."""

import math

import pytest
import torch

from wrinklefree import _C, ops
from wrinklefree.ops import quant, reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 17, 128]
COLS = [1, 7, 128, 300, 2560]


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


def random_rows(n, k, dtype):
    # rows of very different magnitudes, one all-zero row, outliers: the scales differ per row
    x = torch.randn(n, k) * torch.logspace(-3, 2, n).unsqueeze(1)
    if n > 2:
        x[1] = 0.0
    x.view(-1)[:: max(1, x.numel() // 5)] *= 40.0
    return x.to(dtype)


# ---- ternary_quant ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 300), (65, 1025), (300, 700)])
def test_ternary_quant_matches_reference(isa, dtype, shape):
    w = (torch.randn(shape) * 0.02).to(dtype)
    codes, scale = ops.ternary_quant(w)
    ref_codes, ref_scale = reference.ternary_quant(w)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)
    assert scale.dim() == 0 and set(codes.unique().tolist()) <= {-1, 0, 1}


def test_pairwise_sum_hand_worked():
    # pairwise: (2^53 + 1) + (1 + 1) = 2^53 + 2 (the first sum rounds to even); summed left to
    # right, each +1 is lost and the total stays 2^53
    v = torch.tensor([[2.0**53, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert reference.pairwise_sum(v).item() == 2.0**53 + 2
    # the padding to a power of two: 5 elements sum as ((a + b) + (c + d)) + e, and
    # (2^53 + 2) + 1 is a tie that rounds to the even 2^53 + 4
    v = torch.tensor([[2.0**53, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert reference.pairwise_sum(v).item() == 2.0**53 + 4
    # blocks of PAIR_CHUNK combine as the whole row's tree would
    v = torch.rand(3, 5 * reference.PAIR_CHUNK + 17, dtype=torch.float64) * 2.0 ** torch.randint(-30, 30, (1,))
    width = 8 * reference.PAIR_CHUNK
    flat = torch.nn.functional.pad(v, (0, width - v.shape[1]))
    while flat.shape[1] > 1:
        flat = flat[:, 0::2] + flat[:, 1::2]
    assert torch.equal(reference.pairwise_sum(v), flat[:, 0])


def test_reference_sqrt_is_ieee_rounded():
    # torch's CPU float64 sqrt gives 2.593417014796253 for the first (an ulp above the IEEE root)
    v = torch.tensor([6.725811812634708, 2.0, 1e-300, 0.0, float("inf")], dtype=torch.float64, requires_grad=True)
    root = reference.sqrt_rn(v)
    assert root.tolist() == [math.sqrt(x) for x in v.tolist()]
    assert root[0].item() == 2.5934170147962528
    root[:3].sum().backward()
    assert torch.equal(v.grad[:3], 0.5 / torch.sqrt(v.detach()[:3]))


def _kernel_pairwise_sum(x, squares):
    return _C.pairwise_sum(x.data_ptr(), quant.dtype_code(x), x.numel(), squares)


def _reference_pairwise_sum(x, squares):
    xd = x.to(torch.float64)
    return reference.pairwise_sum((xd * xd if squares else xd.abs()).view(1, -1)).item()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 65, 1000, 1024, 1025, 2560, 4096 + 3, 70 * 1024 + 9])
@pytest.mark.parametrize("squares", [False, True])
def test_pairwise_sum_kernel_matches_reference(isa, dtype, n, squares):
    # a wide range of magnitudes, so that a different order of additions would show in the bits
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 2.0 ** torch.randint(-20, 20, (n,), generator=g).float()).to(dtype)
    assert _kernel_pairwise_sum(x, squares) == _reference_pairwise_sum(x, squares)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [5, 64, 100, 1024, 2560])
def test_sum_of_squares_with_zeros_and_extremes(isa, dtype, n):
    # exact zeros (a squared-ReLU FFN's output is half zeros), the largest finite values and the
    # smallest normal ones, among random values
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 2.0 ** torch.randint(-20, 20, (n,), generator=g).float()
    x[torch.rand(n, generator=g) < 0.5] = 0.0
    info = torch.finfo(dtype)
    x[1::7] = info.max
    x[3::11] = -info.tiny
    x = x.to(dtype)
    assert _kernel_pairwise_sum(x, True) == _reference_pairwise_sum(x, True)
    assert _kernel_pairwise_sum(torch.zeros(n, dtype=dtype), True) == 0.0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("special", ["subnormal", "inf", "-inf", "nan"])
@pytest.mark.parametrize("at", [0, 37, 999])
def test_sum_of_squares_special_values(isa, dtype, special, at):
    # subnormals, infinities and NaNs take the kernels' general path; the sum still matches
    g = torch.Generator().manual_seed(at)
    x = torch.randn(1000, generator=g).to(dtype)
    value = {"subnormal": torch.finfo(dtype).tiny / 4, "inf": float("inf"), "-inf": float("-inf"),
             "nan": float("nan")}[special]  # fmt: skip
    x[at] = value
    x[at // 2] = value
    got, want = _kernel_pairwise_sum(x, True), _reference_pairwise_sum(x, True)
    if special == "nan":
        assert got != got and want != want
    else:
        assert got == want
        assert (got == float("inf")) == special.endswith("inf")


# ---- rms_inv: the fast sum's bracket, and the exact tree where the bracket straddles a boundary --


def _kernel_rms_inv(x, eps):
    return _C.rms_inv(x.data_ptr(), quant.dtype_code(x), x.numel(), eps)


def _reference_rms_inv(x, eps):
    return reference.rms_inv(x.view(1, -1), eps).item()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 7, 64, 65, 300, 2560, 6912 + 5])
def test_rms_inv_matches_reference_without_the_tree(isa, dtype, k):
    # values over 40 binades (24 in float16, which overflows above 2^16): the fast sum's order
    # changes its low bits, never the float result; the inputs are seeded, and none of them lies
    # near a rounding boundary, so none needs the tree
    g = torch.Generator().manual_seed(k)
    span = 12 if dtype == torch.float16 else 20
    for _ in range(20):
        x = torch.randn(k, generator=g) * 2.0 ** torch.randint(-span, span, (k,), generator=g).float()
        x = x.to(dtype)
        assert x.isfinite().all()
        inv, tree = _kernel_rms_inv(x, 1e-6)
        assert inv == _reference_rms_inv(x, 1e-6)
        assert not tree


def _midpoint_below(v):
    """The largest midpoint between two neighbouring float32 values that is <= v (a double)."""
    a = torch.tensor(v, dtype=torch.float64).to(torch.float32)  # nearest float32
    inf = torch.tensor(float("inf"))
    while True:
        b = torch.nextafter(a, inf)
        mid = (a.double().item() + b.double().item()) / 2  # exact in double
        if mid <= v:
            return mid
        a = torch.nextafter(a, -inf)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 3, 300, 2560])
def test_rms_inv_near_a_rounding_boundary_takes_the_tree(isa, dtype, k):
    # eps puts 1 / sqrt(P / K + eps), P the pairwise sum, within about 1e-16 of the midpoint between
    # two floats (eps is about 1e-7 of P / K, so the result follows P at half its relative change).
    # The fast sum's bracket, at least 64 ulps wide, straddles the midpoint: only the exact sum can
    # say on which side of it the result lies.
    g = torch.Generator().manual_seed(k)
    for _ in range(10):
        x = (torch.randn(k, generator=g) * 3.0).to(dtype)
        mean_square = _reference_pairwise_sum(x, True) / k
        mid = _midpoint_below(1.0 / mean_square**0.5)
        eps = 1.0 / (mid * mid) - mean_square
        assert eps >= 0.0
        inv, tree = _kernel_rms_inv(x, eps)
        assert tree
        assert inv == _reference_rms_inv(x, eps)
        assert abs(inv - mid) < 1e-6 * mid  # one of the two floats beside the midpoint


@pytest.mark.parametrize("special", ["inf", "nan"])
def test_rms_inv_of_a_row_with_inf_or_nan_takes_the_tree(isa, special):
    x = torch.randn(300)
    x[17] = float(special)
    inv, tree = _kernel_rms_inv(x, 1e-6)
    want = _reference_rms_inv(x, 1e-6)
    assert tree
    assert inv == want or (inv != inv and want != want)


def test_ternary_quant_large_tensor_spans_many_chunks(isa):
    # > 64 blocks of PAIR_CHUNK and not a multiple of it: the threaded, pairwise-combined mean
    w = torch.randn(331, 1000) * 0.05
    codes, scale = ops.ternary_quant(w)
    ref_codes, ref_scale = reference.ternary_quant(w)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)
    torch.testing.assert_close(scale, w.abs().mean(), rtol=1e-6, atol=0)


def test_ternary_quant_hand_worked():
    # mean|w| = 8/8 = 1 -> inv = 1: 2 clamps to 1; +-0.5 round half to even -> 0; 1.5 -> 2 -> 1
    w = torch.tensor([[2.0, 0.5, -0.5, -1.0, 1.5, -1.5, 0.0, 1.0]])
    codes, scale = ops.ternary_quant(w)
    assert scale.item() == 1.0
    assert codes.tolist() == [[1, 0, 0, -1, 1, -1, 0, 1]]


def test_ternary_quant_scale_floor():
    codes, scale = ops.ternary_quant(torch.zeros(4, 4))
    assert scale.item() == pytest.approx(1e-5) and not codes.any()


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_ternary_quant_independent_of_threads(threads, n_threads):
    w = torch.randn(257, 1031) * 0.02
    expected = reference.ternary_quant(w)
    ops.set_num_threads(n_threads)
    codes, scale = ops.ternary_quant(w)
    assert_same(codes, expected[0])
    assert_same(scale, expected[1])


def raw_ternary_quant(w, scale_hint):
    codes = torch.empty(w.shape, dtype=torch.int8)
    s = _C.ternary_quant(w.data_ptr(), quant.dtype_code(w), w.numel(), codes.data_ptr(), scale_hint)
    return codes, torch.tensor(s, dtype=torch.float32)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("factor", [1.0, 1.004, 0.996, 3.0, 1 / 3])
def test_ternary_quant_scale_hint_never_changes_the_result(isa, dtype, factor):
    # The single read: codes at the hinted scale, then the band of weights whose code the true
    # scale could change rounded again (hints 0.4% off), or all of them (hints far off).
    w = (torch.randn(301, 1037) * 0.02).to(dtype)
    ref_codes, ref_scale = reference.ternary_quant(w)
    hint = ref_scale.item() * factor
    codes, scale = raw_ternary_quant(w, hint)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)
    # The hint's own codes are wrong somewhere, so the correction above was needed (bfloat16's
    # grid, 2^-8 apart, may hold no weight between two thresholds 0.4% apart).
    if factor != 1.0 and dtype != torch.bfloat16:
        at_hint = torch.clamp(torch.round(w.float() * (1.0 / torch.tensor(hint))), -1, 1).to(torch.int8)
        assert (at_hint != ref_codes).any()


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_ternary_quant_scale_hint_independent_of_threads(threads, n_threads):
    w = torch.randn(257, 1031) * 0.02
    ref_codes, ref_scale = reference.ternary_quant(w)
    ops.set_num_threads(n_threads)
    codes, scale = raw_ternary_quant(w, ref_scale.item() * 1.002)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)


def test_ternary_quant_band_overflow_rounds_everything_again(isa):
    # |w| alternates a and 3a: s = 2a, so half of all weights sit exactly on the threshold
    # (a / s = 0.5 rounds to even, 0). A band that wide is not noted; every code is redone.
    a = 0.01
    w = torch.full((513, 1000), a)
    w.view(-1)[1::2] = 3 * a
    w.view(-1)[::3] *= -1
    ref_codes, ref_scale = reference.ternary_quant(w)
    assert ref_scale.item() == pytest.approx(2 * a)
    codes, scale = raw_ternary_quant(w, ref_scale.item())
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)
    assert (codes == 0).sum().item() == w.numel() // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_quant_sampled_single_read_matches_reference(isa, dtype):
    # Large enough (>= 2^22 weights) for the scale to be estimated from a sample; rows of very
    # different scales, so that the sample's estimate is rough.
    w = (torch.randn(2049, 2051) * torch.logspace(-3, -1, 2049).unsqueeze(1)).to(dtype)
    codes, scale = ops.ternary_quant(w)
    ref_codes, ref_scale = reference.ternary_quant(w)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)


def test_ternary_quant_scale_hint_must_be_finite_and_not_negative():
    w = torch.randn(4, 4)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale_hint"):
            raw_ternary_quant(w, bad)


@pytest.mark.parametrize("n", [1000, 1024])
@pytest.mark.parametrize("span", [18, 19, 20, 21, 24])
def test_pairwise_abs_sum_exact_fast_path_boundary(isa, n, span):
    # |x| in two binades `span` apart, random mantissas, at random places (so that every SIMD lane
    # sums both): up to 19 apart every partial sum of 1024 is exact in double and any order gives
    # the reference's bits (the AVX-512 and AVX2 kernels then sum without the tree); further apart
    # the order matters and the tree must be used.
    g = torch.Generator().manual_seed(span)
    left_to_right_differs = 0
    for _ in range(8):
        big = (1 + torch.rand(n, generator=g)) * 2.0**span
        small = 1 + torch.rand(n, generator=g)
        x = torch.where(torch.rand(n, generator=g) < 0.5, big, -small).float()
        want = reference.pairwise_sum(x.double().abs().view(1, -1)).item()
        assert _C.pairwise_sum(x.data_ptr(), 0, n, False) == want
        left_to_right_differs += sum(x.double().abs().tolist()) != want
    assert (left_to_right_differs > 0) == (span >= 21)  # the order matters only past 19 binades here


# ---- act_quant_int8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("k", COLS)
def test_act_quant_matches_reference(isa, dtype, n, k):
    x = random_rows(n, k, dtype)
    q, scale = ops.act_quant_int8(x)
    ref_q, ref_scale = reference.act_quant_int8(x)
    assert_same(q, ref_q)
    assert_same(scale, ref_scale)


def test_act_quant_hand_worked(isa):
    # absmax 127 -> scale exactly 1: ties round to even (2.5 -> 2, 3.5 -> 4, -0.5 -> 0)
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.49, -127.0]])
    q, scale = ops.act_quant_int8(x)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, 2, 4, -2, 0, 0, -127]]


def test_act_quant_zero_row_uses_floor(isa):
    q, scale = ops.act_quant_int8(torch.zeros(2, 9))
    floor = torch.tensor(127.0) / torch.tensor(1e-5)  # float32 division, as the kernels do
    assert torch.equal(scale, floor.expand(2))
    assert not q.any()


def rows_with_non_finite(k, dtype):
    """Rows holding a NaN, an inf, a -inf, both, and a plain row, at varied places (first, last,
    inside a vector, in the tail past the last full vector)."""
    x = torch.randn(6, k) * 3.0
    nan, inf = float("nan"), float("inf")
    x[0, k // 2] = nan
    x[1, k - 1] = inf
    x[2, 0] = -inf
    x[3, min(16, k - 1)] = nan
    x[3, k // 3] = inf
    x[4, k - 1] = nan
    return x.to(dtype)


def assert_non_finite_semantics(q, scale, x):
    """reference.py's rule: a row holding a NaN has scale NaN, one holding an inf scale 0 (for
    the activations), and the codes of either are all 0."""
    has_nan = x.isnan().any(dim=1)
    has_inf = x.isinf().any(dim=1) & ~has_nan
    assert scale[has_nan].isnan().all()
    assert (scale[has_inf] == 0).all()
    assert not q[has_nan | has_inf].any()
    assert scale[~has_nan & ~has_inf].isfinite().all()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 7, 33, 64, 300, 2560])
def test_act_quant_rows_with_nan_or_inf(isa, dtype, k):
    x = rows_with_non_finite(k, dtype)
    q, scale = ops.act_quant_int8(x)
    ref_q, ref_scale = reference.act_quant_int8(x)
    assert_same(q, ref_q)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    if k > 1:  # with K = 1 every row is one value
        assert_non_finite_semantics(q, scale, x)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 7, 33, 300, 2560])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_rmsnorm_act_quant_rows_with_nan_or_inf(isa, dtype, k, eps):
    x = rows_with_non_finite(k, dtype)
    x[5] = 0.0  # with eps = 0: inv_rms = inf, and 0 * inf is NaN
    gain = torch.rand(k) + 0.5
    q, scale = ops.rmsnorm_act_quant(x, gain, eps)
    ref_q, ref_scale = reference.rmsnorm_act_quant(x, gain, eps)
    assert_same(q, ref_q)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert not q[:5].any()  # an inf makes the row's mean square inf, so inv_rms = 0 and inf * 0 = NaN
    if eps == 0.0:
        assert scale[5].isnan() and not q[5].any()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(3, 7), (65, 1025), (2048, 2049)])  # the last: the one-read path
def test_ternary_quant_weight_with_nan_or_inf(isa, dtype, special, shape):
    w = (torch.randn(shape) * 0.02).to(dtype)
    w.view(-1)[w.numel() // 3] = special
    codes, scale = ops.ternary_quant(w)
    ref_codes, ref_scale = reference.ternary_quant(w)
    assert_same(codes, ref_codes)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert not codes.any()
    assert scale.isnan() if special != special else scale.isinf()


def test_act_quant_dequantizes_within_half_step():
    x = torch.randn(5, 333)
    q, scale = ops.act_quant_int8(x)
    err = (q.float() / scale[:, None] - x).abs()
    assert (err <= 0.5 / scale[:, None] * (1 + 1e-6)).all()


# ---- rmsnorm_act_quant ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("k", [1, 7, 300, 2560])
def test_rmsnorm_act_quant_matches_reference(isa, dtype, n, k):
    x = random_rows(n, k, dtype)
    weight = (1.0 + 0.1 * torch.randn(k)).to(dtype)
    q, scale = ops.rmsnorm_act_quant(x, weight, 1e-5)
    ref_q, ref_scale = reference.rmsnorm_act_quant(x, weight, 1e-5)
    assert_same(q, ref_q)
    assert_same(scale, ref_scale)
    # the same pass also hands out each row's inv_rms, for the fused training op's backward
    q2, scale2, inv = quant.rmsnorm_act_quant_with_inv(x, weight, 1e-5)
    assert_same(q2, ref_q)
    assert_same(scale2, ref_scale)
    assert_same(inv, reference.rms_inv(x, 1e-5))


def test_rmsnorm_act_quant_is_rmsnorm_then_act_quant():
    x = torch.randn(9, 640)
    weight = torch.rand(640) + 0.5
    q, scale = ops.rmsnorm_act_quant(x, weight, 1e-6)
    # torch's own RMSNorm, quantized: equal up to the rounding of values within float error of a tie
    y = torch.nn.functional.rms_norm(x, (640,), weight, eps=1e-6)
    q_torch, scale_torch = reference.act_quant_int8(y)
    torch.testing.assert_close(scale, scale_torch, rtol=1e-5, atol=0)
    assert (q.int() - q_torch.int()).abs().max() <= 1
    assert (q != q_torch).float().mean() < 1e-3


# ---- bad input --------------------------------------------------------------------------------


def test_quant_errors_name_the_argument():
    with pytest.raises(TypeError, match="act_quant_int8: x must have dtype"):
        ops.act_quant_int8(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="act_quant_int8: x must be 2-D"):
        ops.act_quant_int8(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.act_quant_int8(torch.ones(8, 6).T)
    with pytest.raises(ValueError, match="x must not be empty"):
        ops.act_quant_int8(torch.ones(0, 6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.act_quant_int8([[1.0, 2.0]])
    with pytest.raises(TypeError, match="ternary_quant: w must have dtype"):
        ops.ternary_quant(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="ternary_quant: w must be 2-D"):
        ops.ternary_quant(torch.ones(6))
    with pytest.raises(ValueError, match="weight must have x.shape\\[1\\]=6 elements, got 5"):
        ops.rmsnorm_act_quant(torch.ones(2, 6), torch.ones(5))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ops.rmsnorm_act_quant(torch.ones(2, 6), torch.ones(6), -1.0)
    with pytest.raises(TypeError, match="rmsnorm_act_quant: eps must be a float, got NoneType"):
        ops.rmsnorm_act_quant(torch.ones(2, 6), torch.ones(6), None)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        ops.rmsnorm_act_quant(torch.ones(2, 6), torch.ones(1, 6))
