"""MoE layer: routers, BitNet experts, the MoE FFN and the fake MoE built from a dense model."""

import pytest
import torch
import transformers  # noqa: E402
from torch import nn

import wrinklefree
from wrinklefree.nn import (
    BitLinear,
    BitNetExpertFFN,
    BitNetMoEFFN,
    IdentityRouter,
    QuantSchedule,
    TopKRouter,
    create_fake_moe_from_dense,
    verify_moe_matches_dense,
)

H, I, VOCAB = 128, 256, 300


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


@pytest.fixture(scope="module")
def converted(dense):
    return wrinklefree.convert(dense, inplace=False)


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 12))


class FixedRouter(nn.Module):
    """Routes every token to the given experts with the given weights (same rows for all tokens)."""

    def __init__(self, num_experts: int, indices: list[int], weights: list[float]) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.indices = torch.tensor(indices)
        self.weights = torch.tensor(weights)

    def forward(self, x):
        t = x.shape[0]
        return self.weights.to(x.dtype).repeat(t, 1), self.indices.repeat(t, 1), torch.zeros(())


# ---- routers ----------------------------------------------------------------------------------


def test_topk_router_matches_softmax_topk():
    t, e, k = 10, 6, 3
    router = TopKRouter(32, e, k)
    x = torch.randn(t, 32)
    weights, indices, aux = router(x)

    assert weights.shape == (t, k) and weights.dtype == x.dtype
    assert indices.shape == (t, k) and indices.dtype == torch.int64
    assert aux.shape == ()
    torch.testing.assert_close(weights.sum(-1), torch.ones(t))
    assert all(len(set(row.tolist())) == k for row in indices)

    probs = torch.softmax((x @ router.gate.weight.T).float(), dim=-1)
    top, expected = torch.topk(probs, k, dim=-1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))

    router.normalize = False
    raw, _, _ = router(x)
    torch.testing.assert_close(raw, top)


def test_topk_router_aux_loss_is_switch_loss_with_gradient():
    t, e, k = 16, 4, 2
    router = TopKRouter(32, e, k)
    x = torch.randn(t, 32)
    _, indices, aux = router(x)

    probs = torch.softmax(x @ router.gate.weight.detach().T, dim=-1)
    expected = 0.0
    for j in range(e):
        f = sum(int(j in row) for row in indices.tolist()) / (t * k)
        expected += f * probs[:, j].mean().item()
    expected *= e
    assert aux.item() == pytest.approx(expected, rel=1e-5)

    aux.backward()
    grad = router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_topk_router_keeps_input_dtype():
    router = TopKRouter(32, 4, 2)
    weights, _, aux = router(torch.randn(5, 32, dtype=torch.bfloat16))
    assert weights.dtype == torch.bfloat16 and aux.dtype == torch.float32


def test_identity_router_routes_to_first_experts():
    x = torch.randn(7, 32)
    weights, indices, aux = IdentityRouter(3)(x)
    assert torch.equal(indices, torch.zeros(7, 1, dtype=torch.int64))
    assert torch.equal(weights, torch.ones(7, 1))
    assert aux.item() == 0.0

    weights, indices, _ = IdentityRouter(4, top_k=2)(x)
    assert torch.equal(indices, torch.tensor([[0, 1]]).repeat(7, 1))
    assert torch.equal(weights, torch.full((7, 2), 0.5))
    assert not list(IdentityRouter(4).parameters())


def test_moe_with_identity_router_equals_single_expert():
    expert = BitNetExpertFFN(32, 64)
    moe = BitNetMoEFFN(IdentityRouter(1), [expert])
    x = torch.randn(2, 5, 32)
    assert torch.equal(moe(x), expert(x))
    assert moe.aux_loss.item() == 0.0


# ---- experts ----------------------------------------------------------------------------------


def test_expert_layers_and_activations():
    schedule = QuantSchedule(10)
    expert = BitNetExpertFFN(32, 64, activation="relu2", schedule=schedule)
    assert all(isinstance(p, BitLinear) for p in (expert.gate_proj, expert.up_proj, expert.down_proj))
    assert expert.down_proj.subln is not None and expert.gate_proj.subln is None
    assert expert.down_proj.schedule is schedule
    x = torch.randn(3, 32)
    g, u = expert.gate_proj(x), expert.up_proj(x)
    assert torch.equal(expert(x), expert.down_proj(torch.relu(g) ** 2 * u))
    assert BitNetExpertFFN(32, 64, subln=False).down_proj.subln is None
    custom = BitNetExpertFFN(32, 64, activation=torch.tanh)
    assert torch.equal(custom(x), custom.down_proj(torch.tanh(custom.gate_proj(x)) * custom.up_proj(x)))


def test_expert_from_dense_is_exact_copy(dense, converted):
    x = torch.randn(2, 9, H)
    for model in (converted, dense):
        mlp = model.model.layers[1].mlp
        expert = BitNetExpertFFN.from_dense(mlp)
        with torch.no_grad():
            assert torch.equal(expert(x), mlp(x))
        assert type(expert.down_proj) is type(mlp.down_proj)
        assert expert.gate_proj.weight is not mlp.gate_proj.weight  # owns its weights
        with torch.no_grad():
            expert.up_proj.weight.add_(1.0)
        assert not torch.equal(expert.up_proj.weight, mlp.up_proj.weight)
    assert BitNetExpertFFN.from_dense(converted.model.layers[0].mlp).down_proj.subln is not None


def test_expert_from_dense_shares_schedule(dense):
    schedule = QuantSchedule(100)
    model = wrinklefree.convert(dense, inplace=False, schedule=schedule)
    expert = BitNetExpertFFN.from_dense(model.model.layers[0].mlp)
    assert expert.gate_proj.schedule is schedule and expert.down_proj.schedule is schedule


# ---- dense -> MoE -----------------------------------------------------------------------------


def test_fake_moe_matches_converted_model(converted, input_ids):
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    moe = create_fake_moe_from_dense(converted, num_experts=4, top_k=2)

    layers = moe.model.layers
    assert all(isinstance(layer.mlp, BitNetMoEFFN) and layer.mlp.num_experts == 4 for layer in layers)
    assert isinstance(layers[0].mlp.router, TopKRouter) and layers[0].mlp.router.top_k == 2
    assert isinstance(layers[0].mlp.experts[3].down_proj, BitLinear)
    assert moe.config.wrinklefree_moe == {"num_experts": 4, "top_k": 2, "router": "topk"}

    matches, err = verify_moe_matches_dense(converted, moe, input_ids)
    assert matches and err < 1e-5
    assert not any(isinstance(m, BitNetMoEFFN) for m in converted.modules())  # input left alone
    after = converted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fake_moe_matches_unconverted_model(dense, input_ids):
    moe = create_fake_moe_from_dense(dense, num_experts=3, top_k=2)
    assert isinstance(moe.model.layers[0].mlp.experts[0].gate_proj, nn.Linear)
    matches, err = verify_moe_matches_dense(dense, moe, input_ids)
    assert matches and err < 1e-5


def test_fake_moe_identity_router_is_exact(converted, input_ids):
    moe = create_fake_moe_from_dense(converted, num_experts=2, top_k=1, router="identity")
    assert isinstance(moe.model.layers[1].mlp.router, IdentityRouter)
    assert verify_moe_matches_dense(converted, moe, input_ids) == (True, 0.0)


def test_verify_detects_a_difference(converted, input_ids):
    moe = create_fake_moe_from_dense(converted, num_experts=2, top_k=1, router="identity")
    with torch.no_grad():
        moe.model.layers[0].mlp.experts[0].down_proj.weight.mul_(-1.0)
    matches, err = verify_moe_matches_dense(converted, moe, input_ids)
    assert not matches and err > 1e-3


# ---- the MoE FFN ------------------------------------------------------------------------------


def test_moe_forward_backward_reaches_experts_and_router():
    router = TopKRouter(32, 4, 2)
    experts = [BitNetExpertFFN(32, 64, activation="relu2") for _ in range(4)]
    moe = BitNetMoEFFN(router, experts)
    assert moe.aux_loss is None
    x = torch.randn(2, 3, 4, 32, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert moe.aux_loss.shape == () and torch.isfinite(moe.aux_loss)

    _, indices, _ = router(x.detach().reshape(-1, 32))
    assert set(indices.flatten().tolist()) == {0, 1, 2, 3}  # every expert gets tokens
    (y.pow(2).mean() + 0.01 * moe.aux_loss).backward()
    for e in experts:
        for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_moe_output_is_weighted_sum_of_experts():
    torch.manual_seed(1)
    experts = [BitNetExpertFFN(32, 64) for _ in range(3)]
    moe = BitNetMoEFFN(FixedRouter(3, [2, 0], [0.25, 0.75]), experts)
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), 0.25 * experts[2](x) + 0.75 * experts[0](x))


def test_zero_weight_expert_contributes_nothing():
    experts = [BitNetExpertFFN(32, 64) for _ in range(2)]
    moe = BitNetMoEFFN(FixedRouter(2, [0, 1], [1.0, 0.0]), experts)
    x = torch.randn(5, 32)
    y = moe(x)
    assert torch.equal(y, experts[0](x))
    y.sum().backward()
    assert torch.count_nonzero(experts[1].gate_proj.weight.grad) == 0
    assert torch.count_nonzero(experts[0].gate_proj.weight.grad) > 0


# ---- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: TopKRouter(32, 4, 5), "top_k"),
        (lambda: TopKRouter(32, 4, 0), "top_k"),
        (lambda: TopKRouter(32, 0, 1), "num_experts"),
        (lambda: TopKRouter(0, 4, 1), "hidden_size"),
        (lambda: IdentityRouter(2, top_k=3), "top_k"),
        (lambda: BitNetExpertFFN(32, 64, activation="gelu"), "activation"),
        (lambda: BitNetExpertFFN(32, 0), "intermediate_size"),
        (lambda: BitNetMoEFFN(IdentityRouter(2), [BitNetExpertFFN(32, 64)]), "num_experts"),
        (lambda: BitNetMoEFFN(IdentityRouter(1), []), "experts"),
        (lambda: BitNetExpertFFN.from_dense(nn.Linear(4, 4)), "gate_proj"),
        (lambda: TopKRouter(32, 4, 2)(torch.randn(3, 16)), "x"),
        (lambda: create_fake_moe_from_dense(nn.Linear(4, 4), 2, 1), "FFN"),
    ],
)
def test_bad_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_fake_moe_bad_arguments(converted):
    with pytest.raises(ValueError, match="top_k"):
        create_fake_moe_from_dense(converted, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        create_fake_moe_from_dense(converted, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="router"):
        create_fake_moe_from_dense(converted, num_experts=2, top_k=1, router="random")
    moe = create_fake_moe_from_dense(converted, num_experts=2, top_k=1, router="identity")
    with pytest.raises(ValueError, match="already"):
        create_fake_moe_from_dense(moe, num_experts=2, top_k=1)


def test_moe_model_copies_after_a_training_step_and_converts_with_a_full_precision_gate(input_ids):
    import copy

    from wrinklefree.nn import pack_model

    model = create_fake_moe_from_dense(tiny_llama(), 2, 1)
    moe = next(m for m in model.modules() if isinstance(m, BitNetMoEFFN))
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    twin = copy.deepcopy(model)  # the live aux_loss (in the autograd graph) is not copied
    assert next(m for m in twin.modules() if isinstance(m, BitNetMoEFFN)).aux_loss is None
    converted = wrinklefree.convert(model, inplace=False)  # a deep copy inside
    assert type(next(m for m in converted.modules() if isinstance(m, TopKRouter)).gate) is nn.Linear
    pack_model(converted)  # the gate keeps its weight, so the packed model still routes
    with torch.no_grad():
        assert converted(input_ids).logits.isfinite().all()
