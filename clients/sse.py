"""Server-sent events, parsed incrementally from a response's lines as they arrive (never read-all-then-split).

Follows the WHATWG event-stream rules that matter for OpenAI-style streams: `data:` lines accumulate (joined by
newlines) until a blank line dispatches the event; `event:` and `id:` set its type and id; lines starting with ':'
are comments (keep-alives); a single space after the colon is dropped. An event cut off by the end of the stream
(no blank line after it) is discarded, as the spec says, so a truncated stream never yields half a JSON object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"  # OpenAI's end-of-stream sentinel


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None

    @property
    def is_done(self) -> bool:
        return self.data == DONE

    def json(self) -> Any:
        return json.loads(self.data)


class SSEDecoder:
    """Feed it one line at a time (without its line ending); it returns an event when a blank line completes one."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events from an iterable of lines, e.g. `httpx.Response.iter_lines()`."""
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event


async def aiter_sse(lines: AsyncIterable[str]) -> AsyncIterator[SSEEvent]:
    """Events from an async iterable of lines, e.g. `httpx.Response.aiter_lines()`."""
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event
