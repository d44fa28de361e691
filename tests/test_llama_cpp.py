"""llama.cpp interop: our TQ2_0 / TQ1_0 files run in upstream llama.cpp (llama-cpp-python), compute the
PyTorch model they were exported from, and give the same greedy continuation as our engine.

Skipped when llama-cpp-python is not installed, unless WF_REQUIRE_LLAMA_CPP=1 (CI sets it): then a
missing install fails instead of hiding as a skip.

Why a tolerance and not bit-equality. The three run the same ternary model but round in different
places: llama.cpp quantizes a projection's input to int8 in blocks of 256 values (Q8_K), we per row;
it holds the weight scale as fp16 per block and the KV cache in fp16, and its head multiplies fp16
activations. In a ternary model these are not small: a change of 1e-3 in a projection's input moves
a few percent of its int8 codes by one step, so every such difference re-draws part of the
quantization noise, which compounds over 14 quantized matmuls. Measured on this model (logits of
standard deviation ~5 per position): max |llama.cpp - PyTorch| / std = 0.075 (the same for TQ2_0 and
TQ1_0, which hold the same codes and fp16 scales), max |engine - llama.cpp| / std = 0.063. The
tolerance, REL_TOL = 0.15 of the std, is twice that, and is checked to be tight enough to matter: the
same model with relu2 instead of silu is > 1.1 std away from llama.cpp at every position.

At this scale a random model's greedy continuation repeats its last token with a top-2 margin of
at least 4.5 std: no near-ties, so the token lists must be equal; the logits at every step are compared too.
"""

import copy
import os

import numpy as np
import pytest
import torch

try:
    import llama_cpp
except ImportError as e:
    if os.environ.get("WF_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(f"WF_REQUIRE_LLAMA_CPP=1 but llama_cpp does not import: {e}", pytrace=False)
    pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)", allow_module_level=True)

from test_export import bitnet_model, corpus  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from wrinklefree.data import get_tokenizer  # noqa: E402
from wrinklefree.export import export_gguf  # noqa: E402
from wrinklefree.inference import Engine  # noqa: E402

pytestmark = pytest.mark.slow

OUTTYPES = ["tq2_0", "tq1_0"]
THREADS = 2
N_CTX = 64  # the model's max_position_embeddings
PROMPT = [17, 250, 3, 101, 42, 199, 8, 77, 150, 260]  # token ids, fed as they are (no tokenizer in the loop)
N_NEW = 16
EMBED_STD = 0.3  # the embedding is also the head: logits of std ~5
REL_TOL = 0.15  # max |a - b| over the vocabulary, as a share of the reference logits' std at that position
MIN_MARGIN = 4 * REL_TOL  # top-1 minus top-2 logit at every greedy step (in std), so no choice can flip
RELU2_GAP = 4 * REL_TOL  # the wrong-activation control must be at least this far off at every position


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory):
    """A random silu bitnet (vocab 304, hidden 256, FFN 512, 2 layers, 4 heads / 2 KV heads), its
    embedding rounded to fp16 as the file holds it, exported to every outtype."""
    tokenizer = get_tokenizer(None, vocab_size=300, corpus=corpus, cache_dir=tmp_path_factory.mktemp("tok"))
    model = bitnet_model(tokenizer, act="silu")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(0)
        emb.copy_((torch.randn(emb.shape, generator=g) * EMBED_STD).half().float())
    assert model.lm_head.weight is emb
    out = tmp_path_factory.mktemp("gguf")
    files = {t: export_gguf(model, out / f"m-{t}.gguf", t, tokenizer=tokenizer) for t in OUTTYPES}
    return model, tokenizer, files


def llama(path):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,  # llama.cpp rounds it up to 256; positions stay within the model's 64
        n_batch=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=True,
        verbose=False,
    )


def llama_logits(llm, tokens):
    """float32 [len(tokens), n_vocab]: llama.cpp's logits at every position of ``tokens``, after its cache."""
    start = llm.n_tokens
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[start : llm.n_tokens], dtype=np.float32))


def greedy(step, prompt, n):
    """``n`` greedy tokens and the logits they were chosen from ([n, n_vocab]); ``step(tokens)`` runs tokens
    after the ones before and returns the last position's logits."""
    logits, tokens, seen = step(prompt), [], []
    for _ in range(n):
        seen.append(logits)
        tokens.append(int(logits.argmax()))
        logits = step(tokens[-1:])
    return tokens, torch.stack(seen)


def llama_greedy(llm, prompt, n):
    llm.reset()
    return greedy(lambda t: llama_logits(llm, t)[-1], prompt, n)


@torch.no_grad()
def torch_logits(model, tokens):
    return model(torch.tensor([tokens])).logits[0].float()


def torch_greedy(model):
    """N_NEW greedy tokens after PROMPT, recomputing the whole sequence each step (no cache)."""
    tokens = list(PROMPT)
    for _ in range(N_NEW):
        tokens.append(int(torch_logits(model, tokens)[-1].argmax()))
    return tokens[len(PROMPT) :]


def rel_err(got, ref):
    """Per position: max |got - ref| over the vocabulary over the std of ref's logits."""
    return ((got - ref).abs().amax(-1) / ref.std(-1)).tolist()


def margins(logits):
    """Per position: top-1 minus top-2 logit, in std of that position's logits."""
    top2 = logits.topk(2, dim=-1).values
    return ((top2[:, 0] - top2[:, 1]) / logits.std(-1)).tolist()


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_loads_with_our_hparams(model_and_files, outtype):
    model, _, files = model_and_files
    llm = llama(files[outtype])
    cfg = model.config
    assert llm.n_vocab() == cfg.vocab_size
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == cfg.max_position_embeddings
    assert llama_cpp.llama_model_n_embd(llm.model) == cfg.hidden_size
    assert llm.metadata["general.architecture"] == "bitnet"
    assert int(llm.metadata["bitnet.block_count"]) == cfg.num_hidden_layers


def test_tokenizer_metadata(model_and_files):
    # With no tokenizer.ggml.pre llama.cpp uses its default BPE pre-tokenizer, which splits plain
    # lowercase words as byte-level BPE does: such text tokenizes to the transformers tokenizer's ids.
    _, tokenizer, files = model_and_files
    llm = llama(files["tq2_0"])
    for text in ["the quick brown fox jumps over the lazy dog", "hello world bitnet ternary weights"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    assert llm.token_bos() == tokenizer.bos_token_id
    assert llm.token_eos() == tokenizer.eos_token_id


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_computes_the_exported_model(model_and_files, outtype):
    """llama.cpp's bitnet graph on our file is the model we exported (silu FFN, SubLN, NEOX RoPE, GQA,
    tied head): the logits at every position, in one batch and token by token, and the greedy tokens."""
    model, _, files = model_and_files
    want = torch_greedy(model)
    seq = PROMPT + want
    ref = torch_logits(model, seq)
    assert min(margins(ref[len(PROMPT) - 1 : -1])) > MIN_MARGIN, "a near-tie: pick another EMBED_STD or seed"

    llm = llama(files[outtype])
    batch = llama_logits(llm, seq)
    assert max(rel_err(batch, ref)) < REL_TOL

    tokens, steps = llama_greedy(llm, PROMPT, N_NEW)
    assert tokens == want
    assert max(rel_err(steps, ref[len(PROMPT) - 1 : -1])) < REL_TOL

    # The tolerance tells activations apart: the relu2 model is far off at every position.
    relu2 = copy.deepcopy(model)
    for layer in relu2.model.layers:
        layer.mlp.act_fn = ACT2FN["relu2"]
    assert min(rel_err(batch, torch_logits(relu2, seq))) > RELU2_GAP


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_greedy_matches_engine(model_and_files, outtype):
    """Our engine and llama.cpp on the same file: the same greedy tokens, from logits within REL_TOL."""
    _, _, files = model_and_files
    want, want_steps = llama_greedy(llama(files[outtype]), PROMPT, N_NEW)
    assert min(margins(want_steps)) > MIN_MARGIN

    engine = Engine(files[outtype], n_ctx=N_CTX, threads=THREADS)
    tokens, steps = greedy(lambda t: engine.logits(t).clone(), PROMPT, N_NEW)
    assert steps.dtype == torch.float32 and steps.shape == want_steps.shape
    assert tokens == want
    assert max(rel_err(steps, want_steps)) < REL_TOL

    engine.reset()  # a fresh sequence computes the same logits again
    assert torch.equal(engine.logits(PROMPT), steps[0])
