"""The C++ inference engine (wrinklefree._C.Engine) against the PyTorch model on the same weights.

Files come from the exporter (tests/test_export.py builds the tiny models). The PyTorch side runs the
packed BitLinear path, whose int8 activations and I2_S matmul are the engine's kernels, so the logits
agree to float rounding. TQ formats keep fp16 block scales, so there the reference gets the same
fp16-rounded scales.
"""

import random

import gguf
import numpy as np
import pytest
import torch
from test_export import bitnet_model, corpus

from wrinklefree import _C, ops
from wrinklefree.data import get_tokenizer
from wrinklefree.export import export_gguf
from wrinklefree.nn import BitLinear

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 17, 42, 0, 299]
ARCH_ACT = {"i2_s": "relu2", "tq2_0": "silu", "tq1_0": "silu"}  # what each file's architecture computes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_tokenizer(None, vocab_size=300, corpus=corpus, cache_dir=tmp_path_factory.mktemp("tok"))


def round_as_exported(model, outtype):
    """``model`` (in place) with the weights its GGUF file holds: the embedding rounded to f16, and for
    TQ formats the weight scales rounded to fp16; then the engine must reproduce its logits."""
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
    if outtype != "i2_s":
        for name, layer in list(model.named_modules()):
            if isinstance(layer, BitLinear):
                codes, scale = layer.ternary_weight()
                parent, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), attr, BitLinear.from_ternary(codes, scale.half().float()))
    return model


def reference_model(tokenizer, outtype):
    """A tiny converted BitNet whose weights survive the export unchanged (:func:`round_as_exported`)."""
    return round_as_exported(bitnet_model(tokenizer, act=ARCH_ACT[outtype]), outtype)


@pytest.fixture(scope="module", params=["i2_s", "tq2_0", "tq1_0"])
def exported(request, tokenizer, tmp_path_factory):
    model = reference_model(tokenizer, request.param)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    export_gguf(model, path, request.param, tokenizer=tokenizer)
    return request.param, model, path


def run(engine, ids, all_logits=True):
    out = torch.empty((len(ids), engine.n_vocab) if all_logits else (engine.n_vocab,))
    engine.eval(ids, out.data_ptr(), all_logits)
    return out


@torch.no_grad()
def test_logits_match_pytorch(exported):
    outtype, model, path = exported
    engine = _C.Engine(str(path), 64, "f16")
    assert engine.arch == ("bitnet-b1.58" if outtype == "i2_s" else "bitnet")
    expected = model(torch.tensor([IDS])).logits[0]
    got = run(engine, IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    assert engine.n_past == len(IDS)


def test_decode_with_cache_equals_prefill(exported):
    """Prefill of a prefix then one token at a time (the decode path) gives the prefill's logits."""
    _, _, path = exported
    engine = _C.Engine(str(path), 64, "f16")
    full = run(engine, IDS)
    engine.truncate(0)
    steps = [run(engine, IDS[:5], all_logits=False)]
    steps += [run(engine, [t], all_logits=False) for t in IDS[5:]]
    torch.testing.assert_close(torch.stack(steps), full[4:], rtol=0, atol=0)
    # truncate() rewinds: re-running the tail after the prefix reproduces it.
    engine.truncate(5)
    torch.testing.assert_close(run(engine, IDS[5:]), full[5:], rtol=0, atol=0)


@pytest.mark.parametrize("head", ["f16", "int8"])
def test_threads_and_isas_agree(exported, head):
    _, _, path = exported
    engine = _C.Engine(str(path), 64, head)
    base = run(engine, IDS)
    threads, isa = ops.get_num_threads(), ops.get_isa()
    try:
        ops.set_num_threads(1)
        engine.truncate(0)
        torch.testing.assert_close(run(engine, IDS), base, rtol=0, atol=0)  # thread count changes nothing
        ops.set_num_threads(threads)
        for other in ops.supported_isas():
            ops.set_isa(other)
            engine.truncate(0)  # float sums run in another order: close, not equal
            torch.testing.assert_close(run(engine, IDS), base, rtol=1e-4, atol=1e-5, msg=other)
    finally:
        ops.set_num_threads(threads)
        ops.set_isa(isa)


@pytest.mark.parametrize("head", ["f16", "int8"])
def test_mapped_and_copied_weights_agree(exported, head):
    """By default the engine copies the weights it streams onto huge pages; use_mmap runs them from the
    file's pages. The same bytes either way: the same logits, in prefill and in decode."""
    _, _, path = exported
    copied, mapped = _C.Engine(str(path), 64, head), _C.Engine(str(path), 64, head, use_mmap=True)
    torch.testing.assert_close(run(mapped, IDS), run(copied, IDS), rtol=0, atol=0)
    torch.testing.assert_close(run(mapped, [3], False), run(copied, [3], False), rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("use_mmap", [False, True])
def test_untied_output_head(tokenizer, tmp_path, monkeypatch, use_mmap):
    """A file with its own output.weight (a foreign one: our exporter writes tied heads only) takes
    the head from it and the embeddings from token_embd."""
    from wrinklefree.export import gguf_writer

    model = round_as_exported(bitnet_model(tokenizer, tie=False), "i2_s")
    model.lm_head.weight.copy_(model.lm_head.weight.half().float())
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    add_embedding = gguf_writer.BitnetWriter.add_token_embedding

    def add_embedding_and_head(self, weight):
        add_embedding(self, weight)
        self.writer.add_tensor("output.weight", gguf_writer._f16(model.lm_head.weight))

    monkeypatch.setattr(gguf_writer.BitnetWriter, "add_token_embedding", add_embedding_and_head)
    monkeypatch.setattr(gguf_writer, "_output_head_check", lambda model: None)
    path = export_gguf(model, tmp_path / "untied.gguf", "i2_s", tokenizer=tokenizer)

    engine = _C.Engine(str(path), 64, "f16", use_mmap=use_mmap)
    torch.testing.assert_close(run(engine, IDS), model(torch.tensor([IDS])).logits[0], rtol=1e-5, atol=2e-6)


@pytest.mark.skipif("avx512" not in ops.supported_isas(), reason="needs a CPU with AVX-512 (VNNI)")
def test_tq1_0_runs_as_stored(tokenizer, tmp_path):
    """Under AVX-512 a TQ1_0 file runs as stored (no I2_S copy); loaded under another ISA it is repacked
    to I2_S. Both give the same integer sums and the same float step, so the same logits, bit for bit,
    and a TQ1_0 engine keeps running when the ISA changes after loading."""
    path = tmp_path / "tiny-tq1_0.gguf"
    export_gguf(reference_model(tokenizer, "tq1_0"), path, "tq1_0", tokenizer=tokenizer)
    isa = ops.get_isa()
    try:
        ops.set_isa("avx512")
        native = _C.Engine(str(path), 64, "f16")
        ops.set_isa("avx2")
        repacked = _C.Engine(str(path), 64, "f16")
        assert (native.ternary_format, repacked.ternary_format) == ("tq1_0", "i2_s")
        # the native engine on AVX2's portable TQ1_0 kernels: the integer sums are the same again
        assert torch.equal(run(native, IDS[:4], all_logits=False), run(repacked, IDS[:4], all_logits=False))
        ops.set_isa("avx512")
        native.truncate(0)
        repacked.truncate(0)
        assert torch.equal(run(native, IDS), run(repacked, IDS))
    finally:
        ops.set_isa(isa)


def test_int8_head_accuracy(exported):
    """The int8 head (rows quantized at load) costs about 1% of the logit range on this model."""
    _, _, path = exported
    f16 = run(_C.Engine(str(path), 64, "f16"), IDS)
    i8 = run(_C.Engine(str(path), 64, "int8"), IDS)
    err = (i8 - f16).abs().max()
    assert 0 < err < 0.03 * f16.abs().max(), err
    # Its greedy choice is the f16 head's or one within the error of it (a random model has near-ties).
    chosen = f16.gather(1, i8.argmax(-1, keepdim=True)).squeeze(1)
    assert bool((chosen >= f16.max(-1).values - 2 * err).all())


def test_metadata_and_shape(exported, tokenizer):
    outtype, model, path = exported
    engine = _C.Engine(str(path), 0, "f16")  # 0: the file's context length
    meta = engine.metadata()
    assert meta["general.architecture"] == engine.arch
    assert meta["tokenizer.ggml.tokens"][: len(tokenizer)] == [
        tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))
    ]
    assert engine.n_ctx == model.config.max_position_embeddings
    assert engine.n_vocab == model.config.vocab_size
    assert engine.n_layer == model.config.num_hidden_layers
    assert engine.file_bytes == path.stat().st_size
    names = {name for name, *_ in engine.tensors()}
    assert "blk.1.ffn_down.weight" in names


def test_bad_calls(exported):
    _, _, path = exported
    engine = _C.Engine(str(path), 8, "f16")
    out = torch.empty(engine.n_vocab)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.eval([engine.n_vocab], out.data_ptr())
    with pytest.raises(ValueError, match="must not be empty"):
        engine.eval([], out.data_ptr())
    with pytest.raises(ValueError, match="exceed n_ctx=8"):
        engine.eval(list(range(9)), out.data_ptr())
    assert engine.n_past == 0  # a refused call changes nothing
    with pytest.raises(ValueError, match="truncate"):
        engine.truncate(1)
    with pytest.raises(ValueError, match="head must be"):
        _C.Engine(str(path), 8, "int4")


# ---- damaged and foreign files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def i2s_file(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-i2s.gguf"
    export_gguf(reference_model(tokenizer, "i2_s"), path, "i2_s", tokenizer=tokenizer)
    return path


def tensor_data_start(path):
    """Byte offset of the first tensor's data (everything before it is header and metadata)."""
    from wrinklefree.export import i2s_readable

    with i2s_readable():
        reader = gguf.GGUFReader(path)
        return min(int(t.data_offset) for t in reader.tensors)


def test_truncated_files_are_refused(i2s_file, tmp_path):
    blob = i2s_file.read_bytes()
    header = tensor_data_start(i2s_file)
    rng = random.Random(0)
    edges = {0, 3, 4, 8, 23, 24, 40, header - 1, header, len(blob) - 1}
    cuts = sorted(edges | {rng.randrange(len(blob)) for _ in range(60)})
    cut_file = tmp_path / "cut.gguf"
    for cut in cuts:
        cut_file.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=r"cut\.gguf: (not a GGUF file|truncated or corrupt)"):
            _C.Engine(str(cut_file), 16, "f16")


def test_bit_flips_never_crash(i2s_file, tmp_path):
    """Single bit flips anywhere in the header either still load (a value changed harmlessly) or are
    refused with a ValueError naming the file; flips in the weights load and run."""
    blob = bytearray(i2s_file.read_bytes())
    header = tensor_data_start(i2s_file)
    rng = random.Random(1)
    flipped = tmp_path / "flip.gguf"
    refused = 0
    positions = [rng.randrange(header) for _ in range(150)] + [rng.randrange(header, len(blob)) for _ in range(10)]
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bad)
        try:
            engine = _C.Engine(str(flipped), 16, "f16")
        except ValueError as e:
            assert "flip.gguf" in str(e)
            refused += 1
            continue
        logits = run(engine, [1, 2, 3])
        assert logits.shape == (3, engine.n_vocab)
    assert refused > 10  # most header flips break a length, a type or a shape


def write_gguf(path, arch, tensors, **keys):
    writer = gguf.GGUFWriter(path, arch)
    for key, value in keys.items():
        writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_foreign_and_incomplete_files(i2s_file, tmp_path):
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, "llama", {"token_embd.weight": np.zeros((8, 4), np.float16)})
    with pytest.raises(ValueError, match="unsupported architecture 'llama'"):
        _C.Engine(str(llama), 16, "f16")

    incomplete = tmp_path / "incomplete.gguf"
    keys = {
        "bitnet.embedding_length": 128,
        "bitnet.block_count": 1,
        "bitnet.feed_forward_length": 256,
        "bitnet.attention.head_count": 2,
    }
    write_gguf(incomplete, "bitnet", {"token_embd.weight": np.zeros((8, 128), np.float16)}, **keys)
    with pytest.raises(ValueError, match="missing tensor output_norm.weight"):
        _C.Engine(str(incomplete), 16, "f16")

    wrong = tmp_path / "wrong.gguf"
    tensors = {"token_embd.weight": np.zeros((8, 128), np.float16), "output_norm.weight": np.ones(128, np.float32)}
    for n in ("attn_norm", "attn_sub_norm", "ffn_norm"):
        tensors[f"blk.0.{n}.weight"] = np.ones(128, np.float32)
    tensors["blk.0.ffn_sub_norm.weight"] = np.ones(256, np.float32)
    tensors["blk.0.attn_q.weight"] = np.zeros((128, 128), np.float16)  # not ternary
    write_gguf(wrong, "bitnet", tensors, **keys)
    with pytest.raises(ValueError, match=r"attn_q\.weight has type F16; the engine runs ternary projections"):
        _C.Engine(str(wrong), 16, "f16")

    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all, but long enough to have a header")
    with pytest.raises(ValueError, match="not a GGUF file"):
        _C.Engine(str(text), 16, "f16")
    with pytest.raises(ValueError, match="cannot open"):
        _C.Engine(str(tmp_path / "absent.gguf"), 16, "f16")


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0"])
def test_block_scales_must_agree(tokenizer, tmp_path, outtype):
    """Both ternary kernels keep one scale per tensor: a TQ file whose blocks in one tensor carry two
    different scales is refused at load, naming the tensor (a block of zeros may carry 0)."""
    path = tmp_path / f"tiny-{outtype}.gguf"
    export_gguf(reference_model(tokenizer, outtype), path, outtype, tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    block = {"tq2_0": 66, "tq1_0": 54}[outtype]
    blob = bytearray(path.read_bytes())
    at = int(t.data_offset) + 2 * block - 2  # the second block's fp16 scale
    scale = np.frombuffer(bytes(blob[at : at + 2]), dtype=np.float16)[0]
    blob[at : at + 2] = np.float16(scale * 2).tobytes()
    bad = tmp_path / "mixed.gguf"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: its .* blocks have different scales"):
        _C.Engine(str(bad), 16, "f16")


# ---- the output head's kernels, on every ISA ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 100, 2560])
@pytest.mark.parametrize("m", [1, 5])
def test_f16_head_kernel_matches_torch(isa, n, k, m):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, k, generator=g)
    w = torch.randn(m, k, generator=g).to(torch.float16)
    out = torch.empty(n, m)
    _C.f16_gemm(x.data_ptr(), n, k, w.data_ptr(), m, out.data_ptr())
    want = x.double() @ w.double().T  # float sums in another order: close, not equal
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 64, 100, 2560])
@pytest.mark.parametrize("m", [1, 5])
def test_int8_head_kernel_is_exact(isa, n, k, m):
    # the integer sum is exact on every ISA, including q = -128 against W = +-127, so the float
    # step float(D) / x_scale * w_scale gives the same bits as torch's
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int32)
    q[:, 0] = -128
    w = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int32)
    w[:, 0] = 127
    x_scale, w_scale = torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5
    xu = (q + 128).to(torch.uint8)
    w8 = w.to(torch.int8)
    wsum = w.sum(1).to(torch.int32)
    out = torch.empty(n, m)
    _C.i8_gemm(xu.data_ptr(), x_scale.data_ptr(), n, k, w8.data_ptr(), w_scale.data_ptr(), wsum.data_ptr(), m,
               out.data_ptr())  # fmt: skip
    d = (q.long() @ w.long().T).to(torch.float32)
    assert torch.equal(out, d / x_scale[:, None] * w_scale[None, :])
