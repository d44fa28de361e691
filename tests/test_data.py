"""The data layer: built-in corpus, tokenizers, sources, packing, mixtures, ranks, eval split and resume."""

import json
import re
import sys
import time

import numpy as np
import pytest
import torch

from wrinklefree.data import (
    BuiltinSource,
    DocumentTokens,
    HFDatasetSource,
    LocalFilesSource,
    PackedSequences,
    Source,
    build_loader,
    build_source,
    builtin_corpus,
    get_tokenizer,
    packing,
    sources_from_config,
)
from wrinklefree.data import tokenizer as tokenizer_module

SMALL = 300_000  # characters of the built-in corpus used to train the test tokenizer


class ListSource(Source):
    """Documents from a list, for tests."""

    def __init__(self, docs, name="list"):
        self.docs, self.name = list(docs), name

    def documents(self):
        return iter(self.docs)

    def __repr__(self):
        return f"ListSource({self.name})"


def numbered_docs(n, prefix="doc", words=12):
    """Documents that say which one they are: 'doc17 w0 w1 ...' (lengths vary with the number)."""
    return [f"{prefix}{i} " + " ".join(f"w{j}" for j in range(words + i % 7)) + "." for i in range(n)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # Nothing a test computes may land in the user's cache.
    monkeypatch.setenv("WF_CACHE_DIR", str(tmp_path / "wf_cache"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A byte-level BPE of 300 tokens trained on the first 300 kB of the built-in corpus."""
    return get_tokenizer(
        None, vocab_size=300, corpus=lambda: builtin_corpus(SMALL), cache_dir=tmp_path_factory.mktemp("tok")
    )


def take(loader, n):
    return [next(loader)["input_ids"] for _ in range(n)]


# ---------------------------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_deterministic_and_capped():
    full = builtin_corpus()
    assert len(full) > 100 and all(isinstance(d, str) and d for d in full)
    assert full == builtin_corpus()
    assert sum(map(len, full)) <= 16_000_000
    assert any("def " in d for d in full)  # standard-library code
    assert any("Python" in d and "def " not in d for d in full)  # pydoc topics prose
    small = builtin_corpus(10_000)
    assert sum(map(len, small)) == 10_000
    assert small[:-1] == full[: len(small) - 1] and full[len(small) - 1].startswith(small[-1])
    assert builtin_corpus(0) == []


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_bpe_round_trips_and_has_special_tokens(tok):
    assert len(tok) == 300
    specials = {
        "<|bos|>": tok.bos_token_id,
        "<|eos|>": tok.eos_token_id,
        "<|pad|>": tok.pad_token_id,
        "<|mask|>": tok.mask_token_id,
    }
    assert len(set(specials.values())) == 4
    for text, i in specials.items():
        assert tok.convert_tokens_to_ids(text) == i
    for s in ["def f(x):\n    return x + 1\n", "  leading and trailing  \t\n", "héllo wörld, 日本語, emoji 🙂, \x00"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        assert not set(ids) & set(specials.values())


def test_bpe_is_trained_once_then_loaded_from_cache(tmp_path, monkeypatch, capsys):
    t0 = time.perf_counter()
    first = get_tokenizer(None, vocab_size=300, cache_dir=tmp_path)  # the default: the whole built-in corpus
    t_train = time.perf_counter() - t0
    assert "training tokenizer" in capsys.readouterr().out
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    real_train_bpe = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    t0 = time.perf_counter()
    second = get_tokenizer("builtin", vocab_size=300, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < t_train
    assert "training tokenizer" not in capsys.readouterr().out
    text = "import os\nprint(os.getcwd())  # ok"
    assert second.encode(text) == first.encode(text)
    assert second.get_vocab() == first.get_vocab()
    # Another corpus is another cache entry.
    monkeypatch.setattr(tokenizer_module, "train_bpe", real_train_bpe)
    get_tokenizer(None, vocab_size=300, corpus=lambda: builtin_corpus(SMALL), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        get_tokenizer(None, vocab_size=100)


def test_auto_tokenizer_from_local_directory(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    loaded = get_tokenizer(str(tmp_path / "tok"))
    assert len(loaded) == len(tok)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        tok.mask_token_id,
    )
    text = "for i in range(10): pass  # é"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_auto_tokenizer_gets_mask_and_pad(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|eos|>")
    assert bare.mask_token is None and bare.pad_token is None
    bare.save_pretrained(tmp_path / "bare")
    loaded = get_tokenizer(str(tmp_path / "bare"))
    assert loaded.mask_token_id is not None and loaded.mask_token_id != loaded.eos_token_id
    assert loaded.pad_token_id == loaded.eos_token_id


# ------------------------------------------------------------------------------------------------------- packing


def expected_stream(tok, docs):
    ids = []
    for d in docs:
        ids += [tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id]
    return ids


def test_packing_keeps_every_token_in_order(tok):
    docs = numbered_docs(40) + ["short", "x" * 500]
    seq_len = 16
    dt = DocumentTokens(ListSource(docs), tok, split="train", eval_every=0, window=7)
    seqs = list(PackedSequences(dt, seq_len, shuffle_seed=None, repeat=False))
    assert all(s.shape == (seq_len,) for s in seqs)
    want = expected_stream(tok, docs)
    assert len(seqs) == len(want) // seq_len  # the partial tail is dropped
    assert np.concatenate(seqs).tolist() == want[: len(seqs) * seq_len]
    flat = np.concatenate(seqs)
    assert (flat == tok.eos_token_id).sum() == (np.array(want[: flat.size]) == tok.eos_token_id).sum() > 0


def test_loader_batches_are_long_tensors_with_document_boundaries(tok):
    loader = build_loader([(ListSource(numbered_docs(30)), 1.0)], tok, seq_len=32, batch_size=4, seed=0)
    assert loader.tokens_per_batch == 128
    batch = next(loader)
    ids = batch["input_ids"]
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    flat = ids.flatten()
    # Every document is [bos] ... eos: after each eos inside the batch comes a bos.
    after_eos = flat[1:][flat[:-1] == tok.eos_token_id]
    assert after_eos.numel() > 0 and bool((after_eos == tok.bos_token_id).all())


def test_train_epochs_reshuffle_documents(tok):
    dt = DocumentTokens(ListSource(numbered_docs(20)), tok, split="train", eval_every=0)
    seqs = PackedSequences(dt, 8, shuffle_seed=(0,), repeat=True)
    tokens = []
    while seqs.position["epoch"] < 2:
        tokens += next(seqs).tolist()
    order = [int(m) for m in re.findall(r"doc(\d+) ", tok.decode(tokens))]
    epoch0, epoch1 = order[:20], order[20:40]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))  # every document once per epoch
    assert epoch0 != list(range(20)) and epoch1 != epoch0


# ------------------------------------------------------------------------------------------------------- mixture


def test_mixture_follows_weights(tok):
    a, b = ListSource(["a" * 200] * 10, "a"), ListSource(["z" * 200] * 10, "z")
    loader = build_loader([(a, 0.8), (b, 0.2)], tok, seq_len=8, batch_size=100, seed=3)
    tokens_a = set(tok.encode("a" * 200, add_special_tokens=False))
    tokens_z = set(tok.encode("z" * 200, add_special_tokens=False))
    assert not tokens_a & tokens_z
    rows = torch.cat(take(loader, 30))
    from_a = [bool(set(r.tolist()) & tokens_a) for r in rows]
    from_z = [bool(set(r.tolist()) & tokens_z) for r in rows]
    assert all(x != y for x, y in zip(from_a, from_z, strict=True))  # every sequence from exactly one source
    share = sum(from_a) / len(rows)
    assert abs(share - 0.8) < 0.03, share


# -------------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [1, 7])
def test_resume_yields_exactly_the_next_batches(tok, k):
    def make():
        sources = [(ListSource(numbered_docs(25)), 0.6), (BuiltinSource(20_000), 0.4)]
        return build_loader(sources, tok, seq_len=24, batch_size=3, seed=11, eval_fraction=0.1)

    loader = make()
    take(loader, k)
    state = loader.state_dict()
    want = take(loader, 30)  # spans several epochs of both sources
    assert loader.state_dict()["streams"][0]["epoch"] >= 1
    restored = make()
    restored.load_state_dict(state)
    got = take(restored, 30)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # Nothing repeated: the restored loader does not start over.
    assert not torch.equal(take(make(), 1)[0], got[0])


def test_resume_rejects_another_configuration(tok):
    src = [(ListSource(numbered_docs(10)), 1.0)]
    state = build_loader(src, tok, seq_len=8, batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        build_loader(src, tok, seq_len=16, batch_size=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(src, tok, seq_len=8, batch_size=2, seed=1).load_state_dict(state)


def test_builtin_tokens_are_cached(tok, tmp_path, capsys):
    def make():
        return build_loader([BuiltinSource(50_000)], tok, seq_len=16, batch_size=2, seed=0, cache_dir=tmp_path)

    first = take(make(), 3)
    assert "tokenizing" in capsys.readouterr().out
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    packing._load_tokens.cache_clear()  # read the file, not the copy in memory
    second = take(make(), 3)
    assert "tokenizing" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# --------------------------------------------------------------------------------------------------------- ranks


def test_ranks_split_each_global_batch(tok):
    def make(rank, world_size, batch_size, split="train"):
        src = [(ListSource(numbered_docs(30)), 1.0)]
        kw = dict(seq_len=16, batch_size=batch_size, seed=5, rank=rank, world_size=world_size, eval_fraction=0.2)
        return build_loader(src, tok, split=split, **kw)

    def epoch(loader):
        return loader.state_dict()["streams"][0]["epoch"]

    r0, r1, single = make(0, 2, 3), make(1, 2, 3), make(0, 1, 6)
    n = 0
    while epoch(r0) == 0:
        b0, b1 = next(r0)["input_ids"], next(r1)["input_ids"]
        # Rank r takes rows 3r .. 3r+2 of the global batch: disjoint shares of one stream.
        assert torch.equal(torch.cat([b0, b1]), next(single)["input_ids"])
        assert epoch(r1) == epoch(r0)  # both ranks finish the epoch after the same batch
        n += 1
    assert n > 3
    assert r0.state_dict() == r1.state_dict()  # the position is the same on every rank

    # The finite eval pass ends after the same number of batches on every rank.
    e0, e1 = ([b["input_ids"] for b in make(r, 2, 3, split="eval")] for r in (0, 1))
    whole = [b["input_ids"] for b in make(0, 1, 6, split="eval")]
    assert len(e0) == len(e1) == len(whole) > 0
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(e0, e1, whole, strict=True))


# ---------------------------------------------------------------------------------------------------------- eval


def doc_numbers(tok, batches):
    # One source, so the rows of consecutive batches are consecutive pieces of one stream: decode them joined.
    return {int(m) for m in re.findall(r"doc(\d+) ", tok.decode(torch.cat(batches).flatten()))}


def test_eval_split_is_held_out_of_train(tok):
    src = ListSource(numbered_docs(100))
    kw = dict(seq_len=16, batch_size=4, seed=0, eval_fraction=0.1)
    train = build_loader([src], tok, split="train", **kw)
    train_docs = doc_numbers(tok, take(train, 150))  # more than one epoch
    eval_batches = [b["input_ids"] for b in build_loader([src], tok, split="eval", **kw)]
    eval_docs = doc_numbers(tok, eval_batches)
    held_out = {i for i in range(100) if i % 10 == 9}
    assert eval_docs and eval_docs <= held_out
    assert train_docs and not train_docs & held_out
    assert train_docs == set(range(100)) - held_out  # everything else is trained on
    # A second evaluation reads the same batches.
    again = [b["input_ids"] for b in build_loader([src], tok, split="eval", **kw)]
    assert all(torch.equal(a, b) for a, b in zip(again, eval_batches, strict=True)) and len(again) == len(eval_batches)


def test_eval_batches_are_the_same_at_every_evaluation(tok, monkeypatch):
    from wrinklefree.data import loader as loader_module

    # Eval sequences are remembered across loaders; past the cap the rest is read again from the source.
    monkeypatch.setattr(loader_module, "EVAL_MEMO_TOKENS", 5 * 16)
    src = ListSource(numbered_docs(200))
    kw = dict(seq_len=16, batch_size=2, seed=0, eval_fraction=0.1, split="eval")
    partial = take(build_loader([src], tok, **kw), 2)  # an evaluation that stops early
    full = [b["input_ids"] for b in build_loader([src], tok, **kw)]
    again = [b["input_ids"] for b in build_loader([src], tok, **kw)]
    fresh = [b["input_ids"] for b in build_loader([ListSource(numbered_docs(200))], tok, **kw)]  # no memo
    assert len(full) == len(again) == len(fresh) > 5
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(full, again, fresh, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(partial, full, strict=False))


def test_eval_split_of_documents():
    src = ListSource(numbered_docs(50))

    class Tok:  # document i is the one token i + 2
        eos_token_id, bos_token_id, name_or_path = 1, None, "fake"

        def __len__(self):
            return 10

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[int(re.match(r"doc(\d+)", t).group(1)) + 2] for t in texts]}

    def ids(split):
        dt = DocumentTokens(src, Tok(), split=split, eval_every=5, window=8)
        return [int(d[0]) - 2 for w in dt.windows() for d in w]

    assert ids("eval") == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    assert sorted(ids("train") + ids("eval")) == list(range(50))


# ------------------------------------------------------------------------------------------------------- sources


def test_local_files_txt_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nstill the second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "empty.txt").write_text("")
    rows = [{"body": "one"}, {"body": "two", "other": 1}, {"body": ""}, {"body": "three"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    txt = LocalFilesSource(str(tmp_path / "*.txt"))
    assert list(txt) == ["first file", "second file\n\nstill the second file"]  # sorted, one per file
    assert list(txt) == list(txt.documents())
    assert list(LocalFilesSource(tmp_path / "c.jsonl", text_field="body")) == ["one", "two", "three"]
    both = build_source(
        {"type": "local", "paths": [str(tmp_path / "c.jsonl"), str(tmp_path / "a.txt")], "text_field": "body"}
    )
    assert list(both) == ["one", "two", "three", "first file"]
    assert len(list(LocalFilesSource(tmp_path, text_field="body"))) == 5  # a folder: all its files, sorted
    with pytest.raises(ValueError, match="text"):
        list(LocalFilesSource(tmp_path / "c.jsonl"))  # no "text" field


def test_local_files_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(LocalFilesSource(str(tmp_path / "d.parquet"))) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="content"):
        list(LocalFilesSource(str(tmp_path / "d.parquet"), text_field="content"))


def test_local_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        LocalFilesSource(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"\*\.txt"):
        LocalFilesSource(str(tmp_path / "*.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv"):
        LocalFilesSource(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="paths"):
        LocalFilesSource([])


def test_local_files_bad_contents_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        list(LocalFilesSource(tmp_path / "latin1.txt"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        list(LocalFilesSource(tmp_path / "latin1.jsonl"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' holds int64, not strings"):
        list(LocalFilesSource(tmp_path / "ints.parquet"))
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.weight must be a number, got 'abc'"):
        sources_from_config([{"type": "local", "paths": str(tmp_path / "latin1.txt"), "weight": "abc"}])


def test_local_files_paths_read_each_file_once_and_literally(tmp_path):
    folder = tmp_path / "br[1]"  # glob characters in a real name
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "alpha"}\n')
    (folder / "B.TXT").write_text("beta")
    assert list(LocalFilesSource(folder / "a.jsonl")) == ["alpha"]
    assert list(LocalFilesSource(folder)) == ["beta", "alpha"]  # sorted; suffixes in any case
    twice = LocalFilesSource([str(tmp_path / "*" / "*.jsonl"), str(folder / "a.jsonl"), str(folder / "B.TXT")])
    assert list(twice) == ["alpha", "beta"]  # a file two patterns name is read once


def test_resume_warns_when_a_folder_gained_files(tok, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in numbered_docs(20)))
    loader = build_loader([(LocalFilesSource(tmp_path), 1.0)], tok, seq_len=8, batch_size=2, seed=0)
    take(loader, 2)
    state = loader.state_dict()
    fresh = build_loader([(LocalFilesSource(tmp_path), 1.0)], tok, seq_len=8, batch_size=2, seed=0)
    fresh.load_state_dict(state)
    assert "changed" not in capsys.readouterr().out
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a new document"}) + "\n")
    grown = build_loader([(LocalFilesSource(tmp_path), 1.0)], tok, seq_len=8, batch_size=2, seed=0)
    grown.load_state_dict(state)
    out = capsys.readouterr().out
    assert "warning: the files of source 0" in out and "1 files" in out and "now 2 files" in out


def test_hf_dataset_source_on_local_files(tok, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    docs = numbered_docs(20)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    for streaming in (True, False):
        src = HFDatasetSource("json", data_files=str(path), text_field="content", streaming=streaming)
        assert list(src) == docs
        assert list(src) == docs  # iterable twice, same order
    src = build_source({"type": "hf", "name": "json", "data_files": str(path), "text_field": "content", "weight": 2})
    batch = next(build_loader([(src, 1.0)], tok, seq_len=16, batch_size=2, seed=0))
    assert batch["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="text"):
        list(HFDatasetSource("json", data_files=str(path)))


def test_hf_dataset_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        HFDatasetSource("json")


# ----------------------------------------------------------------------------------------------------- bad input


def test_build_source_rejects_bad_specs():
    with pytest.raises(ValueError, match="'parquet'"):
        build_source({"type": "parquet"})
    with pytest.raises(ValueError, match="type"):
        build_source({"max_chars": 10})
    with pytest.raises(ValueError, match="colour"):
        build_source({"type": "builtin", "colour": "red"})
    with pytest.raises(ValueError, match="paths"):
        build_source({"type": "local"})
    assert isinstance(build_source({"type": "builtin", "max_chars": 1000, "weight": 0.5}), BuiltinSource)


def test_build_loader_rejects_bad_arguments(tok):
    src = [(ListSource(["abc"]), 1.0)]
    with pytest.raises(ValueError, match="seq_len"):
        build_loader(src, tok, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(src, tok, seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(src, tok, seq_len=8, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_loader(src, tok, seq_len=8, batch_size=1, eval_fraction=0.9)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_loader(src, tok, seq_len=8, batch_size=1, split="eval")
    with pytest.raises(ValueError, match="split"):
        build_loader(src, tok, seq_len=8, batch_size=1, split="test")
    with pytest.raises(ValueError, match="weights"):
        build_loader([(ListSource(["abc"]), -1.0)], tok, seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="no documents"):
        next(build_loader([(ListSource([]), 1.0)], tok, seq_len=8, batch_size=1))
