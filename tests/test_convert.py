"""wrinklefree.convert on tiny Hugging Face models built from configs (random weights, nothing downloaded)."""

import copy
import tempfile

import pytest
import torch
import transformers  # noqa: E402
from tiny_configs import TINY_SHAPE, VOCAB  # noqa: E402
from torch import nn

from wrinklefree import BitLinear, BitLinearLRC, QSparse, QuantSchedule, convert  # noqa: E402
from wrinklefree.nn import bitlinear_modules, pack_model  # noqa: E402


def tiny(arch: str, **overrides):
    """A tiny causal LM of the given family, seeded."""
    kw = dict(TINY_SHAPE, **overrides)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**kw),  # SmolLM2 is a Llama
        "qwen2": lambda: transformers.Qwen2Config(**kw),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=32, **kw),
        "mistral": lambda: transformers.MistralConfig(**kw),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()


def ids(batch=2, seq=13, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_the_head_becomes_bitlinear_with_subln(arch):
    model = tiny(arch)
    linear_names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    convert(model)
    converted = dict(bitlinear_modules(model))
    assert set(converted) == linear_names - {"lm_head"}
    assert type(model.lm_head) is nn.Linear
    with_subln = {n for n, m in converted.items() if m.subln is not None}
    assert with_subln == {n for n in converted if n.endswith(("o_proj", "down_proj"))}
    assert model.config.wrinklefree["subln"] == "standard"


@pytest.mark.parametrize("arch", ARCHS)
def test_without_quantization_and_subln_logits_are_unchanged(arch):
    model = tiny(arch)
    x = ids()
    expected = model(x).logits
    converted = convert(model, inplace=False, subln="none", schedule=QuantSchedule(warmup_steps=10))
    assert converted is not model and not any(True for _ in bitlinear_modules(model))
    assert torch.equal(converted(x).logits, expected)


def test_conversion_shares_parameters_in_place():
    model = tiny("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    out = convert(model)
    assert out is model and model.model.layers[0].self_attn.q_proj.weight is q


def test_allnorm_puts_subln_before_every_bitlinear():
    model = convert(tiny("qwen2"), subln="allnorm")
    assert all(m.subln is not None for _, m in bitlinear_modules(model))


def test_relu2_activation_and_skip():
    model = convert(tiny("llama"), activation="relu2", skip=["k_proj", "model.layers.1.mlp.*"])
    mlp = model.model.layers[0].mlp
    x = torch.randn(5)
    assert torch.equal(mlp.act_fn(x), torch.relu(x) ** 2) and model.config.hidden_act == "relu2"
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, BitLinear)


def _unfused(model):
    """The same model with the FFNs' own (unfused) forward back."""
    model = copy.deepcopy(model)
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", ["convert", "config"])
def test_relu2_ffns_use_the_fused_op_with_the_same_values(arch, how):
    model = tiny(arch, hidden_act="relu2") if how == "config" else tiny(arch)
    model = convert(model, activation="relu2" if how == "convert" else "keep", schedule=QuantSchedule(0))
    mlps = [layer.mlp for layer in model.model.layers]
    assert all("forward" in mlp.__dict__ for mlp in mlps)
    plain = _unfused(model)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    x = ids()
    out, ref = model(x).logits, plain(x).logits
    assert torch.equal(out, ref)  # the op computes in float32: bitwise the unfused float32 result
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_ffn_calls_the_op_and_survives_deepcopy(monkeypatch):
    from wrinklefree import ops

    model = convert(tiny("llama", hidden_act="relu2"))
    calls = []
    real = ops.relu2_glu
    monkeypatch.setattr(ops, "relu2_glu", lambda g, u: calls.append(g.shape) or real(g, u))
    copied = copy.deepcopy(model)
    copied(ids())
    assert len(calls) == len(model.model.layers)
    mlp = copied.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp  # bound to the copy, not to the original


def test_silu_ffns_are_not_fused():
    model = convert(tiny("llama"))
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_lrc_and_qsparse_options():
    schedule = QuantSchedule(5)
    model = convert(tiny("llama"), lrc_rank=4, qsparse={"ratio": 0.5}, schedule=schedule)
    layers = [m for _, m in bitlinear_modules(model)]
    assert all(isinstance(m, BitLinearLRC) and m.rank == 4 for m in layers)
    assert all(isinstance(m.qsparse, QSparse) and m.qsparse.ratio == 0.5 for m in layers)
    assert all(m.schedule is schedule and m.qsparse.schedule is schedule for m in layers)
    assert model(ids()).logits.isfinite().all()


def test_bad_arguments_and_unsupported_models():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama.*qwen2.*qwen3.*mistral"):
        convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    with pytest.raises(TypeError, match="Hugging Face"):
        convert(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="subln"):
        convert(tiny("llama"), subln="everywhere")
    with pytest.raises(ValueError, match="activation"):
        convert(tiny("llama"), activation="gelu")
    model = convert(tiny("llama"))
    with pytest.raises(ValueError, match="converted twice"):
        convert(model)


def test_convert_on_meta_device_then_materialize():
    config = transformers.LlamaConfig(**TINY_SHAPE)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    convert(model)
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, BitLinear) and layer.weight.is_meta and layer.subln.weight.is_meta
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert torch.equal(layer.subln.weight, torch.ones(128))


def test_convert_then_fsdp2_matches_unsharded():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.fsdp import fully_shard

    model = convert(tiny("llama"))
    reference = copy.deepcopy(model)
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            x = ids()
            loss = model(x, labels=x).loss
            loss.backward()
            ref_loss = reference(x, labels=x).loss
            ref_loss.backward()
            assert torch.equal(loss, ref_loss)
            grad = model.model.layers[0].self_attn.q_proj.weight.grad.full_tensor()
            torch.testing.assert_close(grad, reference.model.layers[0].self_attn.q_proj.weight.grad)
        finally:
            dist.destroy_process_group()


def test_trained_then_packed_gives_the_same_greedy_tokens():
    torch.manual_seed(0)
    model = convert(tiny("llama"), activation="relu2")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(64).remainder(VOCAB).view(2, 32)  # a learnable pattern
    losses = []
    for _ in range(8):
        loss = model(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    prompt = data[:1, :6]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        unpacked = model.generate(prompt, **kw)
        packed_model = pack_model(copy.deepcopy(model))
        packed = packed_model.generate(prompt, **kw)
    assert all(m.is_packed for _, m in bitlinear_modules(packed_model))
    assert torch.equal(packed, unpacked)


def test_converted_model_compiles_and_follows_the_schedule_without_recompiling():
    schedule = QuantSchedule(warmup_steps=2)
    model = convert(tiny("llama"), schedule=schedule)
    compiled = torch.compile(model, backend="aot_eager")
    x = ids()

    def step():
        loss = compiled(x, labels=x).loss
        loss.backward()
        assert torch.equal(loss, model(x, labels=x).loss)
        schedule.step()

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # lam = 0, 0.5: the value is read from the tensor
            step()
    step()  # lam = 1: the layers switch to the fused op, one recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            step()


def test_options_are_checked_for_every_layer_before_any_is_replaced():
    model = tiny("llama")  # k_proj and v_proj have 64 outputs (GQA), q_proj 128
    with pytest.raises(ValueError, match=r"lrc_rank for model\.layers\.0\.self_attn\.k_proj \[64, 128\]: rank must"):
        convert(model, lrc_rank=100)
    with pytest.raises(ValueError, match=r"qsparse block_size=48 does not divide the 128 inputs of model\.layers\.0"):
        convert(model, qsparse={"mode": "block", "block_size": 48})
    with pytest.raises(TypeError, match="schedule must be a QuantSchedule or None, got float"):
        convert(model, schedule=0.5)
    with pytest.raises(TypeError, match="skip must be a module name, a list of names or None"):
        convert(model, skip=3)
    assert not any(True for _ in bitlinear_modules(model))  # untouched: a retry works
    assert all(m.rank == 64 for _, m in bitlinear_modules(convert(model, lrc_rank=64)))


def test_skip_takes_one_name_or_none():
    one = convert(tiny("llama"), skip="q_proj")
    assert type(one.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(one.model.layers[0].self_attn.k_proj, BitLinear)
    assert one.config.wrinklefree["skip"] == ["q_proj"]
    none = convert(tiny("llama"), skip=None)
    assert isinstance(none.model.layers[0].self_attn.q_proj, BitLinear)
    assert type(none.lm_head) is nn.Linear  # the output head is always kept


def test_meta_conversion_initializes_what_it_added_with_reset_added_parameters():
    from wrinklefree.nn import reset_added_parameters

    expected = convert(tiny("llama"), lrc_rank=4)
    state = tiny("llama").state_dict()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny("llama").config)
    convert(model, lrc_rank=4)
    model.to_empty(device="cpu")
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.endswith(("subln.weight", "lrc_u", "lrc_v")) for k in missing)
    reset_added_parameters(model.eval())
    buffers = dict(expected.named_buffers())
    for name, b in model.named_buffers():  # RoPE's, not in the state dict: to_empty left them empty
        b.copy_(buffers[name])
    for (name, got), (_, want) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        if name.endswith("lrc_v"):  # random by design; U = 0 makes it irrelevant to the output
            continue
        assert torch.equal(got, want), name
    torch.testing.assert_close(model(ids()).logits, expected(ids()).logits, rtol=0, atol=0)
