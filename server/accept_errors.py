"""accept() out of file descriptors: a back-off and one log line every 10 s, not a storm (issue 24, finding 1).

When accept() fails with EMFILE, ENFILE, ENOBUFS or ENOMEM, asyncio's selector loop reports it to the loop's
exception handler, stops watching the listening socket and retries a second later; but it stays in its accept loop,
so the same tick calls accept() up to `backlog` times more (uvicorn's backlog is 2048), and every call fails, is
logged with its traceback and schedules one more retry. At a limit of 256 descriptors that was 210,734 reports
(1.2 million log lines, 92 MB) in 20 s, and the retries piled up on the event loop. Two pieces stop it:

- `ListeningSocket` (the socket the server listens on) lets the first failure of a burst through, so asyncio backs
  off for a second, and answers the rest of that burst as an empty backlog, so asyncio leaves its loop at once;
- `AcceptErrorLog`, the loop's exception handler, logs the first accept failure, then at most one line every
  `interval_s` with the count since the last line and what to do. Every other report goes to the handler it
  replaced, so no other error is hidden.

Connections that arrive meanwhile wait in the kernel's backlog and are accepted once descriptors free up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from asyncio import constants

logger = logging.getLogger("attnserve")

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# asyncio's failing accept() calls of one burst come microseconds apart; its retry comes ACCEPT_RETRY_DELAY later.
_BURST_S = constants.ACCEPT_RETRY_DELAY / 2


def is_resource_error(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


class ListeningSocket(socket.socket):
    """A listening socket whose accept() reports running out of resources once per burst (see the module doc).
    Accepted connections are plain sockets."""

    _reported_at = float("-inf")

    def accept(self):
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            now = time.monotonic()
            if now - self._reported_at < _BURST_S:
                # asyncio already has this burst's failure and a retry scheduled: "nothing to accept" ends its loop.
                raise BlockingIOError(errno.EAGAIN, "accept() is backing off") from exc
            self._reported_at = now
            raise


class AcceptErrorLog:
    """A loop exception handler: accept failures for lack of resources, rate-limited; anything else, unchanged."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float = 10.0, max_connections: int | None):
        self._previous = loop.get_exception_handler()
        self.interval_s = interval_s
        self.max_connections = max_connections
        self.unreported = 0
        self._last_line_at: float | None = None
        self._flush: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if not (is_resource_error(exc) and "accept" in str(context.get("message", ""))):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.unreported += 1
        now = loop.time()
        if self._last_line_at is None or now - self._last_line_at >= self.interval_s:
            self._report(loop, exc)
        elif self._flush is None:
            # The count of a burst that ends inside the interval still gets its line, at the interval's end.
            self._flush = loop.call_at(self._last_line_at + self.interval_s, self._report, loop, exc)

    def _report(self, loop: asyncio.AbstractEventLoop, exc: OSError) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self.unreported:
            return
        since = "" if self._last_line_at is None else f" in the last {loop.time() - self._last_line_at:.0f} s"
        cap = f"lower --max-connections (now {self.max_connections})" if self.max_connections else \
            "set --max-connections below it"
        logger.error("cannot accept new connections: accept() failed %d time%s%s (%s, %s); they wait in the listen "
                     "backlog and are retried every %g s. Raise the file-descriptor limit (ulimit -n; Docker: "
                     "ulimits nofile) or %s", self.unreported, "" if self.unreported == 1 else "s", since,
                     errno.errorcode.get(exc.errno, exc.errno), exc.strerror, constants.ACCEPT_RETRY_DELAY, cap)
        self.unreported = 0
        self._last_line_at = loop.time()


def install(loop: asyncio.AbstractEventLoop, max_connections: int | None) -> AcceptErrorLog:
    handler = AcceptErrorLog(loop, max_connections=max_connections)
    loop.set_exception_handler(handler)
    return handler
