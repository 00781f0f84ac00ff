"""uvicorn's h11 HTTP/1.1 protocol, with requests it cannot parse answered in OpenAI's error shape.

uvicorn answers every request h11 refuses with a plain-text 400, whatever h11's reason: a request head that grows past
the size limit while it arrives in pieces (the usual case on a real network) gets "Invalid HTTP request received."
instead of a 431. Here the error carries h11's status hint (431 for an over-long head, else 400) and the same JSON
body as every other error, so clients and our SDK can read it.

The protocol is also pinned to h11 on purpose: with httptools installed, uvicorn's "auto" would switch parsers, and the
head-size limit (h11_max_incomplete_event_size) applies to h11 only.

It also bounds connections that send no request (issue 24, finding 1): uvicorn closes an idle keep-alive connection
only until its first byte arrives, and a new connection never. Here every connection must deliver a complete request
head within `head_timeout_s` of opening or of its previous response, or it is closed; and past `max_connections`
open connections a new one is closed at once, before it can hold a file descriptor for long.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class JsonErrorH11Protocol(H11Protocol):
    # Set per server by `protocol_class` (uvicorn builds the protocol itself, from the class alone).
    head_timeout_s: float | None = None
    max_connections: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parse_error_status = 400
        self._head_timer: asyncio.TimerHandle | None = None
        next_event = self.conn.next_event

        def next_event_keeping_the_status_hint():
            try:
                event = next_event()
            except h11.RemoteProtocolError as exc:
                self._parse_error_status = exc.error_status_hint
                raise
            if isinstance(event, h11.Request):  # a whole head arrived in time
                self._stop_head_timer()
            return event

        # NOTE: the same h11.Connection serves every request of a keep-alive connection (start_next_cycle), so
        # wrapping it once here covers them all.
        self.conn.next_event = next_event_keeping_the_status_hint

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.close()  # connection_lost forgets it
            return
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # The next request's head, on a kept-alive connection. Started first: uvicorn may go on to a pipelined
        # request at once, whose head then stops the timer.
        self._start_head_timer()
        super().on_response_complete()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        if self.head_timeout_s is not None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # called by uvicorn for any h11 parse error
        status = 431 if self._parse_error_status == 431 else 400
        if status == 431:
            limit = self.config.h11_max_incomplete_event_size
            message = f"the request head (path and headers) is larger than the limit of {limit} bytes"
        else:
            message = "the request is not valid HTTP/1.1"
        body = json.dumps(error_body(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=_REASONS[status]), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol_class(head_timeout_s: float | None, max_connections: int | None) -> type[JsonErrorH11Protocol]:
    """The protocol with this server's connection limits (a subclass: uvicorn takes a class, not an instance)."""
    return type("LimitedJsonErrorH11Protocol", (JsonErrorH11Protocol,),
                {"head_timeout_s": head_timeout_s, "max_connections": max_connections})
