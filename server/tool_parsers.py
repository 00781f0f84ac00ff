"""Tool-call parsers: turn a model's generated text into OpenAI tool calls.

`--tool-call-parser NAME` picks one of TOOL_PARSERS for `tool_choice: "auto"`; REQUIRED_PARSER reads the JSON array that
constrained decoding forces for `tool_choice: "required"`. The formats:

- hermes (Qwen2.5/Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them,
  anywhere in the text, with optional whitespace around the JSON. A last `<tool_call>` that is never closed still counts
  when everything after it is one valid call object (models often stop right after the closing brace).
- llama3_json: the whole output, after whitespace and an optional `<|python_tag|>`, is one call object or several
  separated by `;` (whitespace around allowed, no trailing `;`). Otherwise the whole output is content.
- mistral: `[TOOL_CALLS]` followed by a JSON array of call objects (older models), or `[TOOL_CALLS]name[ARGS]{...}`
  (newer models, the marker repeated for each call). Text before, between and after is content.
- required: the whole output is a JSON array of at least one call object; otherwise it is all content.

A call object is a JSON object with a non-empty string "name" and its arguments under "arguments" (or, when that key is
absent, "parameters"): a JSON object, re-serialized with json.dumps(ensure_ascii=False); absent, meaning {}; or a string
holding a JSON object, kept as written. NaN and Infinity are not JSON here, as in requests.

Content rule: content is every character outside the valid calls, in order and verbatim; a marker or call that does not
parse stays in it, tags included. extract() then turns content that is empty or whitespace only into None. What is
left as content when a call is not valid: hermes, the text from `<tool_call>` through the next `</tool_call>` (or the
end of the output); mistral, the marker and the JSON value after it (or the rest of the output if that value never
closes), or the marker alone when no JSON value follows it. For llama3_json the whitespace and `<|python_tag|>` before
the calls are syntax, not content.

Streaming: extract() and the streamers run the same code, a per-format `_advance` that decides how much of the front of
the buffered output is content or a call, and never decides anything that more text could change; so any split of the
output gives extract()'s result. Content goes out at once, except a suffix that could begin a marker. A hermes or mistral
call goes out when its closing tag or the end of its JSON has arrived, as a first delta (index, id, name, arguments "")
and one delta with all of its arguments. A llama3_json or required output is calls or content as a whole, so a complete
call there can still turn into content: those calls go out at finish(), and that text is held until it cannot be calls.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

_ID_ALPHABET = string.ascii_letters + string.digits


def make_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of the arguments object


@dataclass
class ToolCallDelta:
    """One streamed piece of a call. id and name are set on the first delta of a call only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_json(self) -> dict:
        function = {"arguments": self.arguments} if self.name is None else {"name": self.name, "arguments": self.arguments}
        head = {"index": self.index} if self.id is None else {"index": self.index, "id": self.id, "type": "function"}
        return {**head, "function": function}


@dataclass
class ExtractedToolCalls:
    content: str | None
    calls: list[ToolCall]


class _Call(NamedTuple):
    """A parsed call; its id is made only when it is sent."""

    name: str
    arguments: str


_JSON_WS = re.compile(r"[ \t\r\n]*")
# A JSON string (group 1 is its closing quote: None while the string is still open) or a bracket.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[{}\[\]]', re.DOTALL)


def _skip_ws(text: str, pos: int) -> int:
    return _JSON_WS.match(text, pos).end()


def _json_end(text: str, start: int) -> int | None:
    """End of the JSON object or array opening at text[start], found by counting brackets outside strings; None while
    it is not closed. Whether it parses is left to json."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text, start):
        char = token.group()[0]
        if char == '"':
            if token.group(1) is None:
                return None
        elif char in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _loads(text: str):
    """The decoded JSON value, or None when text is not JSON (null is no use to any caller either)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json's recursive decoder goes
        return None


def _call_from(obj) -> _Call | None:
    """The call a decoded JSON value describes, or None when it is not a valid call object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # already JSON text, as OpenAI sends arguments: kept as written
        return _Call(obj["name"], args) if isinstance(_loads(args), dict) else None
    return _Call(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _parse_call(text: str) -> _Call | None:
    return _call_from(_loads(text))


def _array_calls(text: str) -> list[_Call] | None:
    """The calls of a JSON array of call objects; None unless it is one, with at least one call."""
    items = _loads(text)
    calls = [_call_from(item) for item in items] if isinstance(items, list) else []
    return calls if calls and all(calls) else None


def _text_before(buf: str, marker: str, final: bool) -> tuple[int, list[str | _Call]] | None:
    """The content at the front of buf up to marker. With no marker in sight that is all of buf, except (unless the
    output has ended) a suffix that may be the marker's beginning. None when there is none yet."""
    end = buf.find(marker)
    if end < 0:
        end = len(buf)
        if not final:
            end -= next((size for size in range(min(len(buf), len(marker) - 1), 0, -1)
                         if buf.endswith(marker[:size])), 0)
    return (end, [buf[:end]]) if end else None


class ToolCallStreamer(ABC):
    """Streaming state of one choice: feed() the output as it is generated, then finish()."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """A new piece of the output -> (content to send now, tool-call deltas to send now)."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output has ended: flush whatever was held back."""


class _Streamer(ToolCallStreamer):
    """Buffers the output and lets _advance cut decided pieces off its front."""

    def __init__(self) -> None:
        self._buf = ""
        self._sent_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        return self._emit(self._take(text, final=False)) if text else ("", [])

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._emit(self._take("", final=True))

    def _take(self, text: str, final: bool) -> list[str | _Call]:
        self._buf += text
        segments: list[str | _Call] = []
        while self._buf and (step := self._advance(self._buf, final)) is not None:
            used, decided = step
            self._buf = self._buf[used:]
            segments += decided
        return segments

    def _emit(self, segments: list[str | _Call]) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = [], []
        for segment in segments:
            if isinstance(segment, str):
                content.append(segment)
                continue
            deltas += [ToolCallDelta(self._sent_calls, make_tool_call_id(), segment.name),
                       ToolCallDelta(self._sent_calls, arguments=segment.arguments)]
            self._sent_calls += 1
        return "".join(content), deltas

    @abstractmethod
    def _advance(self, buf: str, final: bool) -> tuple[int, list[str | _Call]] | None:
        """How many characters at the front of buf are decided, and what they are (content strings and calls); None
        when that needs more text. When final (the output has ended) it always decides at least one character."""


class _HermesStreamer(_Streamer):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._in_bad_call = False  # inside a <tool_call> known to hold no valid call: content through </tool_call>

    def _advance(self, buf, final):
        if self._in_bad_call:
            if buf.startswith(self.CLOSE):
                self._in_bad_call = False
                return len(self.CLOSE), [self.CLOSE]
            return _text_before(buf, self.CLOSE, final)
        if not buf.startswith(self.OPEN):
            return _text_before(buf, self.OPEN, final)
        start = _skip_ws(buf, len(self.OPEN))
        if start == len(buf) and not final:
            return None
        if buf.startswith("{", start):
            end = _json_end(buf, start)
            if end is None and not final:
                return None
            if end is not None:
                after = _skip_ws(buf, end)
                if buf.startswith(self.CLOSE, after):
                    used = after + len(self.CLOSE)
                    return used, [_parse_call(buf[start:end]) or buf[:used]]
                if not final and self.CLOSE.startswith(buf[after:]):
                    return None
        if final and self.CLOSE not in buf:  # the output ended inside this call: valid if all the rest is one call
            return len(buf), [_parse_call(buf[len(self.OPEN):]) or buf]
        # Not a call. Before the end this is decided only when what follows the tag is not a JSON object, or is one
        # followed by neither whitespace nor </tool_call>: then the rest cannot be one call object either, so the
        # unclosed-call rule above could never apply and the content can stream.
        self._in_bad_call = True
        return len(self.OPEN), [self.OPEN]


class _MistralStreamer(_Streamer):
    MARKER = "[TOOL_CALLS]"
    _NAMED = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\][ \t\r\n]*")  # the newer form, up to its arguments
    _NAME = re.compile(r"[A-Za-z0-9_.-]*")

    def _advance(self, buf, final):
        if not buf.startswith(self.MARKER):
            return _text_before(buf, self.MARKER, final)
        start = _skip_ws(buf, len(self.MARKER))
        named = self._NAMED.match(buf, start)
        value = named.end() if named else start
        if buf.startswith("{" if named else "[", value):
            end = _json_end(buf, value)
            if end is None:
                return (len(buf), [buf]) if final else None
            if named:
                call = _call_from({"name": named.group(1), "arguments": _loads(buf[value:end])})
                calls = [call] if call else None
            else:
                calls = _array_calls(buf[value:end])
            return end, calls or [buf[:end]]
        # Not a call yet: the name, [ARGS] or the JSON value may still be on its way.
        waiting = value == len(buf) if named else "[ARGS]".startswith(buf[self._NAME.match(buf, start).end():])
        if waiting and not final:
            return None
        return len(self.MARKER), [self.MARKER]  # no call follows the marker: it is plain text


class _WholeOutputStreamer(_Streamer):
    """For formats whose output is either all calls or all content: hold it until it ends or can no longer be calls."""

    def __init__(self) -> None:
        super().__init__()
        self._is_content = False

    def _advance(self, buf, final):
        if not self._is_content:
            calls = self._calls(buf, final)
            if calls is not None:
                return (len(buf), calls) if final else None
            self._is_content = True
        return len(buf), [buf]

    @abstractmethod
    def _calls(self, buf: str, final: bool) -> list[_Call] | None:
        """None when buf (the whole output so far) is not, and unless final can never become, this format's calls;
        else the calls found so far, which when final are all of them (at least one)."""


class _Llama3JsonStreamer(_WholeOutputStreamer):
    PYTHON_TAG = "<|python_tag|>"

    def _calls(self, buf, final):
        pos = _skip_ws(buf, 0)
        if buf.startswith(self.PYTHON_TAG, pos):
            pos = _skip_ws(buf, pos + len(self.PYTHON_TAG))
        elif not final and self.PYTHON_TAG.startswith(buf[pos:]):
            return []  # only whitespace so far, or what may be the tag
        calls = []
        while True:  # a call object, then `;` and the next one, to the end of the output
            if not buf.startswith("{", pos):
                return calls if pos == len(buf) and not final else None
            end = _json_end(buf, pos)
            if end is None:
                return None if final else calls
            call = _parse_call(buf[pos:end])
            if call is None:
                return None
            calls.append(call)
            pos = _skip_ws(buf, end)
            if pos == len(buf):
                return calls
            if buf[pos] != ";":
                return None
            pos = _skip_ws(buf, pos + 1)


class _RequiredStreamer(_WholeOutputStreamer):
    def _calls(self, buf, final):
        start = _skip_ws(buf, 0)
        if not buf.startswith("[", start):
            return [] if start == len(buf) and not final else None
        end = _json_end(buf, start)
        if end is None:
            return None if final else []
        return _array_calls(buf[start:end]) if _skip_ws(buf, end) == len(buf) else None


class ToolParser(ABC):
    """Stateless: extract() a whole output, or make a streamer() per choice."""

    name: ClassVar[str]
    _streamer: ClassVar[type[_Streamer]]

    def streamer(self) -> ToolCallStreamer:
        return self._streamer()

    def extract(self, text: str) -> ExtractedToolCalls:
        segments = self._streamer()._take(text, final=True)
        content = "".join(segment for segment in segments if isinstance(segment, str))
        calls = [ToolCall(make_tool_call_id(), s.name, s.arguments) for s in segments if isinstance(s, _Call)]
        return ExtractedToolCalls(content if content.strip() else None, calls)


class HermesToolParser(ToolParser):
    name = "hermes"
    _streamer = _HermesStreamer


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    _streamer = _Llama3JsonStreamer


class MistralToolParser(ToolParser):
    name = "mistral"
    _streamer = _MistralStreamer


class RequiredToolParser(ToolParser):
    """tool_choice "required": the output is forced to `[{"name": ..., "parameters": {...}}, ...]`."""

    name = "required"
    _streamer = _RequiredStreamer


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
REQUIRED_PARSER: ToolParser = RequiredToolParser()


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known parsers: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
