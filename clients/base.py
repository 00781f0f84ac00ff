"""What the sync and async clients share: configuration, the retry policy, error mapping, and turning SSE events into
typed chunks. The two clients only differ in how they wait (time.sleep vs asyncio.sleep, send vs await send)."""

from __future__ import annotations

import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from clients.errors import APIConnectionError, Timeout, status_error, stream_error
from clients.sse import SSEEvent

API_KEY_ENV = "ATTNSERVE_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})  # overloaded, or draining/restarting: worth another try
# Failures before the server has answered anything: the request did not run, so sending it again is safe.
# A read timeout is not among them: the server may still be working on it.
RETRY_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                          httpx.WriteError)
MAX_RETRY_AFTER_S = 60.0  # a Retry-After beyond this is capped, so a misconfigured proxy cannot stall a client

T = TypeVar("T", bound=BaseModel)
_JITTER = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random = _JITTER) -> float:
        """Seconds to wait before retry number `attempt + 1`: the server's Retry-After when it gave one, else
        exponential backoff with "full jitter" (uniform in [0, cap]) so that many clients do not retry in step."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        cap = min(self.max_delay_s, self.initial_delay_s * 2 ** attempt)
        return rng.uniform(cap / 2, cap)


def resolve_base_url(base_url: str | None) -> str:
    """The server's root URL. A trailing /v1 (as the openai package wants it) is accepted and dropped, since the
    SDK also calls routes outside /v1 (/health, /tokenize, /metrics)."""
    url = (base_url or os.environ.get("ATTNSERVE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def transport_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"timed out talking to {url}: {type(exc).__name__}")
    return APIConnectionError(f"could not talk to {url}: {type(exc).__name__}: {exc}")


def error_from_response(response: httpx.Response) -> Exception:
    """The typed exception for an error status (the body must have been read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    return status_error(response.status_code, body, response.text,
                        parse_retry_after(response.headers.get("retry-after")))


def should_retry(attempt: int, policy: RetryPolicy, *, status: int | None = None,
                 exc: BaseException | None = None) -> bool:
    if attempt >= policy.max_retries:
        return False
    if status is not None:
        return status in RETRY_STATUSES
    return isinstance(exc, RETRY_TRANSPORT_ERRORS)


def chunk_from_event(event: SSEEvent, chunk_type: type[T]) -> T | None:
    """A typed chunk, None for `[DONE]`; an error event raises StreamError."""
    if event.is_done:
        return None
    try:
        data = event.json()
    except ValueError:
        raise APIConnectionError(f"the stream sent an event that is not JSON: {event.data[:200]!r}") from None
    if event.event == "error" or (isinstance(data, dict) and "error" in data and "choices" not in data):
        raise stream_error(data)
    return chunk_type.model_validate(data)


def parse_json(response: httpx.Response, model: type[T]) -> T:
    try:
        return model.model_validate(response.json())
    except ValueError as exc:
        raise APIConnectionError(f"the server's answer is not a valid {model.__name__}: {exc}") from None


def tokenize_body(prompt: str | None, messages: list[Any] | None, model: str | None, add_special_tokens: bool,
                  add_generation_prompt: bool, return_token_strs: bool) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    body: dict[str, Any] = {"add_special_tokens": add_special_tokens, "add_generation_prompt": add_generation_prompt,
                            "return_token_strs": return_token_strs}
    body.update({"prompt": prompt} if prompt is not None else {"messages": messages})
    if model:
        body["model"] = model
    return body
