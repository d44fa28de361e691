"""Sampling, stop strings and the GGUF tokenizer of wrinklefree.inference (no engine needed)."""

import math

import pytest
import torch
from tiny_gguf import IM_END, IM_START, THINK, export_tiny_gguf, read_metadata, tiny_tokenizer

from wrinklefree.inference import GGUFTokenizer, IncrementalDecoder, Sampler, SamplingParams
from wrinklefree.inference.engine import StopFilter
from wrinklefree.inference.sampling import apply_repetition_penalty

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog 123",
    "déjà vu: naïve café, 東京 🦊!",
    "  leading spaces\n\n\ttabs and\r\nnewlines  ",
    f"{IM_START}user\nhi there{IM_END}\n{IM_START}assistant\n",
    f"a {THINK} b",
    "",
]


def draw(sampler, logits, n):
    return torch.tensor([sampler(logits) for _ in range(n)])


# ---- sampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": None}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": "2"}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_params_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SamplingParams(**kwargs)


def test_extreme_params_are_usable():
    Sampler(SamplingParams(seed=2**64 - 1))  # the largest seed torch.Generator takes
    assert SamplingParams(temperature=1, top_p=1, repetition_penalty=2).top_p == 1  # ints are numbers too


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324])
def test_tiny_temperature_tends_to_greedy(temperature):
    """logits / temperature overflows even float64 here: the draw still is the limit, the most likely token,
    and a random one of several equally likely."""
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=0))
    assert draw(sampler, torch.tensor([10.0, 9.0, -5.0, 3e38]), 20).tolist() == [3] * 20
    assert set(draw(sampler, torch.tensor([10.0, -3e38, 10.0, 9.99]), 200).tolist()) == {0, 2}


def test_greedy_is_argmax():
    logits = torch.randn(1000)
    sampler = Sampler(SamplingParams(temperature=0, seed=1))
    assert all(sampler(logits) == int(logits.argmax()) for _ in range(5))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_is_argmax(temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, top_p=1.0, seed=0))
    for _ in range(20):
        logits = torch.randn(500)
        assert sampler(logits) == int(logits.argmax())


def test_top_k_keeps_the_k_most_likely():
    logits = torch.randn(200)
    top = set(torch.topk(logits, 5).indices.tolist())
    drawn = set(draw(Sampler(SamplingParams(temperature=2.0, top_k=5, top_p=1.0, seed=0)), logits, 500).tolist())
    assert drawn == top  # 500 draws at temperature 2 reach each of the 5


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    cases = {0.45: {1}, 0.75: {1, 3}, 0.9: {1, 3, 2}, 1.0: {0, 1, 2, 3}}
    for top_p, nucleus in cases.items():
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, seed=0))
        assert set(draw(sampler, logits, 2000).tolist()) == nucleus, top_p
    # Within the nucleus the draws follow the renormalised probabilities: 0.5 / 0.8 for token 1.
    tokens = draw(Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, seed=0)), logits, 4000)
    assert (tokens == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)


def test_temperature_scales_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0])
    for temperature in (0.5, 2.0):
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=0))
        freq = torch.bincount(draw(sampler, logits, 6000), minlength=3).float() / 6000
        torch.testing.assert_close(freq, torch.softmax(logits / temperature, 0), atol=0.025, rtol=0)


def test_seed_reproducibility():
    logits = torch.zeros(1000)  # uniform: any difference in the random stream shows
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    a = draw(Sampler(params), logits, 30)
    torch.manual_seed(99)  # the global generator does not matter
    torch.rand(10)
    b = draw(Sampler(params), logits, 30)
    c = draw(Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1235)), logits, 30)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_repetition_penalty_math():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -1.0])
    before = logits.clone()
    out = apply_repetition_penalty(logits, [0, 1, 0, 0, 4], 2.0)
    # Positive logits divided, negative multiplied, each seen token once however often it occurs.
    assert torch.equal(out, torch.tensor([1.0, -4.0, 1.0, 0.5, -2.0]))
    assert torch.equal(logits, before)
    assert apply_repetition_penalty(logits, [0, 1], 1.0) is logits
    assert apply_repetition_penalty(logits, [], 2.0) is logits


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([3.0, 2.0, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    assert sampler(logits) == 0
    assert sampler(logits, previous=[0]) == 1  # 3 / 2 < 2
    assert sampler(logits, previous=[0, 1]) == 0  # 1.5 > 1


# ---- stop strings ------------------------------------------------------------------------------------------


def stream(filter_, pieces):
    out = [filter_.push(p) for p in pieces]
    if not filter_.hit:
        out.append(filter_.flush())
    return out


def test_stop_string_cut_across_pieces():
    f = StopFilter(("lo w",))
    assert stream(f, ["he", "llo", " wor", "ld"]) == ["he", "l", "", ""]
    assert f.hit


def test_stop_text_is_held_back_only_while_it_could_start_a_stop_string():
    f = StopFilter(("END", "xyz"))
    assert f.push("abcE") == "abc"  # "E" may start END
    assert f.push("N") == ""  # "EN" too
    assert f.push("d x") == "ENd "  # no longer; "x" may start xyz
    assert f.push("y!") == "xy!"
    assert f.push("xy") == ""
    assert not f.hit
    assert f.flush() == "xy"  # the stream ended: what was held back is text


def test_first_of_several_stop_strings_wins():
    f = StopFilter(("world", "o w"))
    assert f.push("hello world") == "hell"
    assert f.hit


def test_no_stop_strings_pass_everything():
    f = StopFilter(())
    assert stream(f, ["a", "b\ufffd", "c"]) == ["a", "b\ufffd", "c", ""]


# ---- tokenizer ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def metadata(hf_tokenizer, tmp_path_factory):
    return read_metadata(export_tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", hf_tokenizer))


@pytest.fixture(scope="module")
def tokenizer(metadata):
    return GGUFTokenizer(metadata)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_the_original_tokenizer(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text, add_bos=False)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text) == [hf_tokenizer.bos_token_id, *ids]


@pytest.mark.parametrize("text", [t for t in TEXTS if IM_START not in t])
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text  # bos, a control token, is left out


def test_markers_are_single_tokens(tokenizer, hf_tokenizer):
    vocab = hf_tokenizer.get_vocab()
    ids = tokenizer.encode(f"x{IM_START}y{THINK}z", add_bos=False)
    assert vocab[IM_START] in ids and vocab[THINK] in ids
    # Control tokens are hidden unless asked for; user-defined ones are text.
    assert tokenizer.decode(ids) == f"xy{THINK}z"
    assert tokenizer.decode(ids, skip_control=False) == f"x{IM_START}y{THINK}z"


def test_special_ids(tokenizer, hf_tokenizer, metadata):
    vocab = hf_tokenizer.get_vocab()
    assert tokenizer.n_vocab == len(metadata["tokenizer.ggml.tokens"]) == len(hf_tokenizer) + 4
    assert (tokenizer.bos_id, tokenizer.eos_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    assert tokenizer.eot_ids == {hf_tokenizer.eos_token_id, vocab[IM_END]}
    assert tokenizer.add_bos


def test_unused_rows_decode_to_nothing(tokenizer, hf_tokenizer):
    n = len(hf_tokenizer)
    assert tokenizer.token(n) == f"[PAD{n}]"
    hello = tokenizer.encode("hello", add_bos=False)
    assert tokenizer.decode([n, *hello, n + 3]) == "hello"


def test_incremental_decoder_emits_only_complete_characters(tokenizer):
    text = TEXTS[2]
    ids = tokenizer.encode(text, add_bos=False)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the tiny vocabulary splits some characters over byte tokens, held back meanwhile

    fox = tokenizer.encode("🦊", add_bos=False)
    assert len(fox) > 1
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.add(i) for i in fox[:-1]] == [""] * (len(fox) - 1)
    assert decoder.flush() == "\ufffd"  # the stream ended inside a character


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == f"<|bos|>{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"


def test_no_chat_template(metadata):
    tok = GGUFTokenizer({k: v for k, v in metadata.items() if k != "tokenizer.chat_template"})
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.tokens": None}, r"tokenizer\.ggml\.tokens must be a non-empty array of strings"),
        ({"tokenizer.ggml.tokens": []}, r"tokenizer\.ggml\.tokens must be a non-empty array of strings"),
        ({"tokenizer.ggml.tokens": [1, 2]}, r"tokenizer\.ggml\.tokens must be an array of strings"),
        ({"tokenizer.ggml.tokens": "abc"}, r"tokenizer\.ggml\.tokens must be an array of strings"),
        ({"tokenizer.ggml.token_type": ["1"] * 307}, r"tokenizer\.ggml\.token_type must be an array of integers"),
        ({"tokenizer.ggml.merges": [1, 2]}, r"tokenizer\.ggml\.merges must be an array of strings"),
        ({"tokenizer.ggml.merges": ["h e", "zz qq"]}, r"tokenizer\.ggml\.merges\[1\] 'zz qq' names 'zz', which is not"),
        ({"tokenizer.ggml.merges": ["he"]}, r"tokenizer\.ggml\.merges\[0\] must be two tokens separated by a space"),
        # both halves are tokens, their concatenation is not (the tokenizers library panics on this one)
        ({"tokenizer.ggml.merges": ["<|bos|> <|eos|>"]}, r"names '<\|bos\|><\|eos\|>', which is not"),
        ({"tokenizer.ggml.bos_token_id": 0.0}, r"tokenizer\.ggml\.bos_token_id must be a token id, .*got 0\.0"),
        ({"tokenizer.ggml.bos_token_id": -1}, r"tokenizer\.ggml\.bos_token_id must be a token id, .*got -1"),
        ({"tokenizer.ggml.bos_token_id": True}, r"tokenizer\.ggml\.bos_token_id must be a token id"),
        ({"tokenizer.ggml.eos_token_id": 307}, r"tokenizer\.ggml\.eos_token_id .*integer in \[0, 307\), got 307"),
        ({"tokenizer.ggml.eot_token_id": "1"}, r"tokenizer\.ggml\.eot_token_id must be a token id"),
        ({"tokenizer.ggml.add_bos_token": "false"}, r"tokenizer\.ggml\.add_bos_token must be a bool"),
        ({"tokenizer.chat_template": 5}, r"tokenizer\.chat_template must be a string"),
    ],
)
def test_refuses_malformed_metadata(metadata, change, message):
    """Each malformed tokenizer.ggml.* value is a ValueError naming the key, when the tokenizer is built."""
    assert len(metadata["tokenizer.ggml.tokens"]) == 307
    changed = {k: v for k, v in {**metadata, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        GGUFTokenizer(changed)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}", "tokenizer.chat_template: TemplateSyntaxError: Unexpected end of template"),
        ("{{ raise_exception('roles must alternate') }}", "tokenizer.chat_template: TemplateError: roles must alt"),
        ("{{ messages[0]['content'] + 1 }}", "tokenizer.chat_template: TypeError"),
    ],
)
def test_chat_template_errors(metadata, template, message):
    tok = GGUFTokenizer({**metadata, "tokenizer.chat_template": template})  # a bad template fails only in use
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_refuses_other_tokenizer_models(metadata):
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'; only 'gpt2'"):
        GGUFTokenizer({**metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model is None"):
        GGUFTokenizer({})
