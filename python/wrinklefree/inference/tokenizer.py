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
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported tokenizer: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
        if len(types) != len(tokens):
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokenizer.ggml.tokens"
            )
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]

        # A token string that occurs twice maps to its last id, as in llama.cpp's token-to-id map.
        vocab = {tok: i for i, tok in enumerate(tokens)}
        self._tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
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
        self.bos_id: int | None = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = metadata.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template") or None
        eot = {self.eos_id, metadata.get("tokenizer.ggml.eot_token_id")}
        eot.update(vocab[t] for t in EOT_TOKENS if t in vocab and vocab[t] in control)
        self.eot_ids = frozenset(i for i in eot if i is not None)

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
            ValueError: the file has no ``tokenizer.chat_template``.
        """
        if self.chat_template is None:
            raise ValueError("the model file has no chat template (tokenizer.chat_template); prompt it without chat")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
        )

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token(token_id)


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
