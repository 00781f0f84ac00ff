"""A lower bound on how many tokens a text encodes to, found without encoding it.

Why: refusing a prompt longer than the context should not cost time and memory in proportion to its size. A 400 KB
prompt takes about a second to tokenize; its length in characters tells sooner that it cannot fit.

The bound holds for BPE tokenizers that cover every character of the (normalized) text with some token: byte-level
ones (GPT-2, Llama 3, Qwen, Mistral's tekken: every byte is in the vocabulary) and those with byte fallback
(SentencePiece-style, Llama 2), provided no pre-tokenizer removes text (whitespace splitters do, as does a Split that
removes its matches). Then each token covers at most as many characters of the pre-tokenized text as its own
vocabulary string has (a byte-level string has one character per byte it stands for; `▁` stands for the one space it
replaced; `<0xE4>` for part of one character), and the pre-tokenized text has at least as many characters as the
normalized one. So a text needs at least len(normalize(text)) / longest vocabulary string tokens. Other tokenizers
(WordPiece's [UNK] stands for a whole word of any length; a BPE without byte fallback may drop what it cannot spell)
get no bound: their prompts are tokenized in full.
"""

from __future__ import annotations

import json

import tokenizers

# Pre-tokenizers that keep every character (they only split, or map characters one to one).
_KEEPS_TEXT = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split", "Sequence"})


def max_chars_per_token(backend: tokenizers.Tokenizer) -> int | None:
    """The most characters of pre-tokenized text one token can stand for, or None when no bound holds (above)."""
    model = backend.model
    if type(model).__name__ != "BPE":
        return None
    kinds = _pre_tokenizer_kinds(json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else None)
    if any(kind not in _KEEPS_TEXT or behavior == "Removed" for kind, behavior in kinds):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    # Every byte must be spellable: by the 256 byte-level characters, or by the 256 <0xNN> fallback tokens.
    byte_level = any(kind == "ByteLevel" for kind, _ in kinds) and \
        all(ch in vocab for ch in tokenizers.pre_tokenizers.ByteLevel.alphabet())
    fallback = getattr(model, "byte_fallback", False) and all(f"<0x{b:02X}>" in vocab for b in range(256))
    if not (byte_level or fallback):
        return None
    return max(len(token) for token in vocab)


def _pre_tokenizer_kinds(config: dict | None) -> list[tuple[str, str | None]]:
    """(type, Split behavior) of every pre-tokenizer in a (possibly nested) pre-tokenizer config."""
    if config is None:
        return []
    if config.get("type") == "Sequence":
        return [kind for child in config.get("pretokenizers", []) for kind in _pre_tokenizer_kinds(child)]
    return [(config.get("type", ""), config.get("behavior"))]


def min_tokens(backend: tokenizers.Tokenizer, chars_per_token: int | None, text: str) -> int:
    """At least how many tokens `text` encodes to (special tokens the post-processor adds not counted); 0 when
    chars_per_token is None. Costs one pass of the normalizer over the text."""
    if chars_per_token is None or not text:
        return 0
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    return -(-len(normalized) // chars_per_token)
