"""GGUF export of transformers `bitnet` models for bitnet.cpp (I2_S) and llama.cpp (TQ2_0, TQ1_0, F16).

Layouts (DESIGN.md section 3):

* ``i2_s``: architecture ``bitnet-b1.58`` (bitnet.cpp), projections I2_S (ggml type 36),
  ``general.file_type`` 40.
* ``tq2_0`` / ``tq1_0``: architecture ``bitnet`` (upstream llama.cpp), projections TQ2_0 / TQ1_0.
  The per-tensor scale is folded into every block's fp16 scale, so no ``blk.N.*.scale`` tensors
  are written (llama.cpp loads those as optional and multiplies by them only when present).
* ``f16``: architecture ``bitnet``, projections F16 holding the dequantized ``codes * scale``.

In all of them ``token_embd.weight`` is F16 and doubles as the output head (neither bitnet.cpp's
nor llama.cpp's bitnet graph reads ``output.weight``), and norms are F32. Tensor and key names come
from the ``gguf`` package's constants for ``MODEL_ARCH.BITNET``.

The ``gguf`` package has no I2_S type: its tensors are handed to the writer as an int8 view of the
packed bytes with the logical shape and the raw type id 36 (the writer then neither converts the
shape nor looks the type up); :func:`i2s_readable` lets ``gguf.GGUFReader`` open such files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wrinklefree import ops
from wrinklefree.atomic import atomic_path
from wrinklefree.models.convert import model_type
from wrinklefree.models.hf_bitnet import load_bitnet
from wrinklefree.nn import BitLinear, BitLinearLRC

OUTTYPES = ("i2_s", "tq2_0", "tq1_0", "f16")
I2S_ARCH = "bitnet-b1.58"  # bitnet.cpp's name; gguf.MODEL_ARCH has no entry for it
I2S_FILE_TYPE = 40  # bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S

# transformers BitNet module (under model.layers.N) -> gguf tensor kind
_PROJECTIONS = {
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_NORMS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.attn_sub_norm": "ATTN_SUB_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.ffn_sub_norm": "FFN_SUB_NORM",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of the export extra
        raise ImportError("export_gguf needs the `gguf` package: pip install gguf") from e
    return gguf


def tensor_name(kind: str, layer: int | None = None) -> str:
    """``"blk.N.attn_q.weight"`` for ``kind="ATTN_Q"``, from the gguf package's name table."""
    gguf = _gguf()
    t = gguf.MODEL_TENSOR[kind]
    if t not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BITNET]:
        raise ValueError(f"export_gguf: {kind} is not a tensor of gguf's bitnet architecture")
    base = gguf.TENSOR_NAMES[t]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


@contextlib.contextmanager
def i2s_readable() -> Iterator[None]:
    """Let ``gguf.GGUFReader`` open files with I2_S tensors, for the duration of the block.

    Registers type id 36 as ``I2_S`` in the gguf package with 4 values per byte, so a reader
    tensor's ``data`` is the ``[M, K/4]`` packed codes; the float32 scale and 28 zero bytes follow
    at ``reader.data[t.data_offset + t.n_bytes:][:32]``. The registration is undone on exit.
    """
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType
    i2s = ops.FORMATS["i2_s"].ggml_type
    if i2s in qt._value2member_map_:  # already registered (nested use, or a newer gguf)
        yield
        return
    member = int.__new__(qt, i2s)
    member._name_, member._value_ = "I2_S", i2s
    qt._value2member_map_[i2s] = member
    gguf.GGML_QUANT_SIZES[member] = (4, 1)
    try:
        yield
    finally:
        del gguf.GGML_QUANT_SIZES[member]
        del qt._value2member_map_[i2s]


# ---- the model ----------------------------------------------------------------------------------


def _load(model_or_path: nn.Module | str | os.PathLike) -> tuple[nn.Module, Path | None]:
    if isinstance(model_or_path, nn.Module):
        mt = model_type(model_or_path)
        if mt != "bitnet":
            raise ValueError(
                f"export_gguf: unknown architecture: model_type {mt!r}; only transformers `bitnet` models are "
                "exported (save a converted model with save_bitnet and load it with load_bitnet first)"
            )
        return model_or_path, None
    path = Path(model_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"export_gguf: {path} has no config.json")
    mt = json.loads(config_file.read_text()).get("model_type")
    if mt != "bitnet":
        raise ValueError(f"export_gguf: unknown architecture: {path} has model_type {mt!r}, expected 'bitnet'")
    return load_bitnet(path), path


def _projection(model: nn.Module, name: str, block: int, outtype: str) -> BitLinear:
    layer = model.get_submodule(name)
    if not isinstance(layer, BitLinear):
        raise ValueError(
            f"export_gguf: {name} is a {type(layer).__name__}, not a ternary BitLinear; convert the model first"
        )
    if isinstance(layer, BitLinearLRC):
        raise ValueError(f"export_gguf: {name} has a low-rank correction (LRC), which GGUF bitnet cannot hold")
    if layer.qsparse is not None or layer.subln is not None or layer.bias is not None:
        raise ValueError(f"export_gguf: {name} has Q-Sparse, its own SubLN or a bias, which GGUF bitnet cannot hold")
    if layer.in_features % block:
        raise ValueError(
            f"export_gguf: {name}.weight has K={layer.in_features} inputs, not a multiple of the {outtype} "
            f"block of {block}"
        )
    return layer


def _output_head_check(model: nn.Module) -> None:
    emb = model.model.embed_tokens.weight
    head = model.lm_head.weight
    if head is emb or (head.shape == emb.shape and torch.equal(head.detach().cpu(), emb.detach().cpu())):
        return
    raise ValueError(
        "export_gguf: lm_head.weight differs from the token embedding; bitnet GGUF files use token_embd.weight "
        "as the output head (tie_word_embeddings) and have no output.weight"
    )


def _f16(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).cpu().contiguous().numpy()


def _f32(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def _add_projection(writer, name: str, layer: BitLinear, outtype: str) -> None:
    codes, scale = layer.ternary_weight()
    codes, scale = codes.cpu().contiguous(), scale.to(torch.float32).cpu()
    if outtype == "f16":
        writer.add_tensor(name, _f16(codes.to(torch.float32) * scale))
        return
    fmt = ops.FORMATS[outtype]
    buf = ops.pack(codes, scale, outtype).numpy()
    # An int8 view keeps the writer from converting the byte shape through its (I2_S-less) size table;
    # the logical [M, K] shape and the ggml type id go in as they are.
    writer.add_tensor(name, buf.view(np.int8), raw_shape=tuple(codes.shape), raw_dtype=fmt.ggml_type)


# ---- tokenizer ----------------------------------------------------------------------------------


def _tokenizer(tokenizer: Any, path: Path | None):
    if tokenizer is None:
        if path is None or not (path / "tokenizer.json").is_file():
            where = f"{path} has no tokenizer.json" if path is not None else "an in-memory model has no tokenizer"
            raise ValueError(f"export_gguf: {where}; pass tokenizer= (a transformers tokenizer or its directory)")
        tokenizer = path
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _add_tokenizer(writer, tokenizer, config) -> None:
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    n_vocab = config.vocab_size
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"export_gguf: the tokenizer has ids up to {max(vocab.values())}, the model {n_vocab} rows")
    by_id = {i: tok for tok, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"export_gguf: tokenizer.ggml.model gpt2 needs a BPE tokenizer, got {model.get('type')!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, tok_id, cfg_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id, config.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id, config.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id, config.pad_token_id),
    ):
        i = tok_id if tok_id is not None else cfg_id
        if isinstance(i, int) and 0 <= i < n_vocab:
            add(i)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---- the file -----------------------------------------------------------------------------------


def _write(writer_path: str, model: nn.Module, outtype: str, tokenizer) -> None:
    gguf = _gguf()
    config = model.config
    arch = I2S_ARCH if outtype == "i2_s" else gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET]
    block = 1 if outtype == "f16" else ops.FORMATS[outtype].block_values
    n_layers = config.num_hidden_layers
    projections = {
        (i, kind): _projection(model, f"model.layers.{i}.{sub}", block, outtype)
        for i in range(n_layers)
        for sub, kind in _PROJECTIONS.items()
    }
    _output_head_check(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    file_type = {
        "i2_s": I2S_FILE_TYPE,
        "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
        "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
    }[outtype]

    writer = gguf.GGUFWriter(writer_path, arch)
    try:
        writer.add_name(getattr(config, "name_or_path", None) or "bitnet")
        writer.add_file_type(int(file_type))
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if theta is not None:
            writer.add_rope_freq_base(float(theta))
        _add_tokenizer(writer, tokenizer, config)

        writer.add_tensor(tensor_name("TOKEN_EMBD"), _f16(model.model.embed_tokens.weight))
        writer.add_tensor(tensor_name("OUTPUT_NORM"), _f32(model.model.norm.weight))
        for i in range(n_layers):
            for sub, kind in _NORMS.items():
                writer.add_tensor(tensor_name(kind, i), _f32(model.get_submodule(f"model.layers.{i}.{sub}").weight))
            for kind in _PROJECTIONS.values():
                _add_projection(writer, tensor_name(kind, i), projections[i, kind], outtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


@torch.no_grad()
def export_gguf(
    model_or_path: nn.Module | str | os.PathLike,
    outfile: str | os.PathLike,
    outtype: str = "i2_s",
    tokenizer: Any = None,
) -> Path:
    """Write a transformers `bitnet` model as a GGUF file.

    Args:
        model_or_path: a checkpoint directory (config.json + safetensors, as
            :func:`~wrinklefree.models.hf_bitnet.save_bitnet` writes), or a model returned by
            :func:`~wrinklefree.models.hf_bitnet.load_bitnet` (or converted from a BitNetForCausalLM).
        outfile: the .gguf path; written to a temporary file beside it, then renamed, so a failed
            export leaves any existing file untouched.
        outtype: "i2_s" (bitnet.cpp), "tq2_0", "tq1_0" or "f16" (llama.cpp); see the module docstring.
        tokenizer: a transformers (fast, BPE) tokenizer or its directory. None: the checkpoint
            directory's tokenizer.json (required for in-memory models).
    Returns:
        the path written.
    Raises:
        ValueError: unknown outtype or architecture, a projection that is not a plain ternary
            BitLinear, K not a multiple of the format's block, an untied output head, or no tokenizer.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"export_gguf: outtype must be one of {OUTTYPES}, got {outtype!r}")
    model, path = _load(model_or_path)
    tokenizer = _tokenizer(tokenizer, path)
    outfile = Path(outfile)
    with atomic_path(outfile) as tmp:
        _write(tmp, model, outtype, tokenizer)
    return outfile
