"""Every error the API returns has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`type` follows vLLM (BadRequestError, NotFoundError, ...) and `code` is the HTTP status, so clients written for
either keep working. FastAPI's own errors (validation 422, unknown route, wrong method, unparsable body) are
rewritten into the same shape, and validation becomes 400: nothing a client sends yields a 422 or a 500.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineDeadError, ValidationError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error to answer with; raise it from anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    # A message may quote client input; lone surrogates in it would make the UTF-8 response itself fail (a 500).
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def as_api_error(exc: BaseException) -> APIError:
    """Map an exception raised while serving a request onto the status a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return APIError(400, exc.message, exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}")
    return APIError(500, f"internal error: {type(exc).__name__}")


def sse_error(err: APIError) -> str:
    """The event that reports an error once a stream has started (its 200 status is already sent)."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param))}\n\n"


# Human descriptions for fields whose type is a union (pydantic reports one error per alternative).
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids "
              "(at most 256 prompts)",
    "stop": "a string or a list of at most 16 strings, each 1 to 256 characters",
    "messages": "a non-empty list of {role, content} objects; role is system, developer, user, assistant or tool; "
                "content is a string or a list of {type: 'text', text} parts",
}


def _allowed_ranges() -> dict[str, dict[str, str]]:
    """Route -> field name -> its allowed range as text ("[0, 2]", "(0, 1]", ">= 1"), read from the request models'
    declared bounds, so that a range error states the whole range and not only the bound that was crossed. Per
    route, because a field may differ (max_tokens: 0 scores a completion's prompt; a chat needs 1)."""
    from server import protocol

    routes = {"/v1/completions": protocol.CompletionRequest, "/v1/chat/completions": protocol.ChatCompletionRequest}
    by_route: dict[str, dict[str, str]] = {}
    for route, model in routes.items():
        ranges = by_route[route] = {}
        for name, info in model.model_fields.items():
            low = high = None
            for meta in info.metadata:
                for attr, bracket in (("ge", "["), ("gt", "(")):
                    if getattr(meta, attr, None) is not None:
                        low = (bracket, getattr(meta, attr))
                for attr, bracket in (("le", "]"), ("lt", ")")):
                    if getattr(meta, attr, None) is not None:
                        high = (bracket, getattr(meta, attr))
            if low and high:
                ranges[name] = f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
            elif low:
                ranges[name] = f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
            elif high:
                ranges[name] = f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return by_route


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def describe_validation_error(exc: RequestValidationError, route: str = "") -> tuple[str, str | None]:
    """One readable line naming the field and what is allowed, from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + detail if detail else ''}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") in ("json_invalid", "model_attributes_type", "dict_type") and len(loc) == 0:
        return "the request body must be a JSON object", None
    if first.get("type") == "missing" and len(loc) == 0:
        return "the request body must be a JSON object", None
    param = loc[0] if loc else None
    if param in _UNION_FIELDS and first.get("type") != "missing":
        # Report the most specific complaint when every alternative failed on the same element.
        return f"'{param}' must be {_UNION_FIELDS[param]}", param
    where = ".".join(loc) if loc else "body"
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"'{where}' is required", param
    ranges = _RANGES.get(route, {})
    if first.get("type") in _RANGE_ERRORS and len(loc) == 1 and loc[0] in ranges:
        return f"'{where}' must be {ranges[loc[0]]}, got {_short(first.get('input'))}", param
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) else f", got {_short(value)}"
    return f"'{where}': {message}{shown}", param


_RANGES = _allowed_ranges()


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        err = as_api_error(exc)  # the same mapping an error event in a stream uses
        return error_response(err.status, err.message, err.param, err.headers)

    for known in (APIError, ValidationError, EngineDeadError):
        app.add_exception_handler(known, _mapped)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc, request.url.path)
        return error_response(400, message, param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error; still answered in the API's error shape (Starlette logs the traceback).
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400:
            message = f"the request body could not be parsed: {exc.detail}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
