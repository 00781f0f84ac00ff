"""Incremental detokenization: token ids in, text deltas out, with stop strings.

Exactness contract: the deltas of one sequence concatenate to exactly `tokenizer.decode(output_ids)` (truncated at
a matched stop string), every delta is clean text, and no delta holds any part of a stop string.

Why a plain "decode the new token" does not work, and what this module does about each reason:
- A character can be split across tokens (byte-level BPE bytes, `<0xNN>` byte-fallback tokens). Text whose decode
  ends in U+FFFD is held until the character completes (or until flush, which releases what decode gives).
- The ByteFallback decoder turns a whole run of byte tokens into U+FFFD, one per byte, if any byte of the run is
  invalid, so an already-complete character in a run can still change. Text from a run that is still open (its last
  visible token is a byte token) is held until a non-byte token closes it.
- Decoders treat the first token specially (Metaspace drops its `▁`, Strip removes a leading space, WordPiece keeps
  its `##`). So each step decodes a small window: a context of already-emitted tokens plus the new ones, and emits
  the window text past the context's own text. The context must decode to non-empty text, otherwise the first-token
  rule would land on a new token; when it would be empty, the window keeps its older start instead.
This keeps the per-step cost independent of the output length. For a decoder whose behaviour is not known (a
custom Python decoder, or a type newer than this module), the window always starts at token 0: a full decode per
step, still exact under the same holds.

No streaming can be exact for a decoder that rewrites already-decoded text when more tokens arrive: WordPiece with
cleanup=True (BERT-style "do n't" -> "don't"), or a Replace placed after Fuse whose pattern spans two tokens. No
generative model's tokenizer does either.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

# Decoder types whose output is a per-token map plus, at most, effects on the first token, a final strip, or UTF-8
# assembly of bytes; a window decode with a non-empty context reproduces them exactly.
_WINDOW_SAFE_DECODERS = frozenset(
    {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "BPEDecoder", "CTC", "WordPiece"}
)

# Token kinds, one byte per id. Ids past the table are not in the vocabulary; decode ignores them.
_NORMAL, _BYTE, _SPECIAL, _ABSENT = 0, 1, 2, 3


@dataclass(frozen=True)
class _DecodeInfo:
    kinds: bytes
    windowed: bool


_INFO: weakref.WeakKeyDictionary[Tokenizer, _DecodeInfo] = weakref.WeakKeyDictionary()


def _decoder_types(spec: dict) -> list[str]:
    if spec.get("type") == "Sequence":
        return [t for child in spec.get("decoders", []) for t in _decoder_types(child)]
    return [spec.get("type")]


def _decode_info(tokenizer: Tokenizer) -> _DecodeInfo:
    """Per-tokenizer tables, built once: the kind of every token id, and whether windowed decoding is exact."""
    info = _INFO.get(tokenizer)
    if info is not None:
        return info
    backend = tokenizer.backend
    if backend.decoder is None:
        types: list[str] | None = []  # tokens joined with spaces: per-token
    else:
        try:
            types = _decoder_types(json.loads(backend.decoder.__getstate__()))
        except Exception:  # noqa: BLE001 - a custom Python decoder cannot be serialized: its behaviour is unknown
            types = None
    windowed = types is not None and all(t in _WINDOW_SAFE_DECODERS for t in types)
    # Byte tokens matter only to a ByteFallback decoder; with an unknown decoder, assume one (holding is safe).
    byte_tokens = not windowed or "ByteFallback" in types
    special = tokenizer.all_special_ids
    kinds = bytearray([_ABSENT]) * tokenizer.vocab_size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id in special:
            kinds[token_id] = _SPECIAL
        elif byte_tokens and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            # The same test the ByteFallback decoder applies (it parses the two characters as hex; a looser test
            # only ever holds text a little longer).
            kinds[token_id] = _BYTE
        else:
            kinds[token_id] = _NORMAL
    info = _DecodeInfo(bytes(kinds), windowed)
    _INFO[tokenizer] = info
    return info


class IncrementalDetokenizer:
    """Turns one sequence's growing list of output token ids into text deltas."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ):
        info = _decode_info(tokenizer)
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._kinds = info.kinds
        self._windowed = info.windowed
        self._stops = list(stop or [])
        self._include_stop = include_stop_str_in_output
        # Every proper prefix of a stop string: a text tail equal to one of them may still grow into a match.
        self._stop_prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)

        self._ids: list[int] = []
        self._n = 0  # ids seen by the last step
        self._scanned = 0  # ids whose kinds were folded into _safe_end/_open_run
        self._safe_end = 0  # index just past the last visible non-byte token
        self._open_run = False  # a visible byte token follows _safe_end: its run may still grow
        self._start = 0  # window start: context tokens are ids[_start:_read]
        self._read = 0  # ids[:_read] have been turned into stable text
        self._context = ""  # decode(ids[_start:_read])
        self._pending = ""  # stable text held back because it may be the start of a stop string
        self._parts: list[str] = []
        self._text_cache = ""
        self._matched: str | None = None
        self._done = False

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if self._parts:
            self._text_cache += "".join(self._parts)
            self._parts.clear()
        return self._text_cache

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, found by step() or by flush(); None when none matched."""
        return self._matched

    def step(self, output_token_ids: list[int]) -> tuple[str, str | None]:
        """Call after each new token is appended to output_token_ids (all output ids so far). Returns the text
        that is safe to emit now, and the stop string that matched (the sequence must then finish) or None."""
        if self._done:
            return "", None
        self._ids = output_token_ids
        n = len(output_token_ids)
        self._scan(output_token_ids, n)
        end = self._safe_end if self._open_run else n
        self._n = n
        return self._emit(self._advance(end, final=False), final=False)

    def flush(self) -> str:
        """Call once when the sequence finished for a reason other than a stop string (eos, stop token, length,
        abort): returns the text held back so far. If that text completes a stop string, it is cut there and
        matched_stop says which."""
        if self._done:
            return ""
        delta, _ = self._emit(self._advance(self._n, final=True), final=True)
        self._done = True
        return delta

    def _scan(self, ids: list[int], n: int) -> None:
        kinds, skip = self._kinds, self._skip
        for i in range(self._scanned, n):
            token_id = ids[i]
            kind = kinds[token_id] if 0 <= token_id < len(kinds) else _ABSENT
            if kind == _NORMAL or (kind == _SPECIAL and not skip):
                self._safe_end, self._open_run = i + 1, False
            elif kind == _BYTE:
                self._open_run = True
            # Skipped special tokens and unknown ids are invisible to the decoder: a byte run continues across them.
        self._scanned = n

    def _advance(self, end: int, *, final: bool) -> str:
        """Stable text of ids[_read:end], or "" while it would end in an incomplete character."""
        if end <= self._read:
            return ""
        decode, ids = self._tokenizer.decode, self._ids
        window = decode(ids[self._start:end], self._skip)
        if not final and window.endswith("\ufffd"):
            return ""
        new = window[len(self._context):]
        if self._windowed:
            context = decode(ids[self._read:end], self._skip)
            if context:
                self._start, self._context = self._read, context
            else:
                self._context = window
        else:
            self._context = window
        self._read = end
        return new

    def _emit(self, new_text: str, *, final: bool) -> tuple[str, str | None]:
        pending = self._pending + new_text
        hold = 0
        if self._stops and pending:
            match = self._first_stop(pending)
            if match is not None:
                start, stop = match
                delta = pending[:start + len(stop) if self._include_stop else start]
                self._pending, self._matched, self._done = "", stop, True
                self._parts.append(delta)
                return delta, stop
            if not final:
                hold = self._stop_prefix_len(pending)
        delta = pending[:len(pending) - hold]
        self._pending = pending[len(pending) - hold:]
        if delta:
            self._parts.append(delta)
        return delta, None

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string whose match ends first in text (as if text arrived one character at a time); among
        matches ending at the same place, the longest. Returns (start index, stop string)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            i = text.find(stop)
            if i >= 0 and (best is None or (i + len(stop), i) < best[:2]):
                best = (i + len(stop), i, stop)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0
