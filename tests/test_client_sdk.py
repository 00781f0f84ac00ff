"""The Python SDK (clients.Client / AsyncClient) against live loopback servers: every method, sync and async, stream
and not; typed errors for each status; retries (429 with Retry-After, connection errors) and the cases that must
never be retried (a started stream, a read timeout); an early close aborting the request on the server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from clients import (
    APIConnectionError,
    AsyncClient,
    BadRequest,
    Client,
    NotFound,
    Overloaded,
    RequestTooLarge,
    ServerUnavailable,
    StreamError,
    Timeout,
    Unauthorized,
)
from clients.base import RetryPolicy, parse_retry_after
from clients.sse import SSEDecoder, iter_sse
from clients.types import ChatCompletion, ChatCompletionChunk, Completion
from server_process import InProcessServer, ServerProcess

MODEL = "sdk-model"
FAST_RETRY = RetryPolicy(max_retries=2, initial_delay_s=0.01, max_delay_s=0.02)
MESSAGES = [{"role": "user", "content": "Say something."}]


class Faults:
    """ASGI middleware for fault injection: answers the next queued faults instead of the app, and counts the
    generation requests that reach it (attempts, as the server sees them)."""

    def __init__(self, app):
        self.app = app
        self.queue: list[tuple[int, dict[str, str]] | str] = []
        self.attempts = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            self.attempts += 1
            if self.queue:
                fault = self.queue.pop(0)
                if fault == "break-stream":
                    await self._break_stream(send)
                    return
                status, headers = fault
                body = json.dumps({"error": {"message": f"injected {status}", "type": "Injected", "param": None,
                                             "code": status}}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        *((k.encode(), v.encode()) for k, v in headers.items())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _break_stream(send):
        """A 200 stream that sends one chunk, then dies (uvicorn drops the connection)."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        chunk = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": MODEL,
                 "choices": [{"index": 0, "text": "partial", "finish_reason": None}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True})
        raise RuntimeError("injected: the connection breaks mid-stream")


@pytest.fixture(scope="module")
def server(make_ckpt):
    holder = {}

    def wrap(app):
        holder["faults"] = Faults(app)
        return holder["faults"]

    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=256, num_kv_blocks=64,
                         wrap=wrap) as s:
        s.faults = holder["faults"]
        yield s


@pytest.fixture
def faults(server):
    server.faults.queue.clear()
    server.faults.attempts = 0
    yield server.faults
    server.faults.queue.clear()


@pytest.fixture
def client(server):
    with Client(server.url, retry=FAST_RETRY) as c:
        yield c


# ---- every method, sync -------------------------------------------------------------------------------


def test_completion_non_stream_and_stream_agree(client):
    full = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=12, temperature=0.0)
    assert isinstance(full, Completion) and full.object == "text_completion"
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    with client.completions.create(model=MODEL, prompt="The sky is", max_tokens=12, temperature=0.0, stream=True,
                                   stream_options={"include_usage": True}) as stream:
        text = "".join(stream.text_deltas())
    assert text == full.text
    assert stream.usage.completion_tokens == 12 and stream.usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_chunks_are_typed(client):
    chunks = list(client.completions.create(prompt=["a", "b"], max_tokens=3, n=2, stream=True))
    assert all(isinstance(c, Completion) for c in chunks)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 4


def test_chat_non_stream_and_stream_agree(client):
    full = client.chat.completions.create(messages=MESSAGES, max_tokens=10, temperature=0.0, seed=1)
    assert isinstance(full, ChatCompletion) and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(messages=MESSAGES, max_tokens=10, temperature=0.0, seed=1, stream=True)
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.text


def test_extra_body_and_vllm_fields_reach_the_server(client):
    out = client.completions.create(prompt="x", max_tokens=5, ignore_eos=True, min_tokens=5,
                                    extra_body={"stop_token_ids": [1]})
    assert out.usage.completion_tokens == 5


def test_scoring_fields_are_typed(client):
    """echo + logprobs with max_tokens 0, and vLLM's prompt_logprobs, read back as typed objects."""
    scored = client.completions.create(prompt="The sky is blue", max_tokens=0, echo=True, logprobs=1,
                                       prompt_logprobs=1, return_tokens_as_token_ids=True)
    choice = scored.choices[0]
    assert choice.text == "The sky is blue" and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and all(x < 0 for x in choice.logprobs.token_logprobs[1:])
    assert all(t.startswith("token_id:") for t in choice.logprobs.tokens)
    assert choice.prompt_logprobs[0] is None and len(choice.prompt_logprobs) == len(choice.logprobs.tokens)
    for entry, tok, value in zip(choice.prompt_logprobs[1:], choice.logprobs.tokens[1:],
                                 choice.logprobs.token_logprobs[1:]):
        own = entry[tok.removeprefix("token_id:")]  # the prompt token's own entry
        assert own.logprob == value and own.decoded_token == tok and own.rank >= 1
    chat = client.chat.completions.create(messages=MESSAGES, max_tokens=1, prompt_logprobs=0)
    assert chat.prompt_logprobs[0] is None and all(len(e) == 1 for e in chat.prompt_logprobs[1:])


def test_scheduling_fields_reach_the_server(client):
    """cache_salt is accepted as a keyword; priority too, and this server (fair policy) refuses a non-zero one."""
    assert client.completions.create(prompt="x", max_tokens=1, cache_salt="tenant-a", priority=0).usage
    with pytest.raises(BadRequest) as exc:
        client.chat.completions.create(messages=MESSAGES, max_tokens=1, priority=2)
    assert exc.value.param == "priority" and "--scheduling-policy priority" in exc.value.message


def test_models_tokenize_detokenize_health_metrics(client):
    models = client.models.list()
    assert [m.id for m in models] == [MODEL] and models.data[0].max_model_len == 256
    tok = client.tokenize("hello world")
    assert tok.count == len(tok.tokens) > 0 and tok.max_model_len == 256
    info = client.tokenizer_info()
    assert client.tokenize(info.bos_token, add_special_tokens=False).count == 1 and info.vocab_size > max(tok.tokens)
    assert client.detokenize(tok.tokens).prompt.endswith("hello world")
    chat_tok = client.tokenize(messages=MESSAGES, return_token_strs=True)
    assert len(chat_tok.token_strs) == chat_tok.count > tok.count
    with pytest.raises(ValueError):
        client.tokenize()
    assert client.health() is True
    before = client.metrics()
    client.completions.create(prompt="count me", max_tokens=4)
    after = client.metrics()
    assert after.value("attnserve_generation_tokens_total") - before.value("attnserve_generation_tokens_total") == 4
    assert after.value("attnserve_request_success_total", finished_reason="length") == \
        before.value("attnserve_request_success_total", finished_reason="length") + 1
    assert after.value("attnserve_kv_cache_blocks_total", model_name=MODEL) == 64


def test_base_url_with_v1_suffix_is_accepted(server):
    with Client(server.url + "/v1/") as c:
        assert c.health() and c.models.list().data[0].id == MODEL


# ---- every method, async ------------------------------------------------------------------------------


def test_async_client_every_method(server):
    async def main():
        async with AsyncClient(server.url, retry=FAST_RETRY) as c:
            full = await c.completions.create(prompt="The sky is", max_tokens=8, temperature=0.0)
            stream = await c.completions.create(prompt="The sky is", max_tokens=8, temperature=0.0, stream=True,
                                                stream_options={"include_usage": True})
            async with stream:
                text = "".join([t async for t in stream.text_deltas()])
            assert text == full.text and stream.usage.completion_tokens == 8
            chat = await c.chat.completions.create(messages=MESSAGES, max_tokens=6, temperature=0.0)
            chat_stream = await c.chat.completions.create(messages=MESSAGES, max_tokens=6, temperature=0.0,
                                                          stream=True)
            chunks = [chunk async for chunk in chat_stream]
            assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == chat.text
            assert [m.id for m in await c.models.list()] == [MODEL]
            tok = await c.tokenize("hello")
            assert (await c.detokenize(tok.tokens)).prompt.endswith("hello")
            info = await c.tokenizer_info()
            assert (await c.tokenize(info.eos_token, add_special_tokens=False)).count == 1  # a special token
            assert await c.health() is True
            assert (await c.metrics()).value("attnserve_generation_tokens_total") >= 8 + 8 + 6 + 6
            with pytest.raises(BadRequest):
                await c.completions.create(prompt="x", temperature=5)

    asyncio.run(main())


# ---- typed errors ---------------------------------------------------------------------------------------


def test_bad_request_and_not_found_carry_the_servers_message(client, faults):
    with pytest.raises(BadRequest) as exc:
        client.completions.create(prompt="x", temperature=2.5)
    assert exc.value.status_code == 400 and exc.value.param == "temperature"
    assert "'temperature' must be in [0, 2], got 2.5" in exc.value.message
    with pytest.raises(NotFound) as exc:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert "nope" in exc.value.message and exc.value.type == "NotFoundError"
    assert faults.attempts == 2  # a 4xx is never retried


def test_unauthorized_and_too_large(make_ckpt):
    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=32,
                         server_kwargs={"api_key": "sekrit", "max_body_bytes": 4096}) as srv:
        with Client(srv.url, api_key="wrong") as c, pytest.raises(Unauthorized) as exc:
            c.models.list()
        assert exc.value.status_code == 401
        with Client(srv.url, api_key="sekrit") as c:
            assert c.models.list().data
            with pytest.raises(RequestTooLarge):
                c.completions.create(prompt="x" * 10_000)
            assert c.health() and c.metrics()


def test_api_key_from_environment(make_ckpt, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_API_KEY", "from-env")
    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=32,
                         server_kwargs={"api_key": "from-env"}) as srv, Client(srv.url) as c:
        assert c.completions.create(prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_connection_error_is_retried_then_typed():
    attempts = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            attempts.append(request.url)
            return super().handle_request(request)

    import socket
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retry=FAST_RETRY, http_client=httpx.Client(transport=Counting())) as c:
        with pytest.raises(APIConnectionError):
            c.completions.create(prompt="x")
    assert len(attempts) == 3  # the first try and two retries


# ---- retries ----------------------------------------------------------------------------------------------


def test_retry_after_429_then_success_honours_retry_after(client, faults):
    faults.queue += [(429, {"retry-after": "1"}), (503, {})]
    start = time.monotonic()
    out = client.completions.create(prompt="retry me", max_tokens=3)
    elapsed = time.monotonic() - start
    assert out.usage.completion_tokens == 3
    assert faults.attempts == 3
    assert elapsed >= 1.0  # waited as Retry-After said (the 503 had none: a short backoff)


def test_retries_give_up_with_the_typed_error(client, faults):
    faults.queue += [(503, {})] * 3
    with pytest.raises(ServerUnavailable) as exc:
        client.completions.create(prompt="x", max_tokens=1)
    assert faults.attempts == 3 and "injected 503" in exc.value.message


def test_started_stream_is_never_retried(client, faults):
    faults.queue.append("break-stream")
    stream = client.completions.create(prompt="x", max_tokens=5, stream=True)
    seen = []
    with pytest.raises(APIConnectionError):
        for chunk in stream:
            seen.append(chunk.text)
    assert seen == ["partial"] and faults.attempts == 1


def test_read_timeout_is_typed_not_retried(server, faults):
    with Client(server.url, timeout=0.3, retry=FAST_RETRY) as c, pytest.raises(Timeout):
        c.completions.create(prompt="slow", max_tokens=200, ignore_eos=True, timeout=0.05)
    assert faults.attempts == 1
    server.wait_idle()  # the server saw the disconnect and aborted


def test_max_queued_requests_zero_gives_overloaded_after_retries(make_ckpt):
    """The server's own 429 (not an injected one): its Retry-After is honoured on each retry."""
    with ServerProcess(make_ckpt("llama"), "--max-queued-requests", "0", "--max-model-len", "128",
                       "--num-kv-blocks", "32") as proc:
        with Client(proc.url, retry=RetryPolicy(max_retries=1)) as c:
            start = time.monotonic()
            with pytest.raises(Overloaded) as exc:
                c.completions.create(prompt="x", max_tokens=1)
            assert time.monotonic() - start >= 1.0  # Retry-After: 1
            assert exc.value.retry_after == 1.0 and "overloaded" in exc.value.message
            assert c.metrics().value("attnserve_http_requests_total", route="/v1/completions", status="429") == 2


# ---- streams: early close, error events ----------------------------------------------------------------


def test_early_close_aborts_on_the_server(server, client):
    before = client.metrics().value("attnserve_request_success_total", finished_reason="abort")
    stream = client.completions.create(prompt="go on", max_tokens=200, ignore_eos=True, stream=True)
    first = next(iter(stream))
    assert first.choices
    stream.close()
    server.wait_idle()
    assert client.metrics().value("attnserve_request_success_total", finished_reason="abort") == before + 1


def test_async_early_close_aborts_on_the_server(server):
    async def main():
        async with AsyncClient(server.url) as c:
            before = (await c.metrics()).value("attnserve_request_success_total", finished_reason="abort")
            stream = await c.chat.completions.create(messages=MESSAGES, max_tokens=200, ignore_eos=True,
                                                     stream=True)
            async with stream:
                async for _ in stream:
                    break
            await asyncio.get_running_loop().run_in_executor(None, server.wait_idle)
            after = (await c.metrics()).value("attnserve_request_success_total", finished_reason="abort")
            assert after == before + 1

    asyncio.run(main())


def test_error_event_in_stream_raises_stream_error(make_ckpt):
    with ServerProcess(make_ckpt("llama"), "--max-model-len", "128", "--num-kv-blocks", "32",
                       fault="raise@4") as proc:
        with Client(proc.url, retry=FAST_RETRY) as c:
            stream = c.completions.create(prompt="x", max_tokens=50, ignore_eos=True, stream=True)
            with pytest.raises(StreamError) as exc:
                for _ in stream:
                    pass
            assert exc.value.status_code == 503 and "engine" in exc.value.message
            assert c.health() is False
            with pytest.raises(ServerUnavailable):
                c.completions.create(prompt="x", max_tokens=1)

            async def async_side():
                async with AsyncClient(proc.url, max_retries=0) as ac:
                    assert await ac.health() is False
                    with pytest.raises(ServerUnavailable):
                        await ac.chat.completions.create(messages=MESSAGES)

            asyncio.run(async_side())


# ---- pieces -----------------------------------------------------------------------------------------------


def test_sse_decoder_follows_the_event_stream_rules():
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: error", "data:x", "id: 7", "", "",
             "data: [DONE]", "", "data: cut off"]
    events = list(iter_sse(lines))
    assert [e.data for e in events] == ['{"a":\n1}', "x", "[DONE]"]
    assert events[0].json() == {"a": 1} and events[1].event == "error" and events[1].id == "7"
    assert events[2].is_done
    decoder = SSEDecoder()
    assert decoder.feed("data: one") is None and decoder.feed("").data == "one"


def test_retry_after_and_backoff_arithmetic():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    policy = RetryPolicy(max_retries=5, initial_delay_s=0.5, max_delay_s=4.0)
    assert policy.delay(0, 2.5) == 2.5 and policy.delay(0, 1e9) == 60.0
    import random
    rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap and len(set(delays)) > 100  # jittered
