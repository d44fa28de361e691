"""GGUF export of transformers `bitnet` models for bitnet.cpp (I2_S) and llama.cpp (TQ2_0, TQ1_0, F16).

Layouts (DESIGN.md section 3):

* ``i2_s``: architecture ``bitnet-b1.58`` (bitnet.cpp), projections I2_S (ggml type 36),
  ``general.file_type`` 40.
* ``tq2_0`` / ``tq1_0``: architecture ``bitnet`` (upstream llama.cpp), projections TQ2_0 / TQ1_0.
  The per-tensor scale is folded into every block's fp16 scale, so no ``blk.N.*.scale`` tensors
  are written (llama.cpp loads those as optional and multiplies by them only when present).
* ``f16``: architecture ``bitnet``, projections F16 holding the dequantized ``codes * scale``.

bitnet.cpp's graph computes the FFN as relu(gate)^2 * up and llama.cpp's as silu(gate) * up, and
neither reads the activation from the file, so a model is exported only to the outtypes whose
reader computes its ``hidden_act`` (relu2: i2_s; silu: tq2_0, tq1_0, f16).

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
import tempfile
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
from wrinklefree.train.checkpoint import one_line

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
PROJECTION_KINDS = tuple(_PROJECTIONS.values())
NORM_KINDS = tuple(_NORMS.values())

# The FFN activation each reader's graph computes (neither reads it from the file): bitnet.cpp's
# bitnet-b1.58 relu(gate)^2 * up, llama.cpp's bitnet (src/models/bitnet.cpp) silu(gate) * up.
ARCH_ACTIVATION = {I2S_ARCH: "relu2", "bitnet": "silu"}
ACTIVATION_ALIASES = {"relu2": ("relu2",), "silu": ("silu", "swish")}  # transformers' ACT2FN names


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
    extras = [
        what
        for what, present in (
            ("Q-Sparse", layer.qsparse is not None),
            ("its own SubLN", layer.subln is not None),
            ("a bias", layer.bias is not None),
        )
        if present
    ]
    if extras:
        raise ValueError(f"export_gguf: {name} has {' and '.join(extras)}, which GGUF bitnet cannot hold")
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


# ---- tokenizer ----------------------------------------------------------------------------------


def load_tokenizer(directory: str | os.PathLike, what: str = "export_gguf: tokenizer"):
    """The transformers tokenizer saved in ``directory`` (``save_pretrained``); a ValueError that begins with
    ``what`` and names the directory when there is none (never a hub lookup: a directory is required)."""
    path = Path(directory)
    if not path.is_dir():
        found = "a file" if path.exists() else "no such directory"
        raise ValueError(f"{what} {directory}: {found}; expected a tokenizer directory (as save_pretrained writes)")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(
            f"{what} {directory}: holds no tokenizer.json or tokenizer_config.json; expected a tokenizer "
            "directory (as save_pretrained writes)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers' errors differ by what is wrong: OSError, ValueError, JSON errors
        raise ValueError(f"{what} {directory}: its tokenizer does not load ({one_line(e)})") from e


def _tokenizer(tokenizer: Any, path: Path | None):
    if tokenizer is None:
        if path is None or not (path / "tokenizer.json").is_file():
            where = f"{path} has no tokenizer.json" if path is not None else "an in-memory model has no tokenizer"
            raise ValueError(f"export_gguf: {where}; pass tokenizer= (a transformers tokenizer or its directory)")
        tokenizer = path
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return tokenizer


# ---- the output file ----------------------------------------------------------------------------


def check_outfile(outfile: str | os.PathLike, what: str = "export_gguf: outfile") -> Path:
    """``outfile`` as a Path, once it is known that a file can be written there: not empty, not a
    directory, and the nearest existing ancestor a directory in which files can be created. A ValueError
    that begins with ``what`` otherwise, before anything is loaded or written."""
    if not os.fspath(outfile).strip():
        raise ValueError(f"{what} is empty; expected the path of the .gguf file to write")
    path = Path(outfile)
    if path.is_dir():
        raise ValueError(f"{what} {outfile}: is a directory; expected the path of the .gguf file to write")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {outfile}: {parent} is not a directory")
    try:  # the only sure test that files can be created there; O_TMPFILE where it can, so nothing shows
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{what} {outfile}: cannot create files in {parent} ({e.strerror or e})") from e
    return path


def _vocab(tokenizer, n_vocab: int) -> dict:
    """The ``BitnetWriter.add_vocab`` arguments of a transformers (fast, BPE) tokenizer, padded to n_vocab."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
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
    return dict(
        tokens=tokens,
        types=types,
        merges=merges,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


# ---- the file -----------------------------------------------------------------------------------


def architecture(outtype: str) -> str:
    """``general.architecture`` of an outtype's files: bitnet.cpp's for i2_s, upstream llama.cpp's otherwise."""
    if outtype not in OUTTYPES:
        raise ValueError(f"export_gguf: outtype must be one of {OUTTYPES}, got {outtype!r}")
    return I2S_ARCH if outtype == "i2_s" else _gguf().MODEL_ARCH_NAMES[_gguf().MODEL_ARCH.BITNET]


def default_outtype(config) -> str:
    """The first of :data:`OUTTYPES` whose reader computes the model's FFN activation (``config.hidden_act``):
    i2_s for relu2, tq2_0 for silu."""
    act = getattr(config, "hidden_act", None)
    for outtype in OUTTYPES:
        if act in ACTIVATION_ALIASES.get(ARCH_ACTIVATION[architecture(outtype)], ()):
            return outtype
    raise ValueError(
        f"export_gguf: no outtype's reader computes hidden_act={act!r} (bitnet.cpp: relu2, llama.cpp: silu)"
    )


def check_activation(config, outtype: str) -> None:
    """Refuse a model whose FFN activation (``config.hidden_act``) is not the one the reader's graph
    computes: bitnet.cpp's ``bitnet-b1.58`` computes relu(gate)^2 * up, llama.cpp's ``bitnet``
    silu(gate) * up. Neither reads the activation from the file, so a mismatch would load and run,
    and give wrong logits."""
    arch = architecture(outtype)
    want = ARCH_ACTIVATION[arch]
    act = getattr(config, "hidden_act", None)
    if act in ACTIVATION_ALIASES.get(want, (want,)):
        return
    fits = [t for t in OUTTYPES if act in ACTIVATION_ALIASES.get(ARCH_ACTIVATION[architecture(t)], ())]
    hint = f"; a {act} model exports to {', '.join(fits)}" if fits else ""
    raise ValueError(
        f"export_gguf: the model has hidden_act={act!r}, but outtype {outtype} is read as architecture {arch!r}, "
        f"whose graph computes the FFN with {want}{hint}"
    )


class BitnetWriter:
    """One bitnet GGUF file being written (DESIGN.md section 3).

    The hyperparameters come from a transformers ``BitNetConfig`` (only its fields are read, so no
    model need exist); then the vocabulary and the tensors, in any order; :meth:`write` puts the file
    on disk and closes it. :func:`export_gguf` feeds it a model's weights, bench/e2e.py random codes.
    Tensors are held in memory until :meth:`write` (the packed size of the model).
    """

    def __init__(self, path: str | os.PathLike, config, outtype: str):
        gguf = _gguf()
        check_activation(config, outtype)
        self.outtype = outtype
        self.config = config
        self.block = 1 if outtype == "f16" else ops.FORMATS[outtype].block_values
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        file_type = {
            "i2_s": I2S_FILE_TYPE,
            "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
            "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
        }[outtype]

        w = self.writer = gguf.GGUFWriter(os.fspath(path), architecture(outtype))
        w.add_name(getattr(config, "name_or_path", None) or "bitnet")
        w.add_file_type(int(file_type))
        w.add_vocab_size(config.vocab_size)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        if theta is not None:
            w.add_rope_freq_base(float(theta))

    def add_vocab(
        self,
        tokens: list[str],
        types: list[int],
        merges: list[str],
        bos: int | None = None,
        eos: int | None = None,
        pad: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        """A ``gpt2`` (byte-level BPE) vocabulary of ``config.vocab_size`` tokens and its merges ("a b"); special
        ids outside it (or None) fall back to the config's, and are left out if those are missing too."""
        n_vocab = self.config.vocab_size
        if len(tokens) != n_vocab or len(types) != n_vocab:
            raise ValueError(f"export_gguf: {len(tokens)} tokens and {len(types)} types for a vocabulary of {n_vocab}")
        if not merges:  # the gguf package drops an empty array, and llama.cpp refuses a gpt2 vocabulary without
            raise ValueError("export_gguf: a gpt2 (BPE) vocabulary needs merges; llama.cpp does not load one without")
        w = self.writer
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(list(merges))
        for add, tok_id, cfg_id in (
            (w.add_bos_token_id, bos, self.config.bos_token_id),
            (w.add_eos_token_id, eos, self.config.eos_token_id),
            (w.add_pad_token_id, pad, self.config.pad_token_id),
        ):
            i = tok_id if tok_id is not None else cfg_id
            if isinstance(i, int) and 0 <= i < n_vocab:
                add(i)
        if chat_template:
            w.add_chat_template(chat_template)

    def add_token_embedding(self, weight: Tensor) -> None:
        """[vocab, hidden] -> ``token_embd.weight``, F16; also the output head."""
        self.writer.add_tensor(tensor_name("TOKEN_EMBD"), _f16(weight))

    def add_norm(self, kind: str, layer: int | None, weight: Tensor) -> None:
        """An RMSNorm gain, F32: ``kind`` "OUTPUT_NORM" (layer None) or one of NORM_KINDS."""
        self.writer.add_tensor(tensor_name(kind, layer), _f32(weight))

    def add_projection(self, kind: str, layer: int, codes: Tensor, scale: Tensor) -> None:
        """A ternary projection (one of PROJECTION_KINDS): int8 codes [M, K] in {-1, 0, 1} and its
        float32 tensor scale, packed in the outtype's format (F16 ``codes * scale`` for f16)."""
        codes, scale = codes.cpu().contiguous(), scale.to(torch.float32).cpu()
        name = tensor_name(kind, layer)
        if codes.shape[1] % self.block:
            raise ValueError(
                f"export_gguf: {name} has K={codes.shape[1]} inputs, not a multiple of the {self.outtype} "
                f"block of {self.block}"
            )
        if self.outtype == "f16":
            self.writer.add_tensor(name, _f16(codes.to(torch.float32) * scale))
            return
        buf = ops.pack(codes, scale, self.outtype).numpy()
        # An int8 view keeps the writer from converting the byte shape through its (I2_S-less) size
        # table; the logical [M, K] shape and the ggml type id go in as they are.
        self.writer.add_tensor(
            name, buf.view(np.int8), raw_shape=tuple(codes.shape), raw_dtype=ops.FORMATS[self.outtype].ggml_type
        )

    def write(self) -> None:
        try:
            self.writer.write_header_to_file()
            self.writer.write_kv_data_to_file()
            self.writer.write_tensors_to_file()
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


def _write(path: str, model: nn.Module, outtype: str, tokenizer) -> None:
    config = model.config
    block = 1 if outtype == "f16" else ops.FORMATS[outtype].block_values
    n_layers = config.num_hidden_layers
    projections = {
        (i, kind): _projection(model, f"model.layers.{i}.{sub}", block, outtype)
        for i in range(n_layers)
        for sub, kind in _PROJECTIONS.items()
    }
    _output_head_check(model)
    vocab = _vocab(tokenizer, config.vocab_size)

    out = BitnetWriter(path, config, outtype)
    try:
        out.add_vocab(**vocab)
        out.add_token_embedding(model.model.embed_tokens.weight)
        out.add_norm("OUTPUT_NORM", None, model.model.norm.weight)
        for i in range(n_layers):
            for sub, kind in _NORMS.items():
                out.add_norm(kind, i, model.get_submodule(f"model.layers.{i}.{sub}").weight)
            for kind in PROJECTION_KINDS:
                out.add_projection(kind, i, *projections[i, kind].ternary_weight())
    except BaseException:
        out.close()
        raise
    out.write()


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
        outtype: "i2_s" (bitnet.cpp), "tq2_0", "tq1_0" or "f16" (llama.cpp), see the module docstring; or
            "auto": the one :func:`default_outtype` picks for the model's FFN activation.
        tokenizer: a transformers (fast, BPE) tokenizer or its directory. None: the checkpoint
            directory's tokenizer.json (required for in-memory models).
    Returns:
        the path written.
    Raises:
        ValueError: unknown outtype or architecture, an FFN activation (hidden_act) that the outtype's
            reader does not compute, a projection that is not a plain ternary BitLinear, K not a
            multiple of the format's block, an untied output head, no tokenizer or a directory that
            holds none, or an outfile that cannot be written (empty, a directory, a parent in which
            no file can be created; checked before the model loads).
        OSError: writing the file failed (e.g. disk full); the message names ``outfile``.
    """
    if outtype != "auto":
        architecture(outtype)  # an unknown outtype fails before the model loads
    outfile = check_outfile(outfile)
    model, path = _load(model_or_path)
    if outtype == "auto":
        outtype = default_outtype(model.config)
    check_activation(model.config, outtype)
    tokenizer = _tokenizer(tokenizer, path)
    try:
        with atomic_path(outfile) as tmp:
            _write(tmp, model, outtype, tokenizer)
    except OSError as e:  # named with the file asked for, not only the temporary one beside it
        raise OSError(f"export_gguf: cannot write outfile {outfile}: {e.strerror or e}") from e
    return outfile
