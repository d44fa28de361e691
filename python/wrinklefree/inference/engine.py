"""The CPU inference engine over a GGUF file: the C++ forward pass (``wrinklefree._C.Engine``) with tokenization,
sampling, stop conditions and streaming around it.

    engine = Engine("model.gguf", threads=2)
    for piece in engine.generate("The capital of France is", max_tokens=32, temperature=0):
        print(piece, end="", flush=True)
    print(engine.last_stats)
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wrinklefree import _C, ops
from wrinklefree.inference.sampling import Sampler, SamplingParams, is_int
from wrinklefree.inference.tokenizer import GGUFTokenizer, IncrementalDecoder

HEADS = ("f16", "int8")
# Tokens the repetition penalty looks back over (llama.cpp's default penalty_last_n).
REPETITION_WINDOW = 64


@dataclass
class GenerationStats:
    """Counts and timings of one :meth:`Engine.generate` call.

    ``prompt_seconds`` covers the prefill forward pass and the choice of the first token; ``decode_tokens``
    counts the single-token forward passes after it and ``decode_seconds`` their time with the sampling of the
    token each one yields (the last token generated needs no forward pass, as in llama.cpp's counts).
    ``finish_reason``: "eos" (an end-of-generation token), "stop" (a stop string), "length" (max_tokens) or
    "context" (the context is full); "" while generating.
    """

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (0 before any timing)."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Decoded tokens per second (0 before any timing)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Engine:
    """A loaded GGUF model (bitnet.cpp ``bitnet-b1.58`` with I2_S weights, or llama.cpp ``bitnet`` with TQ1_0 /
    TQ2_0) with its KV cache and tokenizer.

    The engine has one KV cache: :meth:`generate`, :meth:`logits` and :meth:`reset` all use it, so a stream of
    :meth:`generate` stops (RuntimeError) once any of them is called again on the same engine.

    Args:
        model: path of the .gguf file.
        n_ctx: context length (KV cache positions), at most the file's context_length.
        threads: threads of the CPU kernels; this sets the process-wide kernel pool
            (:func:`wrinklefree.ops.set_num_threads`). None keeps the current setting.
        head: "f16" runs the output head as stored; "int8" quantizes it per row at load, about halving the bytes
            read per decoded token at a small cost in accuracy.
        use_mmap: run the weights from the file's memory mapping, as stored, instead of copying them at load
            into memory backed by huge pages. Loads faster and shares the page cache between processes that
            open the same file; decodes about 5% slower. Weights the engine repacks (TQ2_0) are copied either way.

    Raises:
        FileNotFoundError: ``model`` does not exist.
        IsADirectoryError: ``model`` is a directory.
        ValueError: a bad argument, or a file that is not a GGUF model this engine runs (the message says why and
            names the file).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        n_ctx: int = 2048,
        threads: int | None = None,
        head: str = "f16",
        use_mmap: bool = False,
    ) -> None:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        if path.is_dir():
            raise IsADirectoryError(f"model path is a directory, not a GGUF file: {path}")
        if not path.is_file():
            raise ValueError(f"model path is not a regular file: {path}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if not isinstance(use_mmap, bool):
            raise TypeError(f"use_mmap must be a bool, got {type(use_mmap).__name__}")
        if not is_int(n_ctx) or n_ctx < 1:
            raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
        if threads is not None:
            if not is_int(threads) or threads < 1:
                raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
            ops.set_num_threads(threads)
        self._native = _C.Engine(str(path), n_ctx, head, use_mmap)
        self.path = path
        self.metadata: dict[str, Any] = self._native.metadata()
        try:
            self.tokenizer = GGUFTokenizer(self.metadata)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        self.last_stats = GenerationStats()
        self._logits = torch.empty(self.n_vocab, dtype=torch.float32)
        self._cache_user = 0  # bumped by each call that uses the KV cache; a stream checks it is still its own

    @property
    def arch(self) -> str:
        """``general.architecture``: "bitnet-b1.58" or "bitnet"."""
        return self._native.arch

    @property
    def ternary_format(self) -> str:
        """The format the ternary projections run in: "i2_s" (I2_S and TQ2_0 files, which are repacked at load), or
        "tq1_0" (a TQ1_0 file run as stored, where the CPU has AVX-512; elsewhere TQ1_0 is repacked to I2_S)."""
        return self._native.ternary_format

    @property
    def n_vocab(self) -> int:
        return self._native.n_vocab

    @property
    def n_ctx(self) -> int:
        """Context length: the ``n_ctx`` asked for, capped at the file's context_length."""
        return self._native.n_ctx

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache."""
        return self._native.n_past

    def reset(self) -> None:
        """Empty the KV cache."""
        self._use_cache()
        self._native.truncate(0)

    def logits(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` after those already in the cache and return float32 logits: [n_vocab] for the last
        token, or [len(tokens), n_vocab] with ``all_logits``.

        Raises:
            ValueError: no tokens, an id that is not an integer in [0, n_vocab), or more tokens than the context
                has room for.
        """
        tokens = self._token_ids(tokens, "tokens")
        out = torch.empty((len(tokens), self.n_vocab) if all_logits else self.n_vocab, dtype=torch.float32)
        self._use_cache()
        self._native.eval(tokens, out.data_ptr(), all_logits)
        return out

    def _use_cache(self) -> int:
        """Mark the KV cache as taken by a new call and return its number: streams of earlier calls stop."""
        self._cache_user += 1
        return self._cache_user

    def _check_cache(self, user: int) -> None:
        """Raise RuntimeError when a call since the one numbered ``user`` (:meth:`_use_cache`) used the cache."""
        if self._cache_user != user:
            raise RuntimeError(
                "another call used the engine's cache since this stream started (generate(), logits() or reset() "
                "on the same Engine), so it cannot go on: read one stream at a time, or use one Engine per stream"
            )

    def _token_ids(self, ids: Iterable[int], name: str) -> list[int]:
        """``ids`` as a list of ints, checked to be token ids: integers in [0, n_vocab) (Python, numpy or torch
        integers; not bools)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ValueError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
        ids = list(ids)
        out = [_integer(i) for i in ids]
        bad = [i for i, j in zip(ids, out, strict=True) if j is None or not 0 <= j < self.n_vocab]
        if bad:
            raise ValueError(f"{name} must hold token ids, integers in [0, {self.n_vocab}), got {bad[:5]}")
        return out

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        chat: bool = False,
    ) -> Iterator[str]:
        """Generate text after ``prompt`` and stream it in pieces of complete characters.

        The cache is reset first. A text prompt is tokenized with bos (when the file asks for it), so empty text
        generates from bos alone; a list of ids is used as given. Generation ends at an end-of-generation token
        (eos, or a turn end such as ``<|eot_id|>``), after ``max_tokens`` tokens, at the first of the ``stop``
        strings (not itself emitted: text that could still be the start of one is held back until it is not), or
        when the context is full. :attr:`last_stats` holds the counts and timings, also when the caller stops
        reading early. The stream uses the engine's KV cache until it ends: another :meth:`generate`,
        :meth:`logits` or :meth:`reset` on this engine before then makes reading it further raise RuntimeError.

        Args:
            prompt: text, or token ids (integers in [0, n_vocab)).
            max_tokens: most tokens to generate, >= 1.
            temperature, top_k, top_p, repetition_penalty, seed: see :class:`SamplingParams`; temperature 0 is
                greedy.
            stop: one stop string or several.
            chat: render a text prompt as a user message with the file's chat template first.

        Raises:
            ValueError (when called, before any text): bad sampling parameters, max_tokens or stop strings, a
                prompt with no tokens (no ids, or empty text without bos), one that fills the context or holds
                ids out of range, chat with token ids, with a file without a template or with a template that
                fails.
            RuntimeError (when read): another call used the engine's cache since this stream started.
        """
        if not is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, repetition_penalty, seed))
        stops = (stop,) if isinstance(stop, str) or not isinstance(stop, Iterable) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or several, got {stop!r}")
        ids = self._prompt_ids(prompt, chat)
        if not ids:
            raise ValueError("the prompt has no tokens")
        if len(ids) >= self.n_ctx:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, leaving no room to generate in a context of {self.n_ctx}"
            )
        return self._stream(ids, max_tokens, sampler, StopFilter(stops), self._use_cache())

    def _prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        tok = self.tokenizer
        if not isinstance(prompt, str):
            if chat:
                raise ValueError("chat=True needs a text prompt, not token ids")
            return self._token_ids(prompt, "prompt")
        add_bos = tok.add_bos
        if chat:
            try:
                prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
            except ValueError as e:
                raise ValueError(f"{self.path}: {e}") from e
            # Templates that write the bos token themselves would otherwise get a second one.
            if tok.bos_id is not None and prompt.startswith(tok.token(tok.bos_id)):
                add_bos = False
        ids = tok.encode(prompt, add_bos=add_bos)
        bad = [i for i in ids if i >= self.n_vocab]
        if bad:  # the file has more tokenizer.ggml.tokens than embedding rows
            raise ValueError(
                f"{self.path}: the prompt encodes to token ids {bad[:5]} outside the model's {self.n_vocab} "
                f"embedding rows (tokenizer.ggml.tokens has {tok.n_vocab} entries)"
            )
        return ids

    def _stream(self, ids: list[int], max_tokens: int, sampler: Sampler, stops: StopFilter, user: int) -> Iterator[str]:
        self._check_cache(user)
        eot = self.tokenizer.eot_ids
        decoder = IncrementalDecoder(self.tokenizer)
        context = list(ids)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        self._native.truncate(0)
        t = time.perf_counter()
        self._native.eval(ids, self._logits.data_ptr(), False)
        token = sampler(self._logits, context[-REPETITION_WINDOW:])
        stats.prompt_seconds = time.perf_counter() - t
        generated = 1
        while True:
            if token in eot:
                stats.finish_reason = "eos"
                break
            context.append(token)
            piece = stops.push(decoder.add(token))
            if piece:
                yield piece
            if stops.hit:
                stats.finish_reason = "stop"
                return
            if generated == max_tokens or self.n_past >= self.n_ctx:
                stats.finish_reason = "length" if generated == max_tokens else "context"
                break
            self._check_cache(user)  # the reader may have used the engine since the last piece
            t = time.perf_counter()
            self._native.eval([token], self._logits.data_ptr(), False)
            token = sampler(self._logits, context[-REPETITION_WINDOW:])
            stats.decode_seconds += time.perf_counter() - t
            stats.decode_tokens += 1
            generated += 1
        # An unfinished character at the end, and text held back for a stop string that never came.
        piece = stops.push(decoder.flush())
        if stops.hit:
            stats.finish_reason = "stop"
        else:
            piece += stops.flush()
        if piece:
            yield piece


def _integer(value: object) -> int | None:
    """``value`` as an int when it is an integer of any kind (``__index__``) but a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class StopFilter:
    """Filters streamed text for stop strings: passes text through, holding back the longest tail that is the
    start of a stop string, and cuts the text before the first stop string found (:attr:`hit` then is True)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._longest = max(map(len, stops), default=0)
        self._pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add ``text``; return what can be given out now (nothing once a stop string was found)."""
        if self.hit:
            return ""
        if not self._stops:
            return text
        self._pending += text
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if found:
            self.hit = True
            out, self._pending = self._pending[: min(found)], ""
            return out
        # No stop string starts in text already given out: each would have been held back while it could.
        keep = next(
            (
                k
                for k in range(min(len(self._pending), self._longest - 1), 0, -1)
                if any(s.startswith(self._pending[-k:]) for s in self._stops)
            ),
            0,
        )
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The text held back, at the end of the stream."""
        out, self._pending = self._pending, ""
        return out
