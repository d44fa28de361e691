"""The loader: batches of packed sequences from a weighted mixture of sources, sharded over ranks, resumable.

Every rank computes the same global stream of sequences and keeps its slice of each global batch: global
batch ``t`` holds ``world_size * batch_size`` sequences and rank ``r`` gets rows ``r*batch_size`` to
``(r+1)*batch_size - 1``. So ranks see disjoint data, always produce the same number of batches, and the
position (``state_dict``) is the same on every rank: a checkpoint needs only one copy, and the data order does
not depend on the number of ranks. The price is that every rank tokenizes the whole stream (cheap next to a
training step; the built-in corpus is tokenized once and cached).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from wrinklefree.data.packing import DocumentTokens, PackedSequences, eval_every
from wrinklefree.data.sources import Source

# Eval sequences remembered per source across loaders (see _EvalSequences), in tokens per source.
EVAL_MEMO_TOKENS = 1 << 25


class PackedLoader:
    """An iterator of ``{"input_ids": torch.LongTensor [batch_size, seq_len]}``; build it with :func:`build_loader`.

    ``split="train"``: infinite. Each sequence comes from a source drawn with probability proportional to its
    weight (``default_rng([seed, 0, step])`` draws the sources of global batch ``step``); each source loops over
    its own epochs, reshuffled every epoch.
    ``split="eval"``: one pass over the held-out documents of each source in turn, in order, then StopIteration;
    the last incomplete global batch is dropped, so every rank stops after the same batch.
    """

    def __init__(
        self,
        streams: list[Iterator[np.ndarray]],
        weights: list[float],
        *,
        sources: list[Source],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        split: str,
        eval_every: int,
    ) -> None:
        self.streams, self.weights, self.sources = streams, np.asarray(weights, dtype=np.float64), sources
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.split, self.eval_every = rank, world_size, split, eval_every
        self.step = 0  # global batches produced
        self._eval_source = 0  # eval: the source being read

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch of this rank: ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = self.world_size * self.batch_size
        if self.split == "train":
            choice = np.random.default_rng([self.seed, 0, self.step]).choice(len(self.streams), size=n, p=self.weights)
            rows = [next(self.streams[s]) for s in choice]
        else:
            rows = []
            while len(rows) < n:
                if self._eval_source == len(self.streams):
                    raise StopIteration
                try:
                    rows.append(next(self.streams[self._eval_source]))
                except StopIteration:
                    self._eval_source += 1
        self.step += 1
        mine = np.stack(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        return {"input_ids": torch.from_numpy(mine.astype(np.int64))}

    def state_dict(self) -> dict:
        """The position: the next batch a restored loader yields is the one this loader would yield next.

        The same on every rank. Train: the number of global batches and each source's stream position; eval:
        the number of batches (restored by replaying them).
        """
        state = {
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "eval_every": self.eval_every,
            "sources": [repr(s) for s in self.sources],
            "contents": [s.contents() for s in self.sources],
            "step": self.step,
        }
        if self.split == "train":
            state["streams"] = [s.state_dict() for s in self.streams]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader over the same sources).

        Raises ValueError when the split, seed, sequence length, held-out fraction or number of sources
        differ. The batch size and the number of ranks may change: the stream continues from the same place.
        """
        for key in ("split", "seed", "seq_len", "eval_every"):
            if state[key] != getattr(self, key):
                raise ValueError(f"load_state_dict: {key} is {getattr(self, key)!r} here, {state[key]!r} in the state")
        if len(state["sources"]) != len(self.sources):
            raise ValueError(
                f"load_state_dict: {len(self.sources)} sources here but {len(state['sources'])} in the state"
            )
        if state["sources"] != [repr(s) for s in self.sources]:
            # A moved data folder is a legitimate reason; the positions still apply if the documents are the same.
            print(f"load_state_dict: sources differ from the saved ones {state['sources']}; continuing anyway")
        saved_contents = state.get("contents") or [None] * len(self.sources)  # states from before it was saved
        for i, (saved, now) in enumerate(zip(saved_contents, (s.contents() for s in self.sources), strict=True)):
            if saved is not None and now is not None and saved != now:
                print(
                    f"load_state_dict: warning: the files of source {i} ({self.sources[i]!r}) changed since the "
                    f"position was saved ({saved}; now {now}): the run may repeat or skip documents"
                )
        if self.split == "train":
            for stream, pos in zip(self.streams, state["streams"], strict=True):
                stream.load_state_dict(pos)
            self.step = int(state["step"])
        else:
            for _ in range(int(state["step"])):
                next(self)


def build_loader(
    sources: Sequence[tuple[Source, float] | Source],
    tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    eval_fraction: float = 0.0,
    split: str = "train",
    window: int = 4096,
    cache_dir: str | Path | None = None,
) -> PackedLoader:
    """A :class:`PackedLoader` over ``sources`` (``(source, weight)`` pairs; a bare source has weight 1).

    ``eval_fraction``: every ``round(1/eval_fraction)``-th document of each source is held out of ``"train"``
    and is what ``"eval"`` reads; pass the same value to both. ``window``: documents tokenized (and, for
    training, shuffled) together; a source of at most ``window`` documents is fully shuffled every epoch.
    ``cache_dir``: where the built-in corpus's token ids are cached (default ``$WF_CACHE_DIR/tokens`` or
    ``~/.cache/wrinklefree/tokens``).
    """
    if seq_len < 1:
        raise ValueError(f"build_loader: seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"build_loader: batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"build_loader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if split not in ("train", "eval"):
        raise ValueError(f"build_loader: split must be 'train' or 'eval', got {split!r}")
    every = eval_every(eval_fraction)
    if split == "eval" and every == 0:
        raise ValueError("build_loader: split='eval' needs eval_fraction > 0")
    pairs = [(s, 1.0) if isinstance(s, Source) else (s[0], float(s[1])) for s in sources]
    if not pairs:
        raise ValueError("build_loader: sources is empty")
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"build_loader: weights must be >= 0 with a positive sum, got {weights.tolist()}")

    streams = []
    for i, (source, _) in enumerate(pairs):
        docs = DocumentTokens(source, tokenizer, split=split, eval_every=every, window=window, cache_dir=cache_dir)
        if split == "train":
            streams.append(PackedSequences(docs, seq_len, shuffle_seed=(seed, 1, i), repeat=True))
        else:
            streams.append(_eval_memo(source, (docs.fingerprint, seq_len, every, window)).sequences(docs, seq_len))
    return PackedLoader(
        streams,
        (weights / weights.sum()).tolist(),
        sources=[s for s, _ in pairs],
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        split=split,
        eval_every=every,
    )


class _EvalSequences:
    """One source's eval sequences, remembered across loaders (up to EVAL_MEMO_TOKENS tokens).

    The trainer builds a fresh eval loader at every evaluation, and with ``eval_fraction = 1/k`` reading n
    held-out documents means reading k*n documents of the source: a streamed dataset would be read again
    each time.
    """

    def __init__(self) -> None:
        self.seqs: list[np.ndarray] = []
        self.position: dict | None = None  # the stream position after the last remembered sequence
        self.complete = False  # the remembered sequences are the whole split

    def sequences(self, docs: DocumentTokens, seq_len: int) -> Iterator[np.ndarray]:
        i = 0
        while i < len(self.seqs):  # by index: another loader may extend the list meanwhile
            yield self.seqs[i]
            i += 1
        if self.complete:
            return
        stream = PackedSequences(docs, seq_len, shuffle_seed=None, repeat=False)
        if self.position is not None:
            stream.load_state_dict(self.position)
        for seq in stream:
            if i == len(self.seqs) and (i + 1) * seq_len <= EVAL_MEMO_TOKENS:
                self.seqs.append(seq)
                self.position = stream.state_dict()
            i += 1
            yield seq
        self.complete = i == len(self.seqs)


_EVAL_MEMOS: weakref.WeakKeyDictionary[Source, dict[tuple, _EvalSequences]] = weakref.WeakKeyDictionary()


def _eval_memo(source: Source, key: tuple) -> _EvalSequences:
    return _EVAL_MEMOS.setdefault(source, {}).setdefault(key, _EvalSequences())
