"""Q-Sparse: top-k and N:M activation sparsity with the straight-through estimator."""

import pytest
import torch

from wrinklefree import BitLinear, QSparse, QuantSchedule
from wrinklefree.nn import set_schedule


def sparsity(t):
    return (t == 0).float().mean().item()


def qsparse_reference(x, keep):
    """Keep the ``keep`` largest |x| of each row, written the slow, obvious way."""
    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        order = sorted(range(x.shape[1]), key=lambda i: -abs(x[row, i].item()))
        for i in order[:keep]:
            out[row, i] = x[row, i]
    return out


def test_off_by_default():
    assert BitLinear(16, 4).qsparse is None


@pytest.mark.parametrize("k", [1, 7, 100, 256])
def test_topk_keeps_the_largest_and_hits_the_target_ratio(k):
    torch.manual_seed(k)
    x = torch.randn(5, k)
    qs = QSparse()  # 0.61
    y = qs(x)
    keep = k - round(0.61 * k)
    assert torch.equal(y, qsparse_reference(x, keep))
    assert sparsity(y) == pytest.approx(round(0.61 * k) / k)
    if k == 256:
        assert abs(sparsity(y) - 0.61) < 1 / k


def test_block_mode_is_n_of_m():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 64)
    qs = QSparse(ratio=0.5, mode="block", block_size=8)
    y = qs(x)
    blocks = (y != 0).view(3, 4, 8, 8).sum(-1)
    assert torch.equal(blocks, torch.full_like(blocks, 4))
    expected = qsparse_reference(x.reshape(-1, 8), 4).view_as(x)
    assert torch.equal(y, expected)
    with pytest.raises(ValueError, match="block_size=8"):
        qs(torch.randn(2, 12))


def test_gradient_passes_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 32)
    QSparse(0.75)(x).backward(g)
    assert torch.equal(x.grad, g)


def test_warmup_raises_the_ratio_with_the_schedule():
    schedule = QuantSchedule(warmup_steps=0)
    qs = QSparse(ratio=0.6, warmup_steps=10, schedule=schedule)
    x = torch.randn(2, 100)
    assert sparsity(qs(x)) == 0.0
    schedule.set_step(5)
    assert qs.current_ratio() == pytest.approx(0.3) and sparsity(qs(x)) == pytest.approx(0.3)
    schedule.set_step(50)
    assert sparsity(qs(x)) == pytest.approx(0.6)


def test_bitlinear_input_is_sparsified_before_quantization():
    layer = BitLinear(64, 8, bias=False, qsparse=QSparse(0.5))
    set_schedule(layer, QuantSchedule(warmup_steps=0))
    dense = BitLinear(64, 8, bias=False)
    dense.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), dense(QSparse(0.5)(x)))
    layer.pack()
    dense.pack()
    torch.testing.assert_close(layer(x), dense(QSparse(0.5)(x)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        QSparse(1.0)
    with pytest.raises(ValueError, match="mode"):
        QSparse(mode="random")
    with pytest.raises(ValueError, match="block_size"):
        QSparse(block_size=1)


@pytest.mark.parametrize("mode", ["topk", "block"])
def test_compiled_warmup_follows_the_schedule_without_recompiling(mode):
    """The kept count changes every warm-up step; compiled, it is read from the schedule's step tensor, so
    the model compiles once for the warm-up and keeps the same values as eager at every step."""
    schedule = QuantSchedule(warmup_steps=4)
    layer = BitLinear(64, 16, schedule=schedule, qsparse=QSparse(0.6, mode, warmup_steps=6, schedule=schedule))
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    for step in range(9):  # through the end of both warm-ups (lam turns 1 at step 4: one recompile)
        with torch._dynamo.config.patch(error_on_recompile=step not in (0, 4)):
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6, msg=f"step {step}")
        schedule.step()
