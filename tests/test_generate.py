"""Text generation with the CPU engine: wrinklefree.inference.Engine and python -m wrinklefree.generate, on a tiny
random-weight model exported to GGUF."""

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, IM_END, export_tiny_gguf, tiny_tokenizer

from wrinklefree import ops
from wrinklefree.inference import Engine

PROMPT = "hello world, the quick"
STATS = re.compile(r"^prompt: (\d+) tokens, [\d.]+ tok/s \| decode: (\d+) tokens, [\d.]+ tok/s$")

# Same-length byte patches of the test model's tokenizer metadata (so every offset stays right): the bytes
# replaced, their replacement, and the error they cause. GGUF value types: 4 uint32, 5 int32, 6 float32.
BOS = b"tokenizer.ggml.bos_token_id"
DAMAGE = {
    "no_tokens": (b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz", r"tokenizer\.ggml\.tokens must be a non-empty"),
    "bos_float": (BOS + struct.pack("<II", 4, 0), BOS + struct.pack("<If", 6, 0.0), r"bos_token_id .*, got 0\.0$"),
    "bos_negative": (BOS + struct.pack("<II", 4, 0), BOS + struct.pack("<Ii", 5, -1), r"bos_token_id .*, got -1$"),
    "merge": (
        struct.pack("<Q", 3) + b"h e",
        struct.pack("<Q", 3) + b"\x01 \x02",
        r"tokenizer\.ggml\.merges\[\d+\] .* is not in tokenizer\.ggml\.tokens",
    ),
    "template": (
        CHAT_TEMPLATE.encode(),
        b"{% for m in messages %}".ljust(len(CHAT_TEMPLATE.encode())),
        r"tokenizer\.chat_template: TemplateSyntaxError",
    ),
}


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


def damaged(model_path, tmp_path, case):
    """A copy of the model file with the metadata patch ``DAMAGE[case]``."""
    old, new, _ = DAMAGE[case]
    blob = model_path.read_bytes()
    assert len(old) == len(new) and blob.count(old) == 1
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(blob.replace(old, new))
    return path


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
    with pytest.raises(IsADirectoryError, match="is a directory, not a GGUF file"):
        Engine(tmp_path)
    with pytest.raises(ValueError, match="head must be one of f16, int8"):
        Engine(engine.path, head="q8")
    with pytest.raises(TypeError, match="^use_mmap must be a bool, got str"):
        Engine(engine.path, use_mmap="yes")
    for kwargs, match in [
        ({"n_ctx": 64.5}, r"^n_ctx must be an integer >= 1, got 64\.5"),
        ({"n_ctx": True}, r"^n_ctx must be an integer >= 1, got True"),
        ({"threads": 0}, r"^threads must be an integer >= 1, got 0"),
        ({"threads": 1.5}, r"^threads must be an integer >= 1, got 1\.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            Engine(engine.path, **kwargs)
    for kwargs, match in [
        ({"top_p": 0}, "^top_p must be a number in"),
        ({"top_p": None}, "^top_p must be a number in"),
        ({"temperature": "0.5"}, "^temperature must be a number >= 0"),
        ({"seed": 2**64}, r"^seed must be an integer in \[0, 2\*\*64\)"),
        ({"max_tokens": 0}, "^max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": 2.5}, "^max_tokens must be an integer >= 1, got 2.5"),
        ({"max_tokens": True}, "^max_tokens must be an integer >= 1, got True"),
        ({"stop": [""]}, "^stop must be a non-empty string or several"),
        ({"stop": ["ok", 3]}, "^stop must be a non-empty string or several"),
        ({"stop": None}, "^stop must be a non-empty string or several"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(PROMPT, **kwargs)
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        engine.generate([])
    ids_error = rf"^prompt must hold token ids, integers in \[0, {engine.n_vocab}\), got "
    with pytest.raises(ValueError, match=ids_error + r"\[-1, 999\]"):
        engine.generate([0, -1, 5, 999])
    with pytest.raises(ValueError, match=ids_error + r"\[5\.7, True\]"):
        engine.generate([0, 5.7, True])
    with pytest.raises(ValueError, match="^prompt must be a sequence of token ids, got NoneType"):
        engine.generate(None)
    with pytest.raises(ValueError, match=r"^tokens must hold token ids, integers in \[0, \d+\), got \[1\.0\]"):
        engine.logits([0, 1.0])
    ids = engine.tokenizer.encode(PROMPT)
    expected = "".join(engine.generate(ids, max_tokens=4, temperature=0))
    for array in (np.array(ids), torch.tensor(ids)):  # numpy and torch integers are token ids too
        assert "".join(engine.generate(array, max_tokens=4, temperature=0)) == expected
    with pytest.raises(ValueError, match=ids_error):
        engine.generate(np.array([0.0, 1.0]))
    Engine(engine.path, threads=1)
    assert ops.get_num_threads() == 1


def test_tiny_temperature_is_the_greedy_limit(engine):
    """logits / temperature would overflow: the draws are the most likely tokens, as greedy picks them."""
    greedy = "".join(engine.generate(PROMPT, max_tokens=12, temperature=0))
    assert "".join(engine.generate(PROMPT, max_tokens=12, temperature=1e-38, seed=0)) == greedy
    assert engine.last_stats.decode_tokens == 11


def test_empty_prompt_starts_from_bos(model_path, engine):
    """Empty text is the bos token alone (an unconditional generation), or no tokens without bos."""
    bos = engine.tokenizer.bos_id
    expected = "".join(engine.generate([bos], max_tokens=6, temperature=0))
    assert "".join(engine.generate("", max_tokens=6, temperature=0)) == expected
    assert engine.last_stats.prompt_tokens == 1
    no_bos = Engine(model_path, n_ctx=16)
    no_bos.tokenizer.add_bos = False
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        no_bos.generate("")
    r = cli("--model", model_path, "--prompt", "", "--max-tokens", 6, "--temperature", 0)
    assert r.stdout == expected + "\n"


def test_prompt_ids_outside_the_model_are_refused(model_path, monkeypatch):
    """A tokenizer with more tokens than the model has embedding rows: its ids are checked before any stream."""
    engine = Engine(model_path, n_ctx=16)
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, add_bos: [0, engine.n_vocab])
    with pytest.raises(ValueError, match=rf"m\.gguf: the prompt encodes to token ids \[{engine.n_vocab}\] outside"):
        engine.generate("hi")


def test_streams_share_the_cache(engine):
    """A stream stops with RuntimeError once another generate(), logits() or reset() used the engine."""
    ids = engine.tokenizer.encode(PROMPT)
    other = [0, 250, 3, 17, 42, 7, 7, 7]
    alone = list(engine.generate(ids, max_tokens=12, temperature=0))
    other_alone = "".join(engine.generate(other, max_tokens=12, temperature=0))
    assert len(alone) > 2
    for interrupt in (
        lambda: list(engine.generate(other, max_tokens=12, temperature=0)),
        lambda: engine.generate(other),  # created, never read: it owns the cache from now on
        lambda: engine.logits([1, 2]),
        engine.reset,
    ):
        first = engine.generate(ids, max_tokens=12, temperature=0)
        assert next(first) == alone[0]
        interrupt()
        with pytest.raises(RuntimeError, match="another call used the engine's cache since this stream started"):
            list(first)
    # A stream not yet started when another is made is refused too; the newest one is unaffected.
    first = engine.generate(ids, max_tokens=12, temperature=0)
    second = engine.generate(other, max_tokens=12, temperature=0)
    with pytest.raises(RuntimeError, match="another call used the engine's cache"):
        next(first)
    assert "".join(second) == other_alone
    # Reading streams one after another is fine, and so is using the engine once a stream has ended.
    done = engine.generate(ids, max_tokens=12, temperature=0)
    assert list(done) == alone
    engine.reset()
    assert list(done) == []


def test_damaged_tokenizer_metadata(model_path, tmp_path):
    """Files whose tokenizer metadata is malformed are refused at load with a ValueError naming the file and the
    key; a malformed chat template only when the prompt uses it."""
    for case in ("no_tokens", "bos_float", "bos_negative", "merge"):
        path = damaged(model_path, tmp_path, case)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{DAMAGE[case][2]}"):
            Engine(path)
    path = damaged(model_path, tmp_path, "template")
    engine = Engine(path, n_ctx=32)
    assert "".join(engine.generate("hi", max_tokens=3, temperature=0))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {DAMAGE['template'][2]}"):
        engine.generate("hi", chat=True)


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
    mapped = cli("--model", model_path, "--prompt", PROMPT, "--max-tokens", 10, "--temperature", 0, "--mmap")
    assert mapped.stdout == expected + "\n"
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
        ("directory", (), "is a directory, not a GGUF file"),
        ("junk", (), "not a GGUF file"),
        ("truncated", (), "truncated or corrupt"),
        ("model", ("--top-p", "1.5"), "--top-p must be a number in (0, 1], got 1.5"),
        ("model", ("--max-tokens", "0"), "--max-tokens must be an integer >= 1, got 0"),
        ("model", ("--threads", "0"), "--threads must be an integer >= 1, got 0"),
        ("model", ("--ctx", "0"), "--ctx must be an integer >= 1, got 0"),
        ("model", ("--seed", "-1"), "--seed must be an integer in [0, 2**64), got -1"),
        ("model", ("--stop", ""), "--stop must be a non-empty string"),
        ("no_tokens", (), "tokenizer.ggml.tokens must be a non-empty array of strings"),
        ("bos_float", (), "tokenizer.ggml.bos_token_id must be a token id"),
        ("bos_negative", (), "tokenizer.ggml.bos_token_id must be a token id"),
        ("merge", (), "which is not in tokenizer.ggml.tokens"),
        ("template", ("--chat",), "tokenizer.chat_template: TemplateSyntaxError"),
    ],
)
def test_cli_errors(model_path, tmp_path, case, extra, message):
    path = tmp_path / "m.gguf"
    if case == "junk":
        path.write_bytes(b"not a gguf file at all")
    elif case == "truncated":
        path.write_bytes(model_path.read_bytes()[:5000])
    elif case == "directory":
        path = tmp_path
    elif case == "model":
        path = model_path
    elif case in DAMAGE:
        path = damaged(model_path, tmp_path, case)
    r = cli("--model", path, "--prompt", "hi", *extra, check_rc=2)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
