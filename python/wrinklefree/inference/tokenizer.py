"""The tokenizer stored in a GGUF file (``tokenizer.ggml.model == "gpt2"``: byte-level BPE), rebuilt with the
Hugging Face ``tokenizers`` library, plus the incremental detokenizer used for streaming and the chat template.

llama.cpp reads a gpt2 vocabulary without ``tokenizer.ggml.pre`` with the GPT-2 pre-tokenizer regex, which is what
``pre_tokenizers.ByteLevel`` applies, so both engines split text into the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn in the chat formats of common model families (the list llama.cpp matches to
# find end-of-generation tokens); generation stops at any of them found in the vocabulary, as well as at eos.
EOT_TOKENS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
)


class GGUFTokenizer:
    """Encode and decode text with the vocabulary and merges of a GGUF file.

    Built from the file's metadata dict (``tokenizer.ggml.*`` keys, ``tokenizer.chat_template``). Control (type 3)
    and user-defined (type 4) tokens are registered as added tokens, so text such as ``<|im_start|>`` in a prompt
    becomes that one token, as in llama.cpp. Decoding leaves out unused tokens (type 5, e.g. the ``[PADn]`` rows
    the exporter writes past the tokenizer) and, unless asked, control tokens.

    Attributes:
        n_vocab: number of tokens.
        bos_id, eos_id: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``, or None when absent.
        add_bos: ``tokenizer.ggml.add_bos_token`` (default True): whether prompts start with bos.
        eot_ids: ids at which generation stops: eos, ``tokenizer.ggml.eot_token_id`` and the control tokens of
            :data:`EOT_TOKENS` present in the vocabulary.
        chat_template: the Jinja chat template, or None.

    Raises:
        ValueError: a ``tokenizer.ggml.*`` value of the wrong type or out of range (token ids must be integers in
            [0, n_vocab)), or merges that do not fit the tokens; the message names the key.
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported tokenizer: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        tokens = _array(metadata, "tokenizer.ggml.tokens", str, "strings")
        if not tokens:  # absent or empty
            raise ValueError("tokenizer.ggml.tokens must be a non-empty array of strings (the vocabulary)")
        types = _array(metadata, "tokenizer.ggml.token_type", int, "integers")
        if types is None:
            types = [NORMAL] * len(tokens)
        elif len(types) != len(tokens):
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokenizer.ggml.tokens"
            )
        # A token string that occurs twice maps to its last id, as in llama.cpp's token-to-id map.
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges_text = _array(metadata, "tokenizer.ggml.merges", str, "strings") or []
        merges = _merges(merges_text, vocab)

        try:
            self._tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            _check_merges(merges_text, vocab)  # names the merge at fault, if one is
            raise ValueError(f"tokenizer.ggml.tokens / tokenizer.ggml.merges do not form a BPE tokenizer: {e}") from e
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._tok.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
        )
        self._tok.add_tokens(
            [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
        )

        self.n_vocab = len(tokens)
        control = frozenset(i for i, t in enumerate(types) if t == CONTROL)
        self._unused = frozenset(i for i, t in enumerate(types) if t == UNUSED)
        self._unused_or_control = self._unused | control
        self.bos_id = self._token_id(metadata, "tokenizer.ggml.bos_token_id")
        self.eos_id = self._token_id(metadata, "tokenizer.ggml.eos_token_id")
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise ValueError(f"tokenizer.ggml.add_bos_token must be a bool, got {add_bos!r}")
        self.add_bos = add_bos
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"tokenizer.chat_template must be a string, got {type(template).__name__}")
        self.chat_template: str | None = template or None
        eot = {self.eos_id, self._token_id(metadata, "tokenizer.ggml.eot_token_id")}
        eot.update(vocab[t] for t in EOT_TOKENS if t in vocab and vocab[t] in control)
        self.eot_ids = frozenset(i for i in eot if i is not None)

    def _token_id(self, metadata: Mapping[str, Any], key: str) -> int | None:
        """The token id under ``key``, checked to be an integer in [0, n_vocab), or None when absent."""
        value = metadata.get(key)
        if value is not None and (type(value) is not int or not 0 <= value < self.n_vocab):  # a bool is no id
            raise ValueError(f"{key} must be a token id, an integer in [0, {self.n_vocab}), got {value!r}")
        return value

    def token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id`` (byte-level form: a space is ``Ġ``)."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with bos first when ``add_bos`` and the file has a bos token."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_control: bool = True) -> str:
        """Text of ``ids``. Bytes that do not form complete UTF-8 decode to U+FFFD.

        Control tokens (bos, eos, chat markers) are left out unless ``skip_control`` is False; unused tokens
        always are (they are padding rows, not text).
        """
        hidden = self._unused_or_control if skip_control else self._unused
        return self._tok.decode([i for i in ids if i not in hidden], skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the file's chat template, followed by the
        prompt of the assistant's turn (``add_generation_prompt=True``), the way transformers renders it.

        Raises:
            ValueError: the file has no ``tokenizer.chat_template``, or the template is malformed or fails on
                ``messages`` (its own ``raise_exception`` included).
        """
        if self.chat_template is None:
            raise ValueError("the model file has no chat template (tokenizer.chat_template); prompt it without chat")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self._special_text(self.bos_id),
                eos_token=self._special_text(self.eos_id),
            )
        except Exception as e:  # the template is data from the file: any failure of it is the file's
            raise ValueError(f"tokenizer.chat_template: {type(e).__name__}: {e}") from e

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token(token_id)


def _array(metadata: Mapping[str, Any], key: str, kind: type, kind_name: str) -> list | None:
    """The array under ``key``, checked to hold only ``kind`` (bools are not integers), or None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise ValueError(f"{key} must be an array of {kind_name}")
    return list(value)


def _merges(merges: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as pairs. A merge whose concatenation is no token makes the tokenizers library
    panic (a Rust backtrace on stderr rather than an exception), so that is checked here, in one pass."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if not all(len(p) == 2 and p[0] + p[1] in vocab for p in pairs):
        _check_merges(merges, vocab)
    return pairs


def _check_merges(merges: list[str], vocab: Mapping[str, int]) -> None:
    """Raise a ValueError naming the first merge that is not two tokens whose concatenation is a token."""
    for i, merge in enumerate(merges):
        pair = merge.split(" ", 1)
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"tokenizer.ggml.merges[{i}] must be two tokens separated by a space, got {merge!r}")
        missing = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer.ggml.merges[{i}] {merge!r} names {missing[0]!r}, which is not in tokenizer.ggml.tokens"
            )


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that are always complete UTF-8.

    A character may span several byte-level tokens, so each piece is found by decoding the whole sequence so far
    and taking what follows the text already given out; a trailing U+FFFD (an unfinished character) is held back
    until the tokens that complete it arrive, or until :meth:`flush`.
    """

    def __init__(self, tokenizer: GGUFTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text given out so far

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly empty)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids).rstrip("\ufffd")
        piece = text[self._emitted :]
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """The text held back (an unfinished character, as U+FFFD) at the end of the stream."""
        piece = self._tokenizer.decode(self._ids)[self._emitted :]
        self._emitted += len(piece)
        return piece
