"""wrinklefree.eval: held-out perplexity of a PyTorch model and of a GGUF model in the CPU engine."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_configs import TINY_SHAPE, VOCAB
from tiny_gguf import export_tiny_gguf, tiny_tokenizer

from wrinklefree.eval import engine_perplexity, heldout_sequences, model_perplexity
from wrinklefree.eval.perplexity import Perplexity
from wrinklefree.inference import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_SHAPE, "max_position_embeddings": 64})
    return transformers.LlamaForCausalLM(config).eval()


def sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def by_hand(model, seqs):
    """Mean next-token NLL, one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            logits = model(input_ids=ids[None]).logits[0, :-1]
            total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count, count


def test_model_perplexity_is_the_mean_next_token_nll(model):
    seqs = sequences([9, 9, 9, 17, 9, 2])  # lengths mixed: each batch holds one length
    nll, count = by_hand(model, seqs)
    for batch_size in (1, 2, 8):
        got = model_perplexity(model, seqs, batch_size=batch_size)
        assert got.tokens == count
        assert got.nll == pytest.approx(nll, rel=1e-5)
        assert got.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    stacked = torch.stack(seqs[:3])  # one [n, S] tensor works as n sequences
    assert model_perplexity(model, stacked).nll == pytest.approx(by_hand(model, seqs[:3])[0], rel=1e-5)
    model.train()
    model_perplexity(model, seqs)
    assert model.training  # its mode is given back
    model.eval()


def test_model_perplexity_bad_arguments(model):
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            model_perplexity(model, sequences([5]), batch_size=batch_size)
    with pytest.raises(ValueError, match="no sequences"):
        model_perplexity(model, [])
    with pytest.raises(ValueError, match="sequence 1 has 1 tokens; a perplexity needs at least 2"):
        model_perplexity(model, sequences([4, 1]))
    with pytest.raises(ValueError, match="a sequence of 65 tokens exceeds n_ctx=64"):
        model_perplexity(model, sequences([65]))
    with pytest.raises(ValueError, match="sequence 0 must be a 1-D tensor of token ids"):
        model_perplexity(model, [torch.zeros(2, 3, dtype=torch.long)])


def test_engine_perplexity_checks_its_sequences(tmp_path):
    engine = Engine(export_tiny_gguf(tmp_path / "m.gguf", tiny_tokenizer(tmp_path)), n_ctx=128)
    seqs = sequences([7, 12], seed=3)
    got = engine_perplexity(engine, seqs)
    assert got.tokens == 6 + 11 and math.isfinite(got.nll) and got.nll > 0
    assert engine_perplexity(engine, torch.stack([seqs[0], seqs[0]])).nll == pytest.approx(
        engine_perplexity(engine, [seqs[0]]).nll, rel=1e-6
    )
    with pytest.raises(ValueError, match="a sequence of 129 tokens exceeds n_ctx=128"):
        engine_perplexity(engine, sequences([129]))
    with pytest.raises(ValueError, match="has 0 tokens"):
        engine_perplexity(engine, [torch.zeros(0, dtype=torch.long)])


def test_heldout_sequences_bad_arguments():
    data = {"eval_fraction": 0.1, "seq_len": 16, "sources": [{"type": "builtin", "max_chars": 20_000}]}
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 2\.5"):
        heldout_sequences(data, None, 2.5)
    for fraction in (0, -0.1, float("nan"), 0.7):
        with pytest.raises(ValueError, match=r"data.eval_fraction must be in \(0, 0.5\]"):
            heldout_sequences({**data, "eval_fraction": fraction}, None, 2)


def test_perplexity_past_float_range_is_inf():
    assert Perplexity(1000.0, 1).ppl == math.inf
    assert Perplexity(1.0, 1).ppl == pytest.approx(math.e)
