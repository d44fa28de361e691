"""Data: sources (built-in corpus, local text/jsonl/parquet files, Hugging Face datasets), tokenizers,
packing into fixed-length sequences, weighted mixtures, and a resumable position.

    builtin_corpus(max_chars)                          corpus.py     the Python standard library's text
    get_tokenizer(name_or_path, vocab_size=...)        tokenizer.py  pretrained, or a BPE trained and cached
    BuiltinSource, LocalFilesSource, HFDatasetSource   sources.py    documents, in a fixed order
    build_source({"type": ..., ...})                   sources.py
    sources_from_config(cfg.data.sources)              sources.py    [(source, weight), ...]
    DocumentTokens, PackedSequences                    packing.py    one source -> [seq_len] token sequences
    build_loader(sources, tokenizer, seq_len, ...)     loader.py     mixture, ranks, eval split, state_dict

    tok = get_tokenizer(None)
    loader = build_loader([(BuiltinSource(), 1.0)], tok, seq_len=256, batch_size=8, seed=0)
    batch = next(loader)        # {"input_ids": LongTensor [8, 256]}
    state = loader.state_dict() # later: loader.load_state_dict(state)

Caches (trained tokenizers, the built-in corpus's token ids) live under ``$WF_CACHE_DIR`` or
``~/.cache/wrinklefree``. Importing this package does not import transformers.
"""

from wrinklefree.data.cache import cache_root
from wrinklefree.data.corpus import builtin_corpus
from wrinklefree.data.loader import PackedLoader, build_loader
from wrinklefree.data.packing import DocumentTokens, PackedSequences
from wrinklefree.data.sources import (
    BuiltinSource,
    HFDatasetSource,
    LocalFilesSource,
    Source,
    build_source,
    sources_from_config,
)
from wrinklefree.data.tokenizer import get_tokenizer

__all__ = [
    "BuiltinSource",
    "DocumentTokens",
    "HFDatasetSource",
    "LocalFilesSource",
    "PackedLoader",
    "PackedSequences",
    "Source",
    "build_loader",
    "build_source",
    "builtin_corpus",
    "cache_root",
    "get_tokenizer",
    "sources_from_config",
]
