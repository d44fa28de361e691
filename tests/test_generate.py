"""Text generation with the CPU engine: wrinklefree.inference.Engine and python -m wrinklefree.generate, on a tiny
random-weight model exported to GGUF."""

import os
import re
import subprocess
import sys

import pytest
import torch
from tiny_gguf import IM_END, export_tiny_gguf, tiny_tokenizer

from wrinklefree import ops
from wrinklefree.inference import Engine

PROMPT = "hello world, the quick"
STATS = re.compile(r"^prompt: (\d+) tokens, [\d.]+ tok/s \| decode: (\d+) tokens, [\d.]+ tok/s$")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_path(hf_tokenizer, tmp_path_factory):
    return export_tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", hf_tokenizer)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path)


def greedy_reference(engine, prompt_ids, n):
    """Tokens chosen by argmax of the engine's logits, one step at a time, up to n or an end token."""
    engine.reset()
    logits = engine.logits(prompt_ids)
    tokens = []
    while len(tokens) < n:
        token = int(logits.argmax())
        if token in engine.tokenizer.eot_ids:
            break
        tokens.append(token)
        if len(tokens) < n:  # the last token needs no forward pass
            logits = engine.logits([token])
    return tokens


def cli(*args, check_rc=0):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run(
        [sys.executable, "-m", "wrinklefree.generate", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )
    assert r.returncode == check_rc, r.stderr
    return r


# ---- the Python API ----------------------------------------------------------------------------------------


def test_properties(engine, model_path):
    assert engine.arch == "bitnet-b1.58"
    assert engine.n_vocab == engine.tokenizer.n_vocab == len(engine.metadata["tokenizer.ggml.tokens"])
    assert engine.n_ctx == 128  # 2048 asked for, capped at the file's context_length
    assert Engine(model_path, n_ctx=16).n_ctx == 16


def test_greedy_is_argmax_step_by_step(engine):
    n = 24
    expected = greedy_reference(engine, engine.tokenizer.encode(PROMPT), n)
    assert len(expected) == n  # the tiny model's greedy continuation has no end token
    first = "".join(engine.generate(PROMPT, max_tokens=n, temperature=0))
    stats = engine.last_stats
    assert first == engine.tokenizer.decode(expected)
    assert "".join(engine.generate(PROMPT, max_tokens=n, temperature=0)) == first  # deterministic
    assert stats.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert stats.decode_tokens == len(expected) - 1 and stats.decode_seconds > 0 and stats.decode_tps > 0
    assert stats.prompt_seconds > 0 and stats.prompt_tps > 0
    assert stats.finish_reason == "length"


def test_token_id_prompt(engine):
    ids = engine.tokenizer.encode(PROMPT)
    expected = engine.tokenizer.decode(greedy_reference(engine, ids, 8))
    assert "".join(engine.generate(ids, max_tokens=8, temperature=0)) == expected


def test_repetition_penalty_is_applied(engine):
    ids = engine.tokenizer.encode(PROMPT)
    plain = greedy_reference(engine, ids, 16)
    penalised = "".join(engine.generate(ids, 16, temperature=0, repetition_penalty=5.0))
    assert len(set(plain)) < len(plain)  # the random model repeats itself greedily ...
    assert penalised != engine.tokenizer.decode(plain)  # ... and not in the same way when penalised


def test_seed_reproducibility(engine):
    kwargs = dict(max_tokens=24, temperature=1.5, top_k=0, top_p=1.0)
    a = "".join(engine.generate(PROMPT, seed=7, **kwargs))
    b = "".join(engine.generate(PROMPT, seed=7, **kwargs))
    c = "".join(engine.generate(PROMPT, seed=8, **kwargs))
    assert a == b
    assert a != c


def test_stop_strings(engine):
    full = "".join(engine.generate(PROMPT, max_tokens=40, temperature=0))
    assert len(full) > 6
    stop = full[3:6]
    cut = full.find(stop)
    pieces = list(engine.generate(PROMPT, max_tokens=40, temperature=0, stop=["never appears", stop]))
    assert "".join(pieces) == full[:cut]
    assert engine.last_stats.finish_reason == "stop"
    assert "".join(engine.generate(PROMPT, max_tokens=40, temperature=0, stop="never appears")) == full


def test_max_tokens_and_context_limit(engine, model_path):
    ids = engine.tokenizer.encode(PROMPT)
    list(engine.generate(PROMPT, max_tokens=5, temperature=0))
    assert (engine.last_stats.finish_reason, engine.last_stats.decode_tokens) == ("length", 4)
    small = Engine(model_path, n_ctx=len(ids) + 3)  # room for 3 forward passes after the prompt: 4 tokens
    reference = greedy_reference(small, ids, 4)
    text = "".join(small.generate(PROMPT, max_tokens=100, temperature=0))
    assert small.last_stats.finish_reason == "context"
    assert small.n_past == small.n_ctx
    assert text == small.tokenizer.decode(reference)
    with pytest.raises(ValueError, match="exceed n_ctx"):
        small.logits([1] * 5)
    with pytest.raises(ValueError, match="leaving no room to generate in a context of 16"):
        small.generate(PROMPT + PROMPT)


def test_stats_kept_when_the_reader_stops_early(engine):
    pieces = engine.generate(PROMPT, max_tokens=40, temperature=0)
    next(pieces)
    pieces.close()
    assert engine.last_stats.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert engine.last_stats.finish_reason == ""


def test_chat(engine):
    tok = engine.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(rendered, add_bos=False)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template writes bos
    text = "".join(engine.generate("hi", max_tokens=12, temperature=0, chat=True))
    assert engine.last_stats.prompt_tokens == len(ids)  # no second bos
    assert text == tok.decode(greedy_reference(engine, ids, 12))
    with pytest.raises(ValueError, match="needs a text prompt"):
        engine.generate(ids, chat=True)


def test_no_chat_template(hf_tokenizer, tmp_path):
    engine = Engine(export_tiny_gguf(tmp_path / "plain.gguf", hf_tokenizer, chat_template=None))
    assert engine.tokenizer.eot_ids >= {hf_tokenizer.eos_token_id, hf_tokenizer.convert_tokens_to_ids(IM_END)}
    with pytest.raises(ValueError, match="no chat template"):
        engine.generate("hi", chat=True)


def test_bad_arguments(engine, tmp_path, threads):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Engine(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="head must be one of f16, int8"):
        Engine(engine.path, head="q8")
    for kwargs, match in [
        ({"top_p": 0}, "top_p must be in"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"stop": [""]}, "stop strings must be non-empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(PROMPT, **kwargs)
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        engine.generate([])
    with pytest.raises(ValueError, match=rf"prompt token ids must be in \[0, {engine.n_vocab}\), got \[-1, 999\]"):
        engine.generate([0, -1, 5, 999])
    Engine(engine.path, threads=1)
    assert ops.get_num_threads() == 1


def test_int8_head(model_path, engine):
    int8 = Engine(model_path, head="int8")
    ids = engine.tokenizer.encode(PROMPT)
    engine.reset()
    a, b = engine.logits(ids), int8.logits(ids)
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


# ---- the CLI -----------------------------------------------------------------------------------------------


def test_cli_greedy(engine, model_path):
    expected = "".join(engine.generate(PROMPT, max_tokens=10, temperature=0))
    r = cli("--model", model_path, "--prompt", PROMPT, "--max-tokens", 10, "--temperature", 0, "--threads", 1)
    assert r.stdout == expected + "\n"
    match = STATS.match(r.stderr.strip())
    assert match, r.stderr
    assert int(match.group(1)) == engine.last_stats.prompt_tokens
    assert int(match.group(2)) == engine.last_stats.decode_tokens


def test_cli_sampling_chat_and_stop(engine, model_path):
    args = ("--model", model_path, "--prompt", "hi", "--max-tokens", 12, "--temperature", 1.2, "--seed", 5)
    a, b = cli(*args, "--top-k", 0, "--top-p", 0.9), cli(*args, "--top-k", 0, "--top-p", 0.9)
    assert a.stdout == b.stdout
    chat = cli(*args, "--chat", "--head", "int8", "--repetition-penalty", 1.3, "--ctx", 64)
    expected = Engine(model_path, n_ctx=64, head="int8").generate(
        "hi", max_tokens=12, temperature=1.2, seed=5, chat=True, repetition_penalty=1.3
    )
    assert chat.stdout == "".join(expected) + "\n"
    full = cli("--model", model_path, "--prompt", PROMPT, "--max-tokens", 30, "--temperature", 0).stdout
    stop = full[4:6]
    cut = cli("--model", model_path, "--prompt", PROMPT, "--max-tokens", 30, "--temperature", 0, "--stop", stop)
    assert cut.stdout == full[: full.find(stop)] + "\n"


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing", (), "model file not found"),
        ("junk", (), "not a GGUF file"),
        ("truncated", (), "truncated or corrupt"),
        ("model", ("--top-p", "1.5"), "top_p must be in"),
        ("model", ("--max-tokens", "0"), "max_tokens must be >= 1"),
    ],
)
def test_cli_errors(model_path, tmp_path, case, extra, message):
    path = tmp_path / "m.gguf"
    if case == "junk":
        path.write_bytes(b"not a gguf file at all")
    elif case == "truncated":
        path.write_bytes(model_path.read_bytes()[:5000])
    elif case == "model":
        path = model_path
    r = cli("--model", path, "--prompt", "hi", *extra, check_rc=2)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
