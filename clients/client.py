"""The synchronous client.

    from clients import Client
    client = Client("http://127.0.0.1:8000")
    print(client.completions.create(prompt="def add(a, b):", max_tokens=32).text)
    with client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True) as stream:
        for text in stream.text_deltas():
            print(text, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Generic

import httpx

from clients.base import (
    RetryPolicy,
    T,
    auth_headers,
    chunk_from_event,
    error_from_response,
    parse_json,
    resolve_base_url,
    should_retry,
    tokenize_body,
    transport_error,
)
from clients.errors import APIConnectionError, status_error
from clients.params import ChatCompletionParams, CompletionParams, Message, Unpack, request_body
from clients.prometheus import Metrics, parse_metrics
from clients.sse import iter_sse
from clients.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DetokenizeResult,
    ModelList,
    TokenizeResult,
    TokenizerInfo,
    Usage,
    text_of,
)


class Stream(Generic[T]):
    """Typed chunks of a streamed response, read as they arrive. Use it as a context manager or call close():
    leaving early closes the connection, which makes the server abort the request and free its resources."""

    def __init__(self, response: httpx.Response, chunk_type: type[T], url: str):
        self.response = response
        self._chunk_type = chunk_type
        self._url = url
        self._events = iter_sse(response.iter_lines())
        self.usage: Usage | None = None  # the last usage seen (stream_options={"include_usage": True})

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                try:
                    event = next(self._events)
                except StopIteration:
                    raise APIConnectionError(f"the stream from {self._url} ended without [DONE]") from None
                chunk = chunk_from_event(event, self._chunk_type)
                if chunk is None:
                    return
                if getattr(chunk, "usage", None) is not None:
                    self.usage = chunk.usage
                yield chunk
        except httpx.TransportError as exc:
            raise transport_error(exc, self._url) from exc
        finally:
            self.close()

    def text_deltas(self) -> Iterator[str]:
        """Only the text each chunk adds, skipping empty ones (the role chunk, the usage chunk)."""
        for chunk in self:
            text = text_of(chunk)
            if text:
                yield text

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Completions:
    def __init__(self, client: Client):
        self._client = client

    def create(self, **params: Unpack[CompletionParams]) -> Completion | Stream[CompletionChunk]:
        """POST /v1/completions. With stream=True, a Stream of CompletionChunk; else a Completion."""
        return self._client._generate("/v1/completions", dict(params), Completion)


class ChatCompletions:
    def __init__(self, client: Client):
        self._client = client

    def create(self, **params: Unpack[ChatCompletionParams]) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions. With stream=True, a Stream of ChatCompletionChunk; else a ChatCompletion."""
        return self._client._generate("/v1/chat/completions", dict(params), ChatCompletion, ChatCompletionChunk)


class Chat:
    def __init__(self, client: Client):
        self.completions = ChatCompletions(client)


class Models:
    def __init__(self, client: Client):
        self._client = client

    def list(self) -> ModelList:
        return parse_json(self._client._request("GET", "/v1/models"), ModelList)


class Client:
    """base_url: the server's root (a trailing /v1 is accepted); default $ATTNSERVE_BASE_URL, else
    http://127.0.0.1:8000. api_key: default $ATTNSERVE_API_KEY. timeout: seconds per request (a stream's read
    timeout is per chunk). max_retries: extra attempts after a connection failure, 429 or 503, waiting as
    Retry-After says or with exponential backoff and jitter; a stream that has started is never retried."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, *, retry: RetryPolicy | None = None, http_client: httpx.Client | None = None):
        self.base_url = resolve_base_url(base_url)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._http = http_client or httpx.Client(timeout=timeout)
        self._headers = auth_headers(api_key)
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    # ---- the plain routes ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | None = None, *, messages: list[Message] | None = None, model: str | None = None,
                 add_special_tokens: bool = True, add_generation_prompt: bool = True,
                 return_token_strs: bool = False) -> TokenizeResult:
        body = tokenize_body(prompt, messages, model, add_special_tokens, add_generation_prompt, return_token_strs)
        return parse_json(self._request("POST", "/tokenize", body), TokenizeResult)

    def detokenize(self, tokens: list[int], *, model: str | None = None) -> DetokenizeResult:
        body: dict[str, Any] = {"tokens": tokens, **({"model": model} if model else {})}
        return parse_json(self._request("POST", "/detokenize", body), DetokenizeResult)

    def tokenizer_info(self) -> TokenizerInfo:
        return parse_json(self._request("GET", "/tokenizer_info"), TokenizerInfo)

    def health(self) -> bool:
        """True when the server is ready (200), False when it answers 503 (engine down, or draining)."""
        response = self._request("GET", "/health", retry=False, raise_for={503})
        return response.status_code == 200

    def metrics(self) -> Metrics:
        return parse_metrics(self._request("GET", "/metrics").text)

    # ---- plumbing -----------------------------------------------------------------------------------

    def _generate(self, path: str, params: dict[str, Any], result: type[T], chunk: type[T] | None = None):
        body, timeout = request_body(params)
        if not body.get("stream"):
            return parse_json(self._request("POST", path, body, timeout=timeout), result)
        response = self._request("POST", path, body, timeout=timeout, stream=True)
        return Stream(response, chunk or result, self.base_url + path)

    def _request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                 stream: bool = False, retry: bool = True, raise_for: frozenset[int] | set[int] = frozenset()
                 ) -> httpx.Response:
        """Send, retrying what is safe to retry; an error status raises its typed exception unless listed in
        `raise_for` (statuses the caller handles itself). A streamed response is returned unread."""
        url = self.base_url + path
        extra = {} if timeout is None else {"timeout": timeout}
        attempt = 0
        while True:
            try:
                request = self._http.build_request(method, url, json=body, headers=self._headers, **extra)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retry and should_retry(attempt, self.retry, exc=exc):
                    time.sleep(self.retry.delay(attempt, None))
                    attempt += 1
                    continue
                raise transport_error(exc, url) from exc
            if response.status_code < 400 or response.status_code in raise_for:
                return response
            try:
                response.read()
            except httpx.TransportError as exc:
                raise status_error(response.status_code, None, f"HTTP {response.status_code}") from exc
            finally:
                response.close()
            error = error_from_response(response)
            if retry and should_retry(attempt, self.retry, status=response.status_code):
                time.sleep(self.retry.delay(attempt, getattr(error, "retry_after", None)))
                attempt += 1
                continue
            raise error

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

