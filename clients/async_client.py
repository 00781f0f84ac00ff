"""The asyncio client: the same surface as clients.client.Client, with awaitable methods and async streams.

    async with AsyncClient("http://127.0.0.1:8000") as client:
        stream = await client.completions.create(prompt="def add(a, b):", max_tokens=32, stream=True)
        async for text in stream.text_deltas():
            print(text, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
from clients.sse import aiter_sse
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


class AsyncStream(Generic[T]):
    """Typed chunks of a streamed response, read as they arrive. Use `async with` or call aclose(): leaving early
    closes the connection, which makes the server abort the request and free its resources."""

    def __init__(self, response: httpx.Response, chunk_type: type[T], url: str):
        self.response = response
        self._chunk_type = chunk_type
        self._url = url
        self._events = aiter_sse(response.aiter_lines())
        self.usage: Usage | None = None  # the last usage seen (stream_options={"include_usage": True})

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            while True:
                try:
                    event = await self._events.__anext__()
                except StopAsyncIteration:
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
            await self.aclose()

    async def text_deltas(self) -> AsyncIterator[str]:
        """Only the text each chunk adds, skipping empty ones (the role chunk, the usage chunk)."""
        async for chunk in self:
            text = text_of(chunk)
            if text:
                yield text

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(self, **params: Unpack[CompletionParams]) -> Completion | AsyncStream[CompletionChunk]:
        """POST /v1/completions. With stream=True, an AsyncStream of CompletionChunk; else a Completion."""
        return await self._client._generate("/v1/completions", dict(params), Completion)


class AsyncChatCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(self, **params: Unpack[ChatCompletionParams]
                     ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """POST /v1/chat/completions. With stream=True, an AsyncStream of ChatCompletionChunk."""
        return await self._client._generate("/v1/chat/completions", dict(params), ChatCompletion,
                                            ChatCompletionChunk)


class AsyncChat:
    def __init__(self, client: AsyncClient):
        self.completions = AsyncChatCompletions(client)


class AsyncModels:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def list(self) -> ModelList:
        return parse_json(await self._client._request("GET", "/v1/models"), ModelList)


class AsyncClient:
    """The asyncio twin of Client; same arguments, same retry rules."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, *, retry: RetryPolicy | None = None,
                 http_client: httpx.AsyncClient | None = None):
        self.base_url = resolve_base_url(base_url)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._headers = auth_headers(api_key)
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    async def tokenize(self, prompt: str | None = None, *, messages: list[Message] | None = None,
                       model: str | None = None, add_special_tokens: bool = True, add_generation_prompt: bool = True,
                       return_token_strs: bool = False) -> TokenizeResult:
        body = tokenize_body(prompt, messages, model, add_special_tokens, add_generation_prompt, return_token_strs)
        return parse_json(await self._request("POST", "/tokenize", body), TokenizeResult)

    async def detokenize(self, tokens: list[int], *, model: str | None = None) -> DetokenizeResult:
        body: dict[str, Any] = {"tokens": tokens, **({"model": model} if model else {})}
        return parse_json(await self._request("POST", "/detokenize", body), DetokenizeResult)

    async def tokenizer_info(self) -> TokenizerInfo:
        return parse_json(await self._request("GET", "/tokenizer_info"), TokenizerInfo)

    async def health(self) -> bool:
        """True when the server is ready (200), False when it answers 503 (engine down, or draining)."""
        response = await self._request("GET", "/health", retry=False, raise_for={503})
        return response.status_code == 200

    async def metrics(self) -> Metrics:
        return parse_metrics((await self._request("GET", "/metrics")).text)

    async def _generate(self, path: str, params: dict[str, Any], result: type[T], chunk: type[T] | None = None):
        body, timeout = request_body(params)
        if not body.get("stream"):
            return parse_json(await self._request("POST", path, body, timeout=timeout), result)
        response = await self._request("POST", path, body, timeout=timeout, stream=True)
        return AsyncStream(response, chunk or result, self.base_url + path)

    async def _request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                       stream: bool = False, retry: bool = True, raise_for: frozenset[int] | set[int] = frozenset()
                       ) -> httpx.Response:
        url = self.base_url + path
        extra = {} if timeout is None else {"timeout": timeout}
        attempt = 0
        while True:
            try:
                request = self._http.build_request(method, url, json=body, headers=self._headers, **extra)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retry and should_retry(attempt, self.retry, exc=exc):
                    await asyncio.sleep(self.retry.delay(attempt, None))
                    attempt += 1
                    continue
                raise transport_error(exc, url) from exc
            if response.status_code < 400 or response.status_code in raise_for:
                return response
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise status_error(response.status_code, None, f"HTTP {response.status_code}") from exc
            finally:
                await response.aclose()
            error = error_from_response(response)
            if retry and should_retry(attempt, self.retry, status=response.status_code):
                await asyncio.sleep(self.retry.delay(attempt, getattr(error, "retry_after", None)))
                attempt += 1
                continue
            raise error

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
