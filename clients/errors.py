"""The SDK's exceptions. Each carries the server's own message, so what the server said reaches the caller intact.

    AttnServeError
    ├── APIConnectionError          the server could not be reached, or the connection broke
    │   └── Timeout                 no answer within the timeout
    ├── APIStatusError              an HTTP error status (status_code, message, type, param, body)
    │   ├── BadRequest (400)  Unauthorized (401)  PermissionDenied (403)  NotFound (404)
    │   ├── RequestTooLarge (413)  UnprocessableEntity (422)  Overloaded (429)
    │   └── InternalServerError (500)  ServerUnavailable (503)
    └── StreamError                 an error event inside a stream that had already started (status 200)
"""

from __future__ import annotations

from typing import Any


class AttnServeError(Exception):
    """Base of every SDK exception."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class APIConnectionError(AttnServeError):
    pass


class Timeout(APIConnectionError):
    pass


class _ErrorFields(AttnServeError):
    """An error the server described in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, status_code: int | None, type: str | None = None, param: str | None = None,
                 body: Any = None):
        shown = f"{status_code}: {message}" if status_code is not None else message
        super().__init__(shown)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.body = body


class APIStatusError(_ErrorFields):
    """The server answered with an error status. `retry_after` is its Retry-After header in seconds, if any."""

    retry_after: float | None = None


class BadRequest(APIStatusError):
    pass


class Unauthorized(APIStatusError):
    pass


class PermissionDenied(APIStatusError):
    pass


class NotFound(APIStatusError):
    pass


class RequestTooLarge(APIStatusError):
    pass


class UnprocessableEntity(APIStatusError):
    pass


class Overloaded(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServerUnavailable(APIStatusError):
    pass


class StreamError(_ErrorFields):
    """An `error` event arrived inside a 200 stream (e.g. the engine stopped mid-generation). Never retried: the
    output so far was already delivered. `status_code` is the code the server put in the event."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequest, 401: Unauthorized, 403: PermissionDenied, 404: NotFound, 413: RequestTooLarge,
    422: UnprocessableEntity, 429: Overloaded, 500: InternalServerError, 503: ServerUnavailable,
}


def error_fields(body: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, type, param) from an OpenAI-shaped error body, or the fallback text when the body is not one."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        return (str(message) if message is not None else fallback, error.get("type"), error.get("param"))
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # FastAPI's default error shape
        return body["detail"], None, None
    return fallback, None, None


def status_error(status_code: int, body: Any, text: str, retry_after: float | None = None) -> APIStatusError:
    message, kind, param = error_fields(body, text.strip() or f"HTTP {status_code}")
    cls = _BY_STATUS.get(status_code, APIStatusError)
    err = cls(message, status_code=status_code, type=kind, param=param, body=body)
    err.retry_after = retry_after
    return err


def stream_error(body: Any) -> StreamError:
    message, kind, param = error_fields(body, "the stream reported an error")
    code = body["error"].get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    return StreamError(message, status_code=code if isinstance(code, int) else None, type=kind, param=param,
                       body=body)
