"""A tiny random-weight BitNet model exported to GGUF with a byte-level BPE tokenizer that has chat markers: the
model file of the inference tests (nothing is downloaded)."""

from pathlib import Path

import gguf
import torch
import transformers
from tiny_configs import TINY_SHAPE

from wrinklefree import convert
from wrinklefree.data import get_tokenizer
from wrinklefree.export import export_gguf, i2s_readable

IM_START, IM_END, THINK = "<|im_start|>", "<|im_end|>", "<think>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EXTRA_ROWS = 4  # embedding rows past the tokenizer: exported as unused [PADn] tokens


def corpus() -> list[str]:
    return [
        "the quick brown fox jumps over the lazy dog",
        "hello world, bitnet ternary weights 123",
        "déjà vu: naïve café, 東京",
    ] * 40


def tiny_tokenizer(cache_dir: Path):
    """The built-in BPE trained on :func:`corpus` (300 tokens), plus chat markers (special: exported as control
    tokens) and one user-defined token."""
    tok = get_tokenizer(None, vocab_size=300, corpus=corpus, cache_dir=cache_dir)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.add_tokens([THINK])
    return tok


def export_tiny_gguf(path: Path, tokenizer, chat_template: str | None = CHAT_TEMPLATE, outtype: str = "i2_s") -> Path:
    """A 2-layer BitNet (TINY_SHAPE, context 128) with non-trivial norms, exported to ``path``."""
    torch.manual_seed(0)
    shape = {**TINY_SHAPE, "vocab_size": len(tokenizer) + EXTRA_ROWS, "max_position_embeddings": 128}
    config = transformers.BitNetConfig(
        **shape,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.BitNetForCausalLM(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    tokenizer.chat_template = chat_template
    return export_gguf(convert(model).eval(), path, outtype, tokenizer=tokenizer)


def read_metadata(path: Path) -> dict:
    """Every key/value of a GGUF file, read with the gguf package (independently of the engine)."""
    with i2s_readable():
        reader = gguf.GGUFReader(path)
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
