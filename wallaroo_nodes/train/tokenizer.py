"""A small byte-level BPE for the shapes world, with the official model's special tokens in the same order."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..engine.config import ProtocolConfig
from ..engine.weights import QWEN_TOKENS, add_wallaroo_tokens
from ..shapes import corpus_lines


def training_texts(n_lines: int, seed: int, protocol: ProtocolConfig) -> list[str]:
    """Shapes-world texts plus the prompt templates and chat words the protocols add."""
    texts = list(corpus_lines(n_lines, seed))
    texts += [protocol.system_message, "system", "user", "assistant"] * 50
    for table in (protocol.generate_templates, protocol.edit_templates):
        for options in table.values():
            for t in options:
                for h, w in protocol.sizes:
                    texts += [t.format(prompt="", width=w, height=h)] * 20
    return texts


def train_byte_level_bpe(texts: list[str], vocab_size: int, out_path: str | Path, isolate_han: bool = False) -> Path:
    """A byte-level BPE trained on texts, with Qwen2.5-VL's special tokens appended after the learned vocabulary
    (as in the real tokenizer); deterministic. Wallaroo's tokens are added separately (`add_wallaroo_tokens`).

    `isolate_han` gives every Han character a token of its own instead of merging phrases.
    """
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if isolate_han:
        # A 4-layer LLM reads one token per Chinese character better than BPE's merged phrases: the Chinese
        # side of editing rose 0.54 -> 0.77 of 200 edits (thirty-third run, docs/tiny_model_runs.md).
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
                                                     byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(QWEN_TOKENS))
    tok.save(str(out_path))
    return Path(out_path)


def train_tokenizer(out_path: str | Path, protocol: ProtocolConfig, vocab_size: int = 1024, n_lines: int = 20000,
                    seed: int = 0) -> dict[str, int]:
    """Train the BPE, append Qwen's and Wallaroo's special tokens, save; return the token table."""
    out_path = train_byte_level_bpe(training_texts(n_lines, seed, protocol), vocab_size, out_path, isolate_han=True)
    sides = sorted({s for size in protocol.sizes for s in size})
    return add_wallaroo_tokens(out_path, out_path, indicator_sides=sides, indicator_format=protocol.indicator_format)
