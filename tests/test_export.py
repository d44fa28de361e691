"""GGUF export (wrinklefree.export): write tiny bitnet checkpoints and read them back with gguf.GGUFReader."""

import copy
import glob
import json
import os
import signal
import subprocess
import sys
import time

import gguf  # noqa: E402
import numpy as np
import pytest
import torch
import transformers  # noqa: E402

from wrinklefree import convert, ops  # noqa: E402
from wrinklefree.data import get_tokenizer  # noqa: E402
from wrinklefree.export import export_gguf, i2s_readable  # noqa: E402
from wrinklefree.export.__main__ import main  # noqa: E402
from wrinklefree.export.gguf_writer import BitnetWriter, check_outfile  # noqa: E402
from wrinklefree.models.hf_bitnet import load_bitnet, save_bitnet  # noqa: E402

EXTRA_ROWS = 4  # embedding rows beyond the tokenizer: written as [PADn] tokens of type UNUSED
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORMS = {
    "attn_norm": "input_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
T = gguf.GGMLQuantizationType


def corpus():
    return ["the quick brown fox jumps over the lazy dog", "hello world, bitnet ternary weights 123"] * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = get_tokenizer(None, vocab_size=300, corpus=corpus, cache_dir=tmp_path_factory.mktemp("tok"))
    tok.chat_template = CHAT
    return tok


def bitnet_model(tokenizer, hidden=256, tie=True, act="relu2"):
    """A converted random BitNet; ``act``: relu2 for i2_s (bitnet.cpp), silu for the llama.cpp outtypes."""
    torch.manual_seed(0)
    config = transformers.BitNetConfig(
        hidden_act=act,
        vocab_size=len(tokenizer) + EXTRA_ROWS,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.BitNetForCausalLM(config)
    for name, p in model.named_parameters():  # non-trivial norms, so a swapped norm would show
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    return convert(model).eval()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_bitnet(bitnet_model(tokenizer), path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def silu_checkpoint(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_silu")
    save_bitnet(bitnet_model(tokenizer, act="silu"), path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_bitnet(checkpoint)


def act_of(outtype):
    """The FFN activation of the graph that reads an outtype's files."""
    return "relu2" if outtype == "i2_s" else "silu"


def read(path):
    with i2s_readable():
        r = gguf.GGUFReader(path)
    return r


def field(reader, key):
    return reader.fields[key].contents()


def expected_tensors(n_layers=2):
    names = ["token_embd.weight", "output_norm.weight"]
    for i in range(n_layers):
        names += [f"blk.{i}.{n}.weight" for n in NORMS] + [f"blk.{i}.{n}.weight" for n in PROJ]
    return names


def test_outtype_auto_takes_the_format_that_computes_the_activation(checkpoint, silu_checkpoint, tmp_path):
    relu2 = read(export_gguf(checkpoint, tmp_path / "a.gguf", "auto"))
    silu = read(export_gguf(silu_checkpoint, tmp_path / "b.gguf", "auto"))
    assert field(relu2, "general.file_type") == 40  # i2_s, bitnet.cpp
    assert field(silu, "general.file_type") == 37  # tq2_0, llama.cpp


@pytest.mark.parametrize("outtype", ["i2_s", "tq2_0", "tq1_0", "f16"])
def test_metadata_and_tensors(checkpoint, silu_checkpoint, tokenizer, tmp_path, outtype):
    ckpt = checkpoint if act_of(outtype) == "relu2" else silu_checkpoint
    model = load_bitnet(ckpt)
    assert model.config.hidden_act == act_of(outtype)
    out = export_gguf(ckpt, tmp_path / "m.gguf", outtype)
    r = read(out)
    arch = "bitnet-b1.58" if outtype == "i2_s" else "bitnet"
    cfg = model.config
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == {"i2_s": 40, "tq2_0": 37, "tq1_0": 36, "f16": 1}[outtype]
    expected = {
        "vocab_size": cfg.vocab_size,
        "context_length": 64,
        "embedding_length": 256,
        "block_count": 2,
        "feed_forward_length": 512,
        "rope.dimension_count": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
    }
    for key, value in expected.items():
        assert field(r, f"{arch}.{key}") == value, key
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])

    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == expected_tensors()
    assert "output.weight" not in tensors
    d = cfg.hidden_size
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.F16 and list(emb.shape) == [d, cfg.vocab_size]
    np.testing.assert_array_equal(emb.data, model.model.embed_tokens.weight.detach().half().numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, model.model.norm.weight.detach().numpy())
    for i in range(2):
        layer = model.model.layers[i]
        for gname, sub in NORMS.items():
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type == T.F32
            np.testing.assert_array_equal(t.data, layer.get_submodule(sub).weight.detach().numpy())
        for gname, sub in PROJ.items():
            t = tensors[f"blk.{i}.{gname}.weight"]
            lin = layer.get_submodule(sub)
            assert list(t.shape) == [lin.in_features, lin.out_features]  # ggml order: ne0 = K
            codes, scale = lin.ternary_weight()
            if outtype == "f16":
                assert t.tensor_type == T.F16
                np.testing.assert_array_equal(t.data, (codes.float() * scale).half().numpy())
                continue
            fmt = ops.FORMATS[outtype]
            assert int(t.tensor_type) == fmt.ggml_type
            nbytes = fmt.nbytes(lin.out_features, lin.in_features)
            raw = torch.from_numpy(np.array(r.data[t.data_offset : t.data_offset + nbytes]))
            assert torch.equal(raw, ops.pack(codes, scale, outtype))
            if outtype != "i2_s":  # independent check: the gguf package's own quantizer
                ref = gguf.quants.quantize((codes.float() * scale).numpy(), T[outtype.upper()])
                np.testing.assert_array_equal(ref.reshape(-1), raw.numpy())
            back, s = ops.unpack(raw, tuple(codes.shape), outtype)
            assert torch.equal(back, codes)
            if outtype == "i2_s":
                assert s.item() == scale.item()
            else:  # one fp16 scale per 256-value block
                assert torch.allclose(s, scale.half().float().expand_as(s))


def test_tokenizer_round_trip(silu_checkpoint, tokenizer, tmp_path):
    r = read(export_gguf(silu_checkpoint, tmp_path / "m.gguf", "tq2_0"))
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert "tokenizer.ggml.pre" not in r.fields
    n = len(tokenizer)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == n + EXTRA_ROWS
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == tok for tok, i in vocab.items())
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + EXTRA_ROWS)]
    assert types[n:] == [gguf.TokenType.UNUSED] * EXTRA_ROWS
    special = set(tokenizer.all_special_tokens)
    assert special and all(types[vocab[tok]] == gguf.TokenType.CONTROL for tok in special)
    assert all(types[i] == gguf.TokenType.NORMAL for tok, i in vocab.items() if tok not in special)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 0
    assert field(r, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(r, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(r, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(r, "tokenizer.chat_template") == CHAT


def test_in_memory_model_and_cli(checkpoint, model, tokenizer, tmp_path):
    a = export_gguf(model, tmp_path / "a.gguf", "i2_s", tokenizer=tokenizer)
    main([str(checkpoint), "--outfile", str(tmp_path / "b.gguf"), "--outtype", "i2_s"])
    assert a.read_bytes() == (tmp_path / "b.gguf").read_bytes()
    with pytest.raises(ValueError, match="pass tokenizer="):
        export_gguf(model, tmp_path / "c.gguf", "i2_s")


def test_checkpoint_without_tokenizer(tokenizer, tmp_path):
    path = save_bitnet(bitnet_model(tokenizer), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="has no tokenizer.json; pass tokenizer="):
        export_gguf(path, tmp_path / "m.gguf", "i2_s")
    export_gguf(path, tmp_path / "m.gguf", "i2_s", tokenizer=tokenizer)


def test_refuses_float_projection(model, tokenizer, tmp_path):
    bad = copy.deepcopy(model)
    lin = bad.model.layers[1].mlp.up_proj
    bad.model.layers[1].mlp.up_proj = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj is a Linear, not a ternary BitLinear"):
        export_gguf(bad, tmp_path / "m.gguf", "i2_s", tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("hidden", "outtype", "block"), [(128, "tq2_0", 256), (128, "tq1_0", 256), (64, "i2_s", 128)])
def test_refuses_k_not_multiple_of_block(tokenizer, tmp_path, hidden, outtype, block):
    model = bitnet_model(tokenizer, hidden=hidden, act=act_of(outtype))
    with pytest.raises(ValueError, match=rf"self_attn\.q_proj\.weight has K={hidden} .* block of {block}"):
        export_gguf(model, tmp_path / "m.gguf", outtype, tokenizer=tokenizer)


def test_refuses_other_architectures(tokenizer, tmp_path):
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown architecture: model_type 'llama'"):
        export_gguf(convert(llama), tmp_path / "m.gguf", "i2_s", tokenizer=tokenizer)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown architecture: .* model_type 'llama'"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "i2_s", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="outtype must be one of"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "q4_0", tokenizer=tokenizer)


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0", "f16"])
def test_refuses_relu2_for_llama_cpp(checkpoint, tmp_path, outtype, capsys):
    # llama.cpp's bitnet graph computes silu(gate) * up whatever the file says: a relu2 model would
    # load and run there, with wrong logits.
    msg = (
        rf"hidden_act='relu2', but outtype {outtype} is read as architecture 'bitnet', "
        r"whose graph computes the FFN with silu; a relu2 model exports to i2_s$"
    )
    with pytest.raises(ValueError, match=msg):
        export_gguf(checkpoint, tmp_path / "m.gguf", outtype)
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--outfile", str(tmp_path / "m.gguf"), "--outtype", outtype])
    assert e.value.code == 2 and "hidden_act='relu2'" in capsys.readouterr().err


def test_refuses_silu_for_bitnet_cpp(silu_checkpoint, tmp_path):
    msg = (
        r"hidden_act='silu', but outtype i2_s is read as architecture 'bitnet-b1\.58', "
        r"whose graph computes the FFN with relu2; a silu model exports to tq2_0, tq1_0, f16$"
    )
    with pytest.raises(ValueError, match=msg):
        export_gguf(silu_checkpoint, tmp_path / "m.gguf", "i2_s")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("outtype", ["i2_s", "tq2_0"])
def test_refuses_other_activations(tokenizer, tmp_path, outtype):
    model = bitnet_model(tokenizer, act="gelu")
    with pytest.raises(ValueError, match=r"hidden_act='gelu', but outtype .* computes the FFN with (relu2|silu)$"):
        export_gguf(model, tmp_path / "m.gguf", outtype, tokenizer=tokenizer)


def test_refuses_vocabulary_without_merges(silu_checkpoint, tmp_path):
    # gguf drops an empty tokenizer.ggml.merges array, and llama.cpp does not load a gpt2 vocabulary without it
    config = load_bitnet(silu_checkpoint).config
    writer = BitnetWriter(tmp_path / "m.gguf", config, "tq2_0")
    n = config.vocab_size
    with pytest.raises(ValueError, match="a gpt2 .BPE. vocabulary needs merges"):
        writer.add_vocab([f"t{i}" for i in range(n)], [gguf.TokenType.NORMAL] * n, merges=[])
    writer.close()


def test_refuses_untied_output_head(tokenizer, tmp_path):
    model = bitnet_model(tokenizer, tie=False)
    with pytest.raises(ValueError, match="lm_head.weight differs from the token embedding"):
        export_gguf(model, tmp_path / "m.gguf", "i2_s", tokenizer=tokenizer)


def test_failed_write_keeps_existing_file(model, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match=r"cannot write outfile .*m\.gguf: disk full$"):  # the file asked for
        export_gguf(model, out, "i2_s", tokenizer=tokenizer)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left behind
    monkeypatch.undo()
    export_gguf(model, out, "i2_s", tokenizer=tokenizer)
    assert read(out).fields["general.architecture"].contents() == "bitnet-b1.58"


def one_line_error(capsys, e, code=2):
    """The CLI's error output, once it is known to be one line (no traceback) with exit status ``code``."""
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_packed_checkpoint_with_attention_bias_is_refused_for_the_bias(tokenizer, tmp_path, capsys):
    # transformers' BitNet gives all four attention projections a bias when the model has one (Qwen2);
    # the checkpoint loads, and the export refuses it for what GGUF bitnet cannot hold
    torch.manual_seed(0)
    qwen2 = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=len(tokenizer) + EXTRA_ROWS, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip
    path = save_bitnet(convert(qwen2, activation="keep"), tmp_path / "qwen2")
    tokenizer.save_pretrained(path)
    assert load_bitnet(path).model.layers[0].self_attn.q_proj.bias is not None
    with pytest.raises(SystemExit) as e:
        main([str(path), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "tq2_0"])
    err = one_line_error(capsys, e)
    assert "model.layers.0.self_attn.q_proj has a bias, which GGUF bitnet cannot hold" in err
    assert not (tmp_path / "m.gguf").exists()


def test_bad_outfile_is_refused_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("wrinklefree.export.gguf_writer.load_bitnet", no_load)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    cases = {
        "": "--outfile is empty",
        str(tmp_path / "dir"): f"--outfile {tmp_path / 'dir'}: is a directory",
        str(
            tmp_path / "file" / "m.gguf"
        ): f"--outfile {tmp_path / 'file' / 'm.gguf'}: {tmp_path / 'file'} is not a directory",
    }
    if os.path.isdir("/proc/self"):  # Linux: no regular file can be created in /proc
        cases["/proc/m.gguf"] = "--outfile /proc/m.gguf: cannot create files in /proc"
    for outfile, message in cases.items():
        with pytest.raises(SystemExit) as e:
            main([str(checkpoint), "--outfile", outfile, "--outtype", "i2_s"])
        assert message in one_line_error(capsys, e)
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"] and not os.listdir(tmp_path / "dir")
    with pytest.raises(ValueError, match="outfile .*: is a directory"):
        export_gguf(checkpoint, tmp_path / "dir", "i2_s")
    assert check_outfile(tmp_path / "new" / "sub" / "m.gguf") == tmp_path / "new" / "sub" / "m.gguf"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_failed_write_names_the_outfile_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    out = tmp_path / "m.gguf"
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--outfile", str(out), "--outtype", "i2_s"])
    err = one_line_error(capsys, e, code=1)
    assert f"cannot write outfile {out}: No space left on device" in err
    assert os.listdir(tmp_path) == []


def test_bad_tokenizer_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    cases = {
        tmp_path / "missing": "no such directory",
        checkpoint / "config.json": "a file; expected a tokenizer directory",
        tmp_path / "empty": "holds no tokenizer.json or tokenizer_config.json",
        tmp_path / "broken": "its tokenizer does not load",
    }
    for tok, message in cases.items():
        with pytest.raises(SystemExit) as e:
            main([str(checkpoint), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "i2_s", "--tokenizer", str(tok)])
        assert f"--tokenizer {tok}: {message}" in one_line_error(capsys, e)
    assert not (tmp_path / "m.gguf").exists()
    main([str(checkpoint), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "i2_s", "--tokenizer", str(checkpoint)])
    assert (tmp_path / "m.gguf").is_file()


def test_interrupt_exits_130_in_one_line_without_a_temporary_file(checkpoint, tmp_path, capsys, monkeypatch):
    def interrupted(self, *a, **k):
        assert glob.glob(str(tmp_path / ".m.gguf.*.tmp"))  # while the temporary file exists
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "i2_s"])
    assert one_line_error(capsys, e, code=130) == "python -m wrinklefree.export: interrupted\n"
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's SIGTERM handler is undone


# The exporter in a process of its own, stalled while it writes, until the test signals it.
_STALLED_EXPORT = """
import signal, sys, time
import gguf
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever the runner set
gguf.GGUFWriter.write_tensors_to_file = lambda self, *a, **k: time.sleep(120)
from wrinklefree.export.__main__ import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # two processes that import torch
@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signalled_export_leaves_the_old_file_and_no_temporary_one(checkpoint, tmp_path, sig, code, word):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    cmd = [sys.executable, "-c", _STALLED_EXPORT, str(checkpoint), "--outfile", str(out), "--outtype", "i2_s"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(str(tmp_path / ".m.gguf.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.05)
        time.sleep(0.5)  # into the stalled write
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err == f"python -m wrinklefree.export: {word}\n"
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]  # the temporary file is gone


def test_i2s_readable_is_undone():
    with i2s_readable():
        assert gguf.GGMLQuantizationType(36).name == "I2_S"
    with pytest.raises(ValueError):
        gguf.GGMLQuantizationType(36)
