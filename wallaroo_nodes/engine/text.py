"""Text tokenizer (a `tokenizers` tokenizer.json) checked against the model's token table, and streaming."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

from tokenizers import Encoding, Tokenizer


class TokenizerError(ValueError):
    """tokenizer.json is missing, unreadable, or disagrees with the model config."""


def is_chinese(text: str) -> bool:
    """True when the text contains CJK ideographs (chooses the Chinese prompt templates)."""
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)


def language_of(text: str) -> str:
    """'zh' for text with Chinese characters, else 'en'."""
    return "zh" if is_chinese(text) else "en"


class TextTokenizer:
    """Encodes prompts (special tokens written as text are recognised) and decodes answers."""

    def __init__(self, path: str | Path, tokens: dict[str, int]):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc})") from None
        self.path = path
        for name, expected in tokens.items():
            got = self.tokenizer.token_to_id(name)
            if got != expected:
                raise TokenizerError(
                    f"{path}: token {name!r} has id {got} in the tokenizer but {expected} in config.json; "
                    "the tokenizer and the weights come from different models")
        self.special_ids = frozenset(tokens.values())
        # Training encodes the same prompt twice (its ids, then its offsets) and the same phrases over and over.
        self._encoding = functools.lru_cache(maxsize=4096)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> Encoding:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encoding(self, text: str) -> Encoding:
        """The `tokenizers` Encoding of text (ids and character offsets), special-token text recognised; cached,
        so treat it as read-only."""
        return self._encoding(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token text such as '<|im_start|>' becomes its single id."""
        return self.encoding(text).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ids, without the model's special tokens unless asked."""
        ids = list(ids)
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, ids: Iterable[int]) -> list[str]:
        """Each id's token string (for tests and debugging)."""
        return [self.tokenizer.id_to_token(i) for i in ids]


class StreamDecoder:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 (a Chinese character can
    span several byte-level tokens)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta

    def flush(self) -> str:
        """Whatever is left at the end of the stream."""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
