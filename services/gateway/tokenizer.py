"""Tokenizers of the OpenAI-compatible gateway: text ⇄ token ids, and chat messages → prompt text.

The router and the engines take token ids only, so the gateway tokenizes prompts and detokenizes outputs.

* :class:`SimpleTokenizer` (``--tokenizer simple``, the default) for **simulated engines**: deterministic, no
  model files. Each word and each punctuation mark of a prompt becomes one token whose id is
  ``crc32(piece) % vocab_size`` (stable across processes and runs). Simulated engines draw their output ids
  at random (they have no weights), so decoding renders one **placeholder word** per id from a fixed word
  list: the text of a simulated completion is readable but meaningless.
* :class:`HFTokenizer` (``--tokenizer DIR``) for **real vLLM engines**: the Hugging Face tokenizer of the served
  model directory (``transformers.AutoTokenizer``, imported only when used), with its chat template. A model
  directory without tokenizer files (``chiron tiny-model``) gets the simple tokenizer over its vocabulary.

Token ids must stay below the engine's vocabulary size (engines refuse others with INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

# The smallest vocabulary among the simulated models (llama-2-70b: 32,000; llama-3-8b: 128,256), so that the
# simple tokenizer's ids are valid on every simulated engine.
DEFAULT_SIMPLE_VOCAB = 32_000

_PIECE = re.compile(r"\w+|[^\w\s]")
# Placeholder words for the ids a simulated engine generates (id mod the list's length).
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no what up out who them some more time "
    "can could into only other new about then also than its two like first any these may way most over after "
    "did made many before must through back years where much your well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go came "
    "right used take three"
).split()


class Tokenizer(Protocol):
    """What the gateway needs of a tokenizer. ``vocab_size``: ids are in ``[0, vocab_size)``."""

    vocab_size: int

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the model's begin-of-sequence token when ``add_special_tokens``)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Prompt text for chat ``messages`` (``{"role", "content"}``), ending where the assistant's reply starts."""
        ...


def _role_template(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


class SimpleTokenizer:
    """See the module docstring. ``vocab_size``: ids are ``crc32(piece) % vocab_size``. Raises ValueError for a
    vocabulary smaller than 2 ids."""

    def __init__(self, vocab_size: int = DEFAULT_SIMPLE_VOCAB) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [zlib.crc32(p.encode()) % self.vocab_size for p in _PIECE.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(_WORDS[i % len(_WORDS)] for i in ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return _role_template(messages)


class HFTokenizer:
    """The Hugging Face tokenizer of a model directory (``tokenizer.json`` / ``tokenizer_config.json``), with
    its chat template (a plain ``<|role|>`` format when the model has none). Raises RuntimeError when
    ``transformers`` is not installed or the directory holds no tokenizer."""

    def __init__(self, model_dir: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise RuntimeError("--tokenizer DIR needs the transformers package: pip install transformers") from e
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"no Hugging Face tokenizer in {model_dir} ({e}); use --tokenizer simple for "
                               f"simulated engines or a model directory with tokenizer files") from e
        self.vocab_size = len(self._tok)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        if not getattr(self._tok, "chat_template", None):
            return _role_template(messages)
        return self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(spec: str, vocab_size: int = DEFAULT_SIMPLE_VOCAB) -> Tokenizer:
    """``"simple"`` → :class:`SimpleTokenizer` over ``vocab_size`` ids. A model directory → its
    :class:`HFTokenizer`; a model directory without tokenizer files (``chiron tiny-model``, random weights) →
    :class:`SimpleTokenizer` over the model's ``vocab_size`` from its ``config.json``. Raises RuntimeError (not a
    directory, no tokenizer and no vocabulary size, as :class:`HFTokenizer`) or ValueError (bad ``vocab_size``)."""
    if spec == "simple":
        return SimpleTokenizer(vocab_size)
    d = Path(spec)
    if not d.is_dir():
        raise RuntimeError(f"--tokenizer {spec!r}: not 'simple' and not a directory")
    if any((d / f).exists() for f in _TOKENIZER_FILES):
        return HFTokenizer(d)
    try:
        return SimpleTokenizer(int(json.loads((d / "config.json").read_text())["vocab_size"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"--tokenizer {spec}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) and no vocab_size "
                           f"in config.json ({e})") from None


class Detokenizer:
    """Incremental decoding of a token stream: :meth:`step` returns the text the new ids add. It decodes a short
    window of recent ids rather than the whole output, and holds text back while it ends in an incomplete
    character (U+FFFD), so multi-token characters and word joins come out right (the scheme of Hugging Face
    text-generation-inference)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids up to here have been returned as text

    def step(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character is emitted as it is)."""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):] if len(text) > len(before) else ""
