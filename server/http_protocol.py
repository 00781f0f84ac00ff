"""uvicorn's h11 HTTP/1.1 protocol, with requests it cannot parse answered in OpenAI's error shape.

uvicorn answers every request h11 refuses with a plain-text 400, whatever h11's reason: a request head that grows past
the size limit while it arrives in pieces (the usual case on a real network) gets "Invalid HTTP request received."
instead of a 431. Here the error carries h11's status hint (431 for an over-long head, else 400) and the same JSON
body as every other error, so clients and our SDK can read it.

The protocol is also pinned to h11 on purpose: with httptools installed, uvicorn's "auto" would switch parsers, and the
head-size limit (h11_max_incomplete_event_size) applies to h11 only.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class JsonErrorH11Protocol(H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parse_error_status = 400
        next_event = self.conn.next_event

        def next_event_keeping_the_status_hint():
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._parse_error_status = exc.error_status_hint
                raise

        # NOTE: the same h11.Connection serves every request of a keep-alive connection (start_next_cycle), so
        # wrapping it once here covers them all.
        self.conn.next_event = next_event_keeping_the_status_hint

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
