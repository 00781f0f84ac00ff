"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks streaming disconnect detection).

Order, outermost first: RequestGate (in-flight count, drain), ApiKeyAuth, BodyGuard (size, time, content type).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response

# Probes must work without a key and while draining: load balancers call them to decide where traffic goes.
# /metrics needs the key like every other route (Prometheus sends it from a credentials file, see deploy/).
OPEN_PATHS = frozenset({"/health", "/version"})


class ServerState:
    """Mutable serving state shared by the middleware, the routes and the lifecycle code (one event loop)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()


class RequestGate:
    """Counts requests in flight (for the drain and the concurrency limit) and answers 503 to new ones once draining
    has begun or while `limit_concurrency` requests are already in flight. Reports every response's route and status
    to `on_response` (metrics), including the ones middleware answers itself.

    The limit is uvicorn's --limit-concurrency done here instead, because uvicorn's answers in plain text: ours is
    an OpenAI-shaped error with Retry-After, which clients and our SDK retry. Probes and /metrics are never limited,
    so an overloaded server can still be watched."""

    def __init__(self, app: ASGIApp, state: ServerState, on_response: Callable[[Scope, int], None] | None = None,
                 limit_concurrency: int | None = None, retry_after_s: int = 1):
        self.app = app
        self.state = state
        self.on_response = on_response
        self.limit_concurrency = limit_concurrency
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.on_response is not None:
            send = self._reporting(scope, send)
        limited = scope["path"] not in OPEN_PATHS and scope["path"] != "/metrics"
        if self.state.draining and limited:
            response = error_response(503, "the server is shutting down", headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        if limited and self.limit_concurrency is not None and self.state.in_flight >= self.limit_concurrency:
            response = error_response(503, f"the server is at its limit of {self.limit_concurrency} concurrent "
                                           f"requests; retry later", headers={"Retry-After": str(self.retry_after_s)})
            await response(scope, receive, send)
            return
        self.state.in_flight += 1
        self.state.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
            if self.state.in_flight == 0:
                self.state.idle.set()

    def _reporting(self, scope: Scope, send: Send) -> Send:
        async def reporting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.on_response(scope, message["status"])
            await send(message)

        return reporting_send


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on every route except the probes. Digests are compared in constant time, so
    the time taken reveals nothing about the key (comparing digests also hides its length)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        valid = hmac.compare_digest(given, self.digest)
        if scheme.lower() != "bearer" or not valid:
            reason = "missing" if not header else "invalid"
            response = error_response(
                401, f"{reason} API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HeaderLimit:
    """Refuses a request whose head (path, query and headers) is larger than max_bytes with 431, before auth or
    routing look at it. uvicorn's own bound (h11's incomplete-event size, set to the same value) only applies to
    a head that arrives in pieces; one that arrives whole would get through without this check."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # ": " and CRLF
            if size > self.max_bytes:
                await error_response(431, f"the request head (path and headers) takes {size} bytes; at most "
                                          f"{self.max_bytes} are allowed", headers={"Connection": "close"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyGuard:
    """Reads a request body in full before the app sees it: bounded in size (413) and in time (408), so a huge or
    trickling body cannot hold memory or a handler. JSON routes also refuse a non-JSON Content-Type (415), and a body
    that is not UTF-8 or escapes a lone surrogate (400)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type").split(";")[0].strip().lower()
        if content_type and content_type != "application/json" and not content_type.endswith("+json"):
            await error_response(415, f"Content-Type must be application/json, got {content_type!r}")(
                scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            await self._too_large(scope, receive, send)
            return
        except asyncio.TimeoutError:
            await error_response(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        if body is None:  # the client went away mid-body; there is no one to answer
            return
        try:
            # JSON text is UTF-8 (RFC 8259). Python's json would take invalid bytes too (as lone surrogates, which
            # the tokenizer and the response encoder then choke on), so they are refused here, once for every route.
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await error_response(400, f"the request body is not valid UTF-8 (byte {exc.start}: "
                                      f"{exc.object[exc.start:exc.start + 1]!r})")(scope, receive, send)
            return
        if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(body):
            await error_response(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                                      "without its pair), which is not a Unicode character")(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: http.disconnect, which the handlers listen for

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


# JSON may spell a character outside the BMP as an escaped surrogate pair; alone, a surrogate decodes to a Python
# string that the tokenizer and the UTF-8 response encoder refuse. Only bodies with such an escape are checked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: bytes) -> bool:
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False  # not valid JSON: the app reports that
    return False


class _TooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""
