"""Tokenize one source's documents and pack them into fixed-length sequences.

Each document becomes ``[bos] tokens eos`` (bos only when the tokenizer has one distinct from eos). Documents
are concatenated and cut every ``seq_len`` tokens, so a sequence may span documents (and epochs); eos marks
every boundary. Documents are read in windows of ``window`` documents: a window is tokenized in one batch call
and, for training, shuffled, which keeps memory bounded on streaming sources. The built-in corpus is small and
fixed, so its token ids are computed once and cached on disk.

The eval split holds out every ``eval_every``-th document of a source (in the source's own order).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from wrinklefree.atomic import atomic_path
from wrinklefree.data.cache import cache_root, short_hash
from wrinklefree.data.sources import Source

# Bump when the token cache's layout or the tokenization rules change: it is part of the cache key.
TOKENS_VERSION = 1


def eval_every(eval_fraction: float) -> int:
    """Every k-th document is held out for eval: k = round(1 / eval_fraction); 0 when nothing is held out."""
    if not 0.0 <= eval_fraction <= 0.5:
        raise ValueError(f"eval_fraction must be in [0, 0.5], got {eval_fraction}")
    return 0 if eval_fraction == 0 else round(1 / eval_fraction)


def is_eval_document(index: int, every: int) -> bool:
    """Whether document ``index`` (0-based, in the source's order) belongs to the eval split."""
    return every > 0 and index % every == every - 1


class DocumentTokens:
    """The documents of one source and one split (``"train"`` or ``"eval"``) as token ids, window by window.

    :meth:`windows` yields lists of int arrays (uint16, or int32 for vocabularies past 65536), one per document
    with bos/eos added. Windows before ``start`` are skipped without being tokenized.
    """

    def __init__(
        self,
        source: Source,
        tokenizer,
        *,
        split: str,
        eval_every: int,
        window: int = 4096,
        cache_dir: str | Path | None = None,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.source, self.split, self.eval_every, self.window = source, split, eval_every, window
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no eos token (get_tokenizer adds one)")
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and bos != self.eos else None
        self.dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
        self.fingerprint, self._encode = _encoder(tokenizer)
        self._cached = None
        if source.cache_key is not None:
            folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
            name = f"tokens-{short_hash(TOKENS_VERSION, source.cache_key, self.fingerprint)}.npz"
            self._cached = _cached_tokens(str(folder / name), source, self._encode, self.dtype)

    def windows(self, start: int = 0) -> Iterator[list[np.ndarray]]:
        """Windows ``start, start+1, ...`` of this split's documents, in the source's order."""
        want_eval = self.split == "eval"
        docs = (d for i, d in enumerate(self._documents()) if is_eval_document(i, self.eval_every) == want_eval)
        for w, chunk in enumerate(_chunks(docs, self.window)):
            if w < start:
                continue
            if self._cached is None:
                chunk = [np.asarray(ids, dtype=self.dtype) for ids in self._encode(chunk)]
            yield [self._wrap(ids) for ids in chunk]

    def _documents(self) -> Iterator[str | np.ndarray]:
        if self._cached is None:
            return self.source.documents()
        tokens, offsets = self._cached
        return (tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))

    def _wrap(self, ids: np.ndarray) -> np.ndarray:
        parts = [ids, np.array([self.eos], dtype=self.dtype)]
        if self.bos is not None:
            parts.insert(0, np.array([self.bos], dtype=self.dtype))
        return np.concatenate(parts)


class PackedSequences:
    """An iterator of token sequences (``np.ndarray [seq_len]``) packed from one :class:`DocumentTokens`.

    ``position`` (``state_dict``) says where the next sequence starts: token ``offset`` of document ``doc``
    (in the window's shuffled order) of window ``window`` in epoch ``epoch``. Restoring it resumes exactly.
    ``repeat``: loop over epochs forever, or stop after one, dropping the last partial sequence.
    ``shuffle_seed``: each window's documents are permuted by ``default_rng([*shuffle_seed, epoch, window])``,
    so every epoch has its own order; None keeps the source's order.
    """

    def __init__(
        self, docs: DocumentTokens, seq_len: int, *, shuffle_seed: tuple[int, ...] | None, repeat: bool
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.docs, self.seq_len, self.shuffle_seed, self.repeat = docs, seq_len, shuffle_seed, repeat
        self.position = {"epoch": 0, "window": 0, "doc": 0, "offset": 0}
        self._gen = None

    def __iter__(self) -> PackedSequences:
        return self

    def __next__(self) -> np.ndarray:
        if self._gen is None:
            self._gen = self._generate(**self.position)
        seq, self.position = next(self._gen)
        return seq

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = {k: int(state[k]) for k in ("epoch", "window", "doc", "offset")}
        self._gen = None

    def _generate(self, epoch: int, window: int, doc: int, offset: int) -> Iterator[tuple[np.ndarray, dict]]:
        parts, filled = [], 0
        while True:
            at_start, produced = (window, doc, offset) == (0, 0, 0), False
            for w, docs in enumerate(self.docs.windows(start=window), start=window):
                order = self._order(epoch, w, len(docs))
                for d in range(doc if w == window else 0, len(docs)):
                    tokens = docs[order[d]]
                    o = offset if (w, d) == (window, doc) else 0
                    while o < len(tokens):
                        take = min(self.seq_len - filled, len(tokens) - o)
                        parts.append(tokens[o : o + take])
                        filled, o, produced = filled + take, o + take, True
                        if filled == self.seq_len:
                            yield np.concatenate(parts), {"epoch": epoch, "window": w, "doc": d, "offset": o}
                            parts, filled = [], 0
            if not self.repeat:
                return
            if at_start and not produced:
                raise ValueError(f"{self.docs.source!r} has no documents in the {self.docs.split} split")
            epoch, window, doc, offset = epoch + 1, 0, 0, 0

    def _order(self, epoch: int, window: int, n: int) -> np.ndarray:
        if self.shuffle_seed is None:
            return np.arange(n)
        return np.random.default_rng([*self.shuffle_seed, epoch, window]).permutation(n)


def _encoder(tokenizer) -> tuple[str, Callable[[list[str]], list[list[int]]]]:
    """(fingerprint, encode): a string identifying the tokenizer's behaviour, and a batch encoder without
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        fingerprint = short_hash(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer))
        return fingerprint, lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    spec = backend.to_str()
    # A private copy, so that truncation or padding saved in a tokenizer.json cannot cut documents, without
    # changing the caller's tokenizer.
    backend = Tokenizer.from_str(spec)
    backend.no_truncation()
    backend.no_padding()
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return short_hash(spec), lambda texts: [e.ids for e in encode_batch(texts, add_special_tokens=False)]


def _cached_tokens(path: str, source: Source, encode, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets): all documents' ids concatenated without bos/eos, and int64 [n_docs + 1] offsets;
    computed and saved to ``path`` on first use."""
    if not Path(path).is_file():
        docs = list(source.documents())
        mb = sum(map(len, docs)) / 1e6
        print(f"tokenizing {len(docs)} documents ({mb:.1f} MB) of {source!r} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        ids = [np.asarray(x, dtype=dtype) for chunk in _chunks(iter(docs), 1024) for x in encode(chunk)]
        offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
        tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=tokens, offsets=offsets)
        print(f"done in {time.perf_counter() - t0:.1f} s ({len(tokens):,} tokens) -> {path}", flush=True)
    return _load_tokens(path)


@functools.lru_cache(maxsize=4)
def _load_tokens(path: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached in memory: the trainer builds a fresh eval loader over the same sources at every evaluation.
    with np.load(path) as f:
        return f["tokens"], f["offsets"]


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
