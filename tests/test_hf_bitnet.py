"""Interop with transformers' own `bitnet` model type (BitNetForCausalLM), on tiny random models.

Tolerances: with quantization off, both sides run the same float computation: logits agree to
1e-6. With quantization on, both quantize with the same formulas, but transformers computes the
activation scale 127/a as a reciprocal product (we divide, as bitnet.cpp does), so a quarter of
its scales are 1 ulp off ours and now and then an activation rounds to the neighbouring int8
value; the same happens between our fake-quantized (float matmul) and packed (integer matmul)
forwards. Such comparisons allow a few of those flips: max |diff| <= 2e-2 and mean |diff| <= 1e-3
on logits whose mean magnitude is about 0.2. Our own save/load round trips are exact to 1e-5.
"""

import copy

import pytest
import torch
import transformers  # noqa: E402
from tiny_configs import TINY_SHAPE, VOCAB  # noqa: E402

from wrinklefree import BitLinear, BitLinearLRC, QuantSchedule, convert  # noqa: E402
from wrinklefree.models.hf_bitnet import (  # noqa: E402
    bitnet_config,
    bitnet_state_dict,
    load_bitnet,
    pack_hf_ternary,
    save_bitnet,
    unpack_hf_ternary,
)
from wrinklefree.nn import bitlinear_modules, pack_model  # noqa: E402


@pytest.fixture(autouse=True)
def no_dynamo():
    # transformers' BitNet layers are decorated with torch.compile; compiling them on CPU takes
    # minutes and changes no result, so run them eagerly.
    with torch._dynamo.config.patch(disable=True):
        yield


def tokens(seed=1):
    return torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(seed))


def converted_llama(tie=False, **kw):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_SHAPE, tie_word_embeddings=tie, **kw)
    return convert(transformers.LlamaForCausalLM(config), activation="relu2").eval()


def assert_close_up_to_rounding_flips(a, b):
    # Our RMSNorm sums in float64 and the fused layer multiplies exact integers, transformers'
    # BitNet works in float32: a few activations land on the other side of a rounding step.
    diff = (a - b).abs()
    assert diff.max() <= 2e-2 and diff.mean() <= 2e-3, (diff.max().item(), diff.mean().item())


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_hf_packed_layout_round_trip_and_known_bytes():
    codes = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)  # 8 rows, 1 column
    packed = pack_hf_ternary(codes)
    # rows r and r + 2, r + 4, r + 6 share byte r, at bits 0-1, 2-3, 4-5, 6-7 (value + 1)
    assert packed.tolist() == [[0 | 2 << 2 | 1 << 4 | 2 << 6], [1 | 2 << 2 | 0 << 4 | 1 << 6]]
    assert torch.equal(unpack_hf_ternary(packed, 8), codes)
    big = torch.randint(-1, 2, (37, 20), dtype=torch.int8)
    assert torch.equal(unpack_hf_ternary(pack_hf_ternary(big), 37), big)
    with pytest.raises(ValueError, match="code 3"):
        unpack_hf_ternary(torch.full((1, 3), 0xFF, dtype=torch.uint8), 4)


def test_loads_a_bitnet_state_dict_with_the_same_logits_unquantized():
    torch.manual_seed(0)
    config = transformers.BitNetConfig(**TINY_SHAPE)
    theirs = transformers.BitNetForCausalLM(config).eval()  # plain nn.Linear: no quantization
    ours = load_bitnet(theirs.state_dict(), config, schedule=QuantSchedule(warmup_steps=10))  # lam = 0
    assert all(isinstance(m, BitLinear) for _, m in bitlinear_modules(ours))
    assert len(dict(bitlinear_modules(ours))) == 7 * config.num_hidden_layers
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_saved_latent_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    ours = converted_llama(tie)
    save_bitnet(ours, tmp_path, packed=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "BitNetForCausalLM"
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    x = tokens()
    assert_close_up_to_rounding_flips(logits(theirs, x), logits(ours, x))
    back = load_bitnet(tmp_path)  # latent weights: trainable BitLinear layers again
    assert not any(m.is_packed for _, m in bitlinear_modules(back))
    torch.testing.assert_close(logits(back, x), logits(ours, x), rtol=0, atol=1e-5)


def test_saved_packed_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    ours = converted_llama()
    # a few training steps first, so the weights are not those of the initialisation
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    x = tokens()
    for _ in range(3):
        ours.train()
        loss = ours(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ours.eval()
    save_bitnet(ours, tmp_path, packed=True)
    config = (tmp_path / "config.json").read_text()
    assert '"model_type": "bitnet"' in config and '"quantization_mode": "offline"' in config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "BitLinear"  # transformers' packed layer
    packed_ours = pack_model(copy.deepcopy(ours))
    their_logits = logits(theirs, x)
    assert_close_up_to_rounding_flips(their_logits, logits(packed_ours, x))
    assert_close_up_to_rounding_flips(their_logits, logits(ours, x))
    back = load_bitnet(tmp_path)  # packed projections load as packed BitLinear layers
    assert all(m.is_packed for _, m in bitlinear_modules(back))
    torch.testing.assert_close(logits(back, x), logits(packed_ours, x), rtol=0, atol=1e-5)


def test_qwen2_attention_bias_is_carried(tmp_path):
    torch.manual_seed(0)
    model = convert(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_SHAPE)).eval())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
    save_bitnet(model, tmp_path, packed=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.attention_bias
    x = tokens()
    assert_close_up_to_rounding_flips(logits(theirs, x), logits(model, x))


def test_packed_qwen2_checkpoint_loads_back_with_its_attention_bias(tmp_path):
    torch.manual_seed(0)
    model = convert(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_SHAPE)).eval(), activation="keep")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
    save_bitnet(model, tmp_path)  # packed
    back = load_bitnet(tmp_path)
    for i in range(2):
        for sub in ("q_proj", "k_proj", "v_proj"):
            ours, theirs = getattr(back.model.layers[i].self_attn, sub), getattr(model.model.layers[i].self_attn, sub)
            assert ours.is_packed and torch.equal(ours.bias, theirs.bias)
        o_proj = back.model.layers[i].self_attn.o_proj  # transformers' BitNet gives all four a bias: zero here
        assert o_proj.is_packed and torch.equal(o_proj.bias, torch.zeros(o_proj.out_features))
    x = tokens()
    torch.testing.assert_close(logits(back, x), logits(pack_model(copy.deepcopy(model)), x), rtol=0, atol=1e-5)

    # a bias the config has but the checkpoint lacks is missing; one the config does not have, unexpected
    state = bitnet_state_dict(model)
    del state["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.self_attn\.k_proj\.bias'\], unexpected \[\]"):
        load_bitnet(state, bitnet_config(model))
    llama = converted_llama()
    state = bitnet_state_dict(llama)
    state["model.layers.0.mlp.up_proj.bias"] = torch.zeros(llama.config.intermediate_size)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['model\.layers\.0\.mlp\.up_proj\.bias'\]"):
        load_bitnet(state, bitnet_config(llama))


def test_models_bitnet_cannot_express_are_refused(tmp_path):
    torch.manual_seed(0)
    qwen3 = convert(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_SHAPE, head_dim=32)))
    with pytest.raises(ValueError, match="q/k norms"):
        save_bitnet(qwen3, tmp_path)
    no_subln = convert(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_SHAPE)), subln="none")
    with pytest.raises(ValueError, match="subln='none'"):
        save_bitnet(no_subln, tmp_path)
    lrc = convert(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_SHAPE)), lrc_rank=2)
    assert isinstance(lrc.model.layers[0].mlp.up_proj, BitLinearLRC)
    with pytest.raises(ValueError, match="LRC"):
        save_bitnet(lrc, tmp_path)
    with pytest.raises(ValueError, match="not converted"):
        save_bitnet(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_SHAPE)), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_state_dict_names_are_transformers_bitnet_names():
    names = set(bitnet_state_dict(converted_llama()))
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in names
    assert "model.layers.1.mlp.ffn_sub_norm.weight" in names
    assert "model.layers.0.mlp.down_proj.weight_scale" in names
    assert not any(".subln." in n or n.endswith(".packed") for n in names)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bitnet(tmp_path)
    with pytest.raises(ValueError, match="needs config"):
        load_bitnet({})
    config = transformers.BitNetConfig(**TINY_SHAPE)
    state = transformers.BitNetForCausalLM(config).state_dict()
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="up_proj.weight"):
        load_bitnet(state, config)
