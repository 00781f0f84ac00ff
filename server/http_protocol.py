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

And it deals with clients that stop reading (issue 24, finding 2). A connection whose transport has had writing
paused (its buffer over the high-water mark) for `write_timeout_s` on end is aborted, which cancels the response
through Starlette's disconnect handling: the handler aborts its engine requests and logs 499. Writes to a connection
that is closing or lost are dropped and mark the request disconnected (uvicorn then drops the rest), instead of
reaching asyncio, which warns "socket.send() raised exception." for each one past the fifth: a stream whose client
reset the connection while the server wrote out thousands of queued events logged one warning per event. And
`client_gone()` tells the request's handler whether its client has gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextvars import ContextVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body

logger = logging.getLogger("attnserve")
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}
# Set in each request's task by the protocol. A context variable rather than a scope entry because the response
# bodies that ask (server.generation.sse_response) are built without the request at hand.
_CLIENT_GONE: ContextVar[Callable[[], bool] | None] = ContextVar("attnserve_client_gone", default=None)


def client_gone() -> bool:
    """Whether the client of the request being handled has gone: its connection closing, lost, or its request marked
    disconnected. False where the app runs without this protocol (in-process ASGI tests): the client is there."""
    check = _CLIENT_GONE.get()
    return check is not None and check()


class JsonErrorH11Protocol(H11Protocol):
    # Set per server by `protocol_class` (uvicorn builds the protocol itself, from the class alone).
    head_timeout_s: float | None = None
    max_connections: int | None = None
    write_timeout_s: float | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parse_error_status = 400
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self.app = self._telling_whether_the_client_is_gone(self.app)
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
        super().connection_made(_DropWritesWhenGone(transport, self._mark_disconnected))
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.close()  # connection_lost forgets it
            return
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_write_timer()
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

    def _telling_whether_the_client_is_gone(self, app):
        async def app_with_client_gone(scope, receive, send):
            cycle = self.cycle  # this request's: the next one's cycle starts only after this response completed
            _CLIENT_GONE.set(lambda: self.transport.is_closing() or cycle.disconnected)
            await app(scope, receive, send)

        return app_with_client_gone

    def _mark_disconnected(self) -> None:
        """A write found the transport closing or lost: the request's client is gone. connection_lost does the same
        on the loop's next turn; until then a body iterating queued events without awaiting would write on."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            cycle.disconnected = True
            cycle.message_event.set()  # the app's receive() answers http.disconnect: Starlette cancels the body

    # Writing paused: the transport's buffer is over its high-water mark because the client does not read.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timeout_s is not None and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("closing the connection of %s: its response has waited %g s for it to read "
                    "(--stream-write-timeout)", client, self.write_timeout_s)
        # abort, not close: close waits for the unread buffer to drain, which is what never happens. That holds for a
        # connection already closing (a response with Connection: close, an idle one past its head timeout) too.
        self.transport.abort()

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


def protocol_class(head_timeout_s: float | None, max_connections: int | None,
                   write_timeout_s: float | None = None) -> type[JsonErrorH11Protocol]:
    """The protocol with this server's connection limits (a subclass: uvicorn takes a class, not an instance)."""
    return type("LimitedJsonErrorH11Protocol", (JsonErrorH11Protocol,),
                {"head_timeout_s": head_timeout_s, "max_connections": max_connections,
                 "write_timeout_s": write_timeout_s})


class _DropWritesWhenGone:
    """The connection's transport as uvicorn sees it, except that a write to a closing or lost connection is dropped
    and reported (`on_gone`) instead of reaching asyncio, which counts such writes and warns past the fifth."""

    def __init__(self, transport: asyncio.Transport, on_gone: Callable[[], None]):
        self._transport = transport
        self._on_gone = on_gone

    def write(self, data) -> None:
        if self._transport.is_closing():
            self._on_gone()
            return
        self._transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
