"""Tokenizers: a pretrained one by name or path, or a byte-level BPE trained on the built-in corpus on first
use and cached as a ``tokenizer.json``.

Every tokenizer returned here has ``eos_token_id``, ``pad_token_id`` and ``mask_token_id`` (the diffusion
objective's mask); ``bos_token_id`` may be None for pretrained tokenizers without one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wrinklefree.atomic import atomic_write_text
from wrinklefree.data.cache import cache_root, short_hash
from wrinklefree.data.corpus import builtin_corpus, corpus_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK)

# Bump when the training recipe below changes: it is part of the cache key.
BPE_RECIPE_VERSION = 1
# BPE training time grows with the text; past this many characters a stride sample of the documents is used.
MAX_TRAIN_CHARS = 32_000_000


def get_tokenizer(
    name_or_path: str | None,
    *,
    vocab_size: int = 4096,
    corpus: Callable[[], list[str]] | None = None,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with eos, pad and mask tokens.

    ``name_or_path`` None or ``"builtin"``: a byte-level BPE of ``vocab_size`` tokens (the 4 special tokens
    ``<|bos|> <|eos|> <|pad|> <|mask|>`` included) trained on :func:`builtin_corpus`, or on ``corpus()`` when
    given, cached under ``cache_dir`` (default ``$WF_CACHE_DIR/tokenizers`` or
    ``~/.cache/wrinklefree/tokenizers``). The cache key is the Python build for the built-in corpus and a hash of
    the text for ``corpus``, which is therefore called on every use.

    Otherwise ``AutoTokenizer.from_pretrained(name_or_path)`` (a hub id, or a local directory), with
    ``<|mask|>`` added when the tokenizer has no mask token, ``<|eos|>`` when it has no eos, and pad set to
    eos when it has no pad. Adding tokens grows ``len(tokenizer)`` past the model's vocabulary: resize the
    embeddings to ``len(tokenizer)``.
    """
    if name_or_path is None or name_or_path == "builtin":
        return _builtin_bpe(vocab_size, corpus, cache_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": MASK})
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts``; ids 0-3 are bos, eos, pad, mask.

    Byte-level pre-tokenization and decoding make ``decode(encode(s)) == s`` for every string, and no special
    tokens are added on encode: the packer adds bos/eos itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _builtin_bpe(vocab_size: int, corpus: Callable[[], list[str]] | None, cache_dir: str | Path | None):
    from transformers import PreTrainedTokenizerFast

    _check_vocab_size(vocab_size)
    texts = None
    if corpus is None:
        identity = corpus_key(16_000_000)
    else:
        texts = corpus()
        identity = "custom|" + short_hash(len(texts), *texts)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = folder / f"bpe-{vocab_size}-{short_hash(BPE_RECIPE_VERSION, vocab_size, identity)}.json"
    if not path.is_file():
        texts = builtin_corpus() if texts is None else texts
        sample = _sample(texts, MAX_TRAIN_CHARS)
        mb = sum(map(len, sample)) / 1e6
        print(f"training tokenizer (vocab {vocab_size}) on {mb:.1f} MB ...", end=" ", flush=True)
        t0 = time.perf_counter()
        tok = train_bpe(sample, vocab_size)
        atomic_write_text(path, tok.to_str())
        print(f"done in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        clean_up_tokenization_spaces=False,
    )


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"get_tokenizer: vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")


def _sample(texts: list[str], max_chars: int) -> list[str]:
    # A stride over the documents rather than a prefix: the corpus is sorted by path, so a prefix would be a
    # few packages only.
    total = sum(map(len, texts))
    if total <= max_chars:
        return texts
    return texts[:: -(-total // max_chars)]
