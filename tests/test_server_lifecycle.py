"""Lifecycle of the HTTP server: client disconnects, overload, graceful drain on SIGTERM/SIGINT, and engine death.

What is specified, and tested here end to end over real sockets:

- A client that hangs up (streaming or not) aborts its request at once: it leaves the batch, its KV blocks are freed,
  and the server's in-flight count drops back, long before its max_tokens could have been generated.
- More concurrent requests than the waiting queue allows: the excess gets 429 with Retry-After and an OpenAI-shaped
  error; nothing else fails, and every accepted request runs to its full max_tokens.
- SIGTERM/SIGINT drain: /health and new requests answer 503 while in-flight requests get --shutdown-timeout seconds
  to finish; a stream that outlives it ends with an error event then `data: [DONE]`; the process exits 0.
- Engine death (a fault injected by tests/faulty_server.py): in-flight requests end with a 503 (an error event then
  `data: [DONE]` for a stream); /health and new requests answer 503; the process stays up and answers.
- SSE framing: every event is exactly `data: <payload>\\n\\n`, checked on the raw body bytes.

The in-process server (InProcessServer) lets the disconnect and overload tests look inside the engine; the drain and
engine-death tests need a real process (signals, the env hook), so they use ServerProcess. Every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from clients.prometheus import parse_metrics
from server_process import InProcessServer, ServerProcess

# Long enough that an unaborted request would run for tens of seconds (the tiny model makes ~500-1000 tokens/s on
# CPU); RoPE lets max_model_len exceed the checkpoint's 256 positions.
LONG_LEN = 32768
LONG_TOKENS = 20000
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a very long story."}]


# ---- helpers ---------------------------------------------------------------------------------------------------------

def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def split_sse(buf: bytes) -> tuple[list[str], bytes]:
    """The complete events at the start of `buf` (their payloads) and the incomplete rest. Asserts the framing:
    every event is exactly b"data: " + one line + b"\\n\\n" (no other fields, no comments, no CRs)."""
    *events, rest = buf.split(b"\n\n")
    payloads = []
    for event in events:
        assert event.startswith(b"data: "), f"SSE event not framed as 'data: <json>': {event[:120]!r}"
        body = event[len(b"data: "):]
        assert body and b"\n" not in body and b"\r" not in body, f"SSE event is not one data line: {event[:120]!r}"
        payloads.append(body.decode("utf-8"))
    return payloads, rest


def parse_payloads(payloads: list[str]) -> list:
    """JSON-decode each payload, keeping the literal "[DONE]"."""
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def parse_complete_sse(raw: bytes) -> list:
    """A whole SSE body: framed events only, ending with exactly one `data: [DONE]`, nothing after it."""
    payloads, rest = split_sse(raw)
    assert rest == b"", f"bytes after the last complete event: {rest[:200]!r}"
    assert payloads, "empty SSE body"
    assert payloads[-1] == "[DONE]", f"stream did not end with data: [DONE]; last events: {payloads[-3:]}"
    assert payloads.count("[DONE]") == 1, "more than one [DONE]"
    return parse_payloads(payloads)


def assert_openai_error(body: dict, code: int) -> None:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error body: {body!r}"
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"], err
    assert isinstance(err.get("type"), str) and err["type"], err
    assert "param" in err, err
    assert err.get("code") == code, f"expected error code {code}: {err}"


class SSEReader:
    """Reads an open SSE response's raw bytes incrementally. It keeps the byte iterator alive on purpose: dropping a
    half-consumed httpx iterator closes the connection, a hang-up the test did not mean to make yet."""

    def __init__(self, resp: httpx.Response):
        self._chunks = resp.iter_raw()
        self.buf = b""

    def read_until(self, done: Callable[[list], bool], timeout: float = 20.0) -> list:
        """Read until `done(events so far)`; returns the parsed events (framing checked)."""
        deadline = time.monotonic() + timeout
        while True:
            events = parse_payloads(split_sse(self.buf)[0])
            if done(events):
                return events
            assert time.monotonic() < deadline, f"stream condition not met within {timeout}s; events: {events[-3:]}"
            chunk = next(self._chunks, None)
            assert chunk is not None, f"stream ended early: {self.buf[-300:]!r}"
            self.buf += chunk

    def read_events(self, count: int) -> list:
        return self.read_until(lambda events: len(events) >= count)


def data_chunks(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and "error" not in e]


def finish_reasons(events: list) -> list[str]:
    return [c["finish_reason"] for e in data_chunks(events) for c in e.get("choices", ()) if c.get("finish_reason")]


def completion_body(max_tokens: int, *, stream: bool, **extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
            **extra}


def chat_body(max_tokens: int, *, stream: bool, **extra) -> dict:
    return {"messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
            **extra}


def generated(server: InProcessServer) -> int:
    return server.engine.stats().generation_tokens_total


def assert_aborted_promptly(server: InProcessServer, tokens_before: int, max_total_tokens: int) -> None:
    """After a hang-up: idle (0 running, 0 waiting, every KV block free) within 10 s, far fewer tokens generated
    than the request asked for, and no request left in flight in the HTTP layer."""
    start = time.monotonic()
    server.wait_idle(timeout=10)
    elapsed = time.monotonic() - start
    made = generated(server) - tokens_before
    assert made < max_total_tokens, (f"{made} tokens were generated after the hang-up: the request ran to its end "
                                     f"({max_total_tokens}) instead of being aborted (idle after {elapsed:.1f}s)")
    state = server.app.state.ctx.state
    wait_until(lambda: state.in_flight == 0, 5, "the server's in-flight count to drop to 0")


class StreamReader(threading.Thread):
    """Reads one streamed request to its end in the background, keeping the raw body bytes and when it ended."""

    def __init__(self, url: str, path: str, body: dict, *, started_after: int = 3, deadline_s: float = 60.0):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.started_after = started_after
        self.deadline_s = deadline_s
        self.raw = b""
        self.status: int | None = None
        self.content_type = ""
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.arrivals: list[tuple[float, int]] = []  # (when, len(raw) after it) for every chunk read
        self.started = threading.Event()  # set once `started_after` events arrived (or the read ended)

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        try:
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(15.0)) as client:
                with client.stream("POST", self.path, json=self.body) as resp:
                    self.status = resp.status_code
                    self.content_type = resp.headers.get("content-type", "")
                    for chunk in resp.iter_raw():
                        self.raw += chunk
                        self.arrivals.append((time.monotonic(), len(self.raw)))
                        if self.raw.count(b"\n\n") >= self.started_after:
                            self.started.set()
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"stream still running after {self.deadline_s}s")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def error_gap(self) -> float:
        """Seconds between the last chunk before the error event and the chunk that carried it."""
        at = self.raw.index(b'data: {"error"')
        before = [when for when, size in self.arrivals if size <= at]
        after = [when for when, size in self.arrivals if size > at]
        assert before and after, "no data arrived before the error event"
        return after[0] - before[-1]

    def error_arrived_at(self) -> float:
        at = self.raw.index(b'data: {"error"')
        return next(when for when, size in self.arrivals if size > at)

    def finish(self, timeout: float) -> list:
        """Wait for the end of the stream and return its events, parsed with the framing checked."""
        self.join(timeout)
        assert not self.is_alive(), f"stream still open {timeout}s later"
        assert self.error is None, f"stream read failed: {self.error!r}; got {self.raw[-300:]!r}"
        assert self.status == 200, (self.status, self.raw[:300])
        assert self.content_type.startswith("text/event-stream"), self.content_type
        return parse_complete_sse(self.raw)


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a plain socket and return it without reading the answer."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data)
    return sock


def nothing_received(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)  # data (an answer) or b"" (the server closed the connection)
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


# ---- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def server(ckpt):
    """Shared by the disconnect tests; each starts from (and checks for) an idle engine."""
    with InProcessServer(ckpt, max_model_len=LONG_LEN, num_kv_blocks=8192) as srv:
        yield srv


@pytest.fixture
def idle_server(server):
    server.wait_idle(timeout=15)
    return server


# ---- client disconnects ----------------------------------------------------------------------------------------------

def test_stream_disconnect_aborts_request_and_frees_kv(idle_server):
    server = idle_server
    before = generated(server)
    client = server.client(timeout=httpx.Timeout(15.0))
    try:
        with client.stream("POST", "/v1/completions", json=completion_body(LONG_TOKENS, stream=True)) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            sse = SSEReader(resp)  # kept referenced: the connection stays open until client.close()
            events = sse.read_events(3)
            assert all(e != "[DONE]" and "error" not in e for e in events), events
            assert [e["object"] for e in events] == ["text_completion"] * len(events)
            stats = server.engine.stats()
            assert stats.num_running == 1, stats
            assert server.engine.engine.core.pool.num_free < server.engine.engine.core.pool.num_blocks
    finally:
        client.close()  # the response was not read to its end, so its connection is closed, not pooled
    assert_aborted_promptly(server, before, LONG_TOKENS)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion_body(LONG_TOKENS, stream=False)),
    ("/v1/chat/completions", chat_body(LONG_TOKENS, stream=False)),
], ids=["completions", "chat"])
def test_non_stream_disconnect_aborts_request_and_frees_kv(idle_server, path, body):
    server = idle_server
    before = generated(server)
    sock = raw_request(server.url, path, body)
    try:
        wait_until(lambda: server.engine.stats().num_running == 1, 10, "the request to be running")
        assert server.engine.engine.core.pool.num_free < server.engine.engine.core.pool.num_blocks
        assert nothing_received(sock), "the server answered before the request could have finished"
    finally:
        sock.close()
    assert_aborted_promptly(server, before, LONG_TOKENS)


def test_stream_disconnect_aborts_every_prompt_and_sample(idle_server):
    """n=3 samples of 2 prompts: 6 sequences in 2 engine requests, all aborted by one hang-up."""
    server = idle_server
    before = generated(server)
    body = {**completion_body(LONG_TOKENS, stream=True), "prompt": [PROMPT, "The sky is"], "n": 3}
    client = server.client(timeout=httpx.Timeout(15.0))
    try:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200

            def indexes(events: list) -> set[int]:
                return {c["index"] for e in data_chunks(events) for c in e["choices"]}

            sse = SSEReader(resp)  # kept referenced: the connection stays open until client.close()
            events = sse.read_until(lambda ev: indexes(ev) == set(range(6)))
            assert all(c["finish_reason"] is None for e in events for c in e["choices"]), events
            stats = server.engine.stats()
            assert stats.num_running == 2, stats
    finally:
        client.close()
    assert_aborted_promptly(server, before, LONG_TOKENS)


def test_chat_stream_disconnect_aborts_request_and_frees_kv(idle_server):
    server = idle_server
    before = generated(server)
    client = server.client(timeout=httpx.Timeout(15.0))
    try:
        with client.stream("POST", "/v1/chat/completions", json=chat_body(LONG_TOKENS, stream=True)) as resp:
            assert resp.status_code == 200
            sse = SSEReader(resp)  # kept referenced: the connection stays open until client.close()
            events = sse.read_events(4)
            assert events[0]["object"] == "chat.completion.chunk"
            assert events[0]["choices"][0]["delta"].get("role") == "assistant"
            assert all(e["choices"][0]["finish_reason"] is None for e in events), events
            stats = server.engine.stats()
            assert stats.num_running == 1, stats
    finally:
        client.close()
    assert_aborted_promptly(server, before, LONG_TOKENS)


# ---- overload --------------------------------------------------------------------------------------------------------

def test_overload_gives_429_with_retry_after_and_accepted_requests_complete(ckpt):
    """16 simultaneous requests against 1 batch slot and a waiting queue of 2: some are refused with 429 (Retry-After,
    OpenAI error shape), none fails otherwise, and every accepted one generates its full max_tokens."""
    max_tokens, clients = 150, 16
    with InProcessServer(ckpt, max_model_len=1024, max_num_seqs=1, server_kwargs={"max_queued_requests": 2}) as srv:
        barrier = threading.Barrier(clients, timeout=30)
        results: list[dict | None] = [None] * clients

        def fire(i: int) -> None:
            stream = i % 2 == 1
            body = completion_body(max_tokens, stream=stream,
                                   **({"stream_options": {"include_usage": True}} if stream else {}))
            result: dict = {"stream": stream}
            try:
                with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(30.0)) as client:
                    barrier.wait()
                    with client.stream("POST", "/v1/completions", json=body) as resp:
                        raw = resp.read()
                    result.update(status=resp.status_code, headers=resp.headers, raw=raw)
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["exc"] = exc
            results[i] = result

        threads = [threading.Thread(target=fire, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request did not finish within 60 s"
        failed = [r for r in results if r is None or "exc" in r]
        assert not failed, f"client errors: {failed}"

        statuses = sorted(r["status"] for r in results)
        assert set(statuses) <= {200, 429}, f"statuses other than 200/429: {statuses}"
        assert statuses.count(429) >= 1, f"no request was refused: {statuses}"
        assert statuses.count(200) >= 1, f"no request was accepted: {statuses}"
        for r in results:
            if r["status"] == 429:
                retry_after = r["headers"].get("retry-after")
                assert retry_after is not None and retry_after.isdigit(), f"Retry-After: {retry_after!r}"
                assert_openai_error(json.loads(r["raw"]), 429)
            elif r["stream"]:
                events = parse_complete_sse(r["raw"])
                assert not any(isinstance(e, dict) and "error" in e for e in events), events
                assert finish_reasons(events) == ["length"]
                usage = [e["usage"] for e in data_chunks(events) if e.get("usage")]
                assert usage and usage[-1]["completion_tokens"] == max_tokens, usage
            else:
                body = json.loads(r["raw"])
                assert body["choices"][0]["finish_reason"] == "length", body
                assert body["usage"]["completion_tokens"] == max_tokens, body["usage"]
        srv.wait_idle(timeout=15)


# ---- graceful drain on SIGTERM / SIGINT ------------------------------------------------------------------------------

def _long_stream_server(ckpt, shutdown_timeout: float, fault: str | None = None) -> ServerProcess:
    return ServerProcess(ckpt, "--max-model-len", str(LONG_LEN), "--shutdown-timeout", str(shutdown_timeout),
                         fault=fault, startup_timeout=90)


def _wait_for_health_503(client: httpx.Client, timeout: float = 5.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get("/health")
        if resp.status_code == 503 or time.monotonic() > deadline:
            return resp
        time.sleep(0.02)


def _assert_ends_with_error_event(events: list) -> dict:
    """`data: {"error": ...}` then `data: [DONE]`; returns the error."""
    assert len(events) >= 2 and isinstance(events[-2], dict) and "error" in events[-2], \
        f"no error event before [DONE]; last events: {events[-3:]}"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, errors
    return events[-2]


def test_sigterm_drain_refuses_new_work_then_ends_long_stream_with_error(ckpt):
    shutdown_timeout = 4.0
    with _long_stream_server(ckpt, shutdown_timeout) as proc:
        reader = StreamReader(proc.url, "/v1/completions", completion_body(LONG_TOKENS, stream=True))
        reader.start()
        assert reader.started.wait(30) and reader.error is None and reader.status == 200, reader.error
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)

        with proc.client(timeout=httpx.Timeout(5.0)) as client:
            health = _wait_for_health_503(client)
            assert health.status_code == 503, "/health did not turn 503 after SIGTERM"
            assert_openai_error(health.json(), 503)
            refused = client.post("/v1/completions", json=completion_body(4, stream=False))
            assert refused.status_code == 503, refused.text
            assert_openai_error(refused.json(), 503)
            refused_chat = client.post("/v1/chat/completions", json=chat_body(4, stream=True))
            assert refused_chat.status_code == 503, refused_chat.text
            assert_openai_error(refused_chat.json(), 503)
        # All of the above happened during the drain: the in-flight stream is still being given its grace period.
        assert reader.is_alive(), "the 503s came only after the in-flight stream had ended, not during the drain"
        assert proc.proc.poll() is None, "the process exited before the drain timeout"

        events = reader.finish(timeout=shutdown_timeout + 15)
        took = reader.ended_at - sent
        assert shutdown_timeout - 0.5 <= took <= shutdown_timeout + 5, \
            f"stream ended {took:.1f}s after SIGTERM; the shutdown timeout is {shutdown_timeout}s"
        err = _assert_ends_with_error_event(events)["error"]
        assert isinstance(err["code"], int) and 500 <= err["code"] < 600, err
        assert_openai_error({"error": err}, err["code"])
        assert "length" not in finish_reasons(events)
        assert proc.wait(timeout=15) == 0, proc.log()[-3000:]


def test_sigterm_lets_a_short_stream_finish(ckpt):
    shutdown_timeout, max_tokens = 30.0, 1500
    with _long_stream_server(ckpt, shutdown_timeout) as proc:
        body = completion_body(max_tokens, stream=True, stream_options={"include_usage": True})
        reader = StreamReader(proc.url, "/v1/completions", body)
        reader.start()
        assert reader.started.wait(30) and reader.error is None and reader.status == 200, reader.error
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        with proc.client(timeout=httpx.Timeout(5.0)) as client:
            assert _wait_for_health_503(client).status_code == 503
        assert reader.is_alive(), "the stream finished before the drain began: the test proves nothing"

        events = reader.finish(timeout=shutdown_timeout + 10)
        assert not any(isinstance(e, dict) and "error" in e for e in events), events[-3:]
        assert finish_reasons(events) == ["length"]
        usage = [e["usage"] for e in data_chunks(events) if e.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == max_tokens, usage
        assert proc.wait(timeout=shutdown_timeout + 10) == 0, proc.log()[-3000:]
        exited = time.monotonic() - sent
        assert exited < shutdown_timeout, f"exit took {exited:.1f}s: the drain waited although nothing was in flight"


def test_sigint_drains_like_sigterm(ckpt):
    shutdown_timeout = 1.0
    with _long_stream_server(ckpt, shutdown_timeout) as proc:
        reader = StreamReader(proc.url, "/v1/chat/completions", chat_body(LONG_TOKENS, stream=True))
        reader.start()
        assert reader.started.wait(30) and reader.error is None and reader.status == 200, reader.error
        sent = time.monotonic()
        proc.signal(signal.SIGINT)
        events = reader.finish(timeout=shutdown_timeout + 15)
        assert reader.ended_at - sent <= shutdown_timeout + 5
        _assert_ends_with_error_event(events)
        assert "length" not in finish_reasons(events)
        assert proc.wait(timeout=15) == 0, proc.log()[-3000:]


def test_second_sigterm_ends_open_streams_properly_and_exits_fast_and_quietly(ckpt):
    """The drain would wait 60 s; a second SIGTERM ends the stream at once with its error event and [DONE], and the
    process exits 0 within seconds, logging no traceback (uvicorn used to print a CancelledError's 60 lines)."""
    with _long_stream_server(ckpt, shutdown_timeout=60.0) as proc:
        reader = StreamReader(proc.url, "/v1/completions", completion_body(LONG_TOKENS, stream=True))
        reader.start()
        assert reader.started.wait(30) and reader.error is None and reader.status == 200, reader.error
        proc.signal(signal.SIGTERM)
        with proc.client(timeout=httpx.Timeout(5.0)) as client:
            assert _wait_for_health_503(client).status_code == 503
        assert reader.is_alive(), "the stream ended on the first signal: the test proves nothing"
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        events = reader.finish(timeout=15)
        # Bounds far below the 60 s drain, with room for a loaded CI machine.
        assert reader.ended_at - sent < 5, f"the stream ended {reader.ended_at - sent:.1f}s after the second signal"
        err = _assert_ends_with_error_event(events)["error"]
        assert_openai_error({"error": err}, 503)
        assert proc.wait(timeout=20) == 0, proc.log()[-3000:]
        assert time.monotonic() - sent < 15
        log = proc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert "received SIGTERM again: ending 1 open request now and exiting" in log


# ---- engine death ----------------------------------------------------------------------------------------------------

def _assert_dead_but_serving(proc: ServerProcess) -> None:
    with proc.client(timeout=httpx.Timeout(10.0)) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert_openai_error(health.json(), 503)
        for body in (completion_body(4, stream=False), completion_body(4, stream=True)):
            resp = client.post("/v1/completions", json=body)
            assert resp.status_code == 503, resp.text
            assert_openai_error(resp.json(), 503)
        resp = client.post("/v1/chat/completions", json=chat_body(4, stream=False))
        assert resp.status_code == 503, resp.text
        assert_openai_error(resp.json(), 503)
        assert client.get("/version").status_code == 200
        assert client.get("/v1/models").status_code == 200
    assert proc.proc.poll() is None, "the server process exited after the engine died"


def test_engine_death_ends_stream_with_503_error_event(ckpt):
    with _long_stream_server(ckpt, 5, fault="raise@6") as proc:
        with proc.client(timeout=httpx.Timeout(10.0)) as client:
            assert client.get("/health").status_code == 200
        # The engine only runs the model while it has work, so the forwards are this request's: it is in flight when
        # the 6th one fails.
        reader = StreamReader(proc.url, "/v1/completions", completion_body(1000, stream=True), deadline_s=30)
        reader.start()
        events = reader.finish(timeout=30)
        err = _assert_ends_with_error_event(events)
        assert_openai_error(err, 503)
        assert "length" not in finish_reasons(events)
        _assert_dead_but_serving(proc)


def test_engine_death_fails_in_flight_non_stream_request_with_503(ckpt):
    with _long_stream_server(ckpt, 5, fault="raise@6") as proc:
        with proc.client(timeout=httpx.Timeout(20.0)) as client:
            assert client.get("/health").status_code == 200
            start = time.monotonic()
            resp = client.post("/v1/completions", json=completion_body(1000, stream=False))
            assert resp.status_code == 503, resp.text
            assert_openai_error(resp.json(), 503)
            assert time.monotonic() - start < 15
        _assert_dead_but_serving(proc)


def _in_flight(proc: ServerProcess) -> float:
    """attnserve_num_requests_running + waiting, read from /metrics."""
    with proc.client(timeout=httpx.Timeout(5.0)) as client:
        metrics = parse_metrics(client.get("/metrics").text)
    return metrics.value("attnserve_num_requests_running") + metrics.value("attnserve_num_requests_waiting")


def test_fault_in_model_forward_ends_every_in_flight_request_within_a_second(ckpt):
    streams, plain = 8, 4
    # The 600th forward fails: late enough that all 12 requests are running (they arrive within ~0.1 s), early enough
    # that none of them has finished its 3000 tokens.
    with _long_stream_server(ckpt, 5, fault="raise@600") as proc:
        readers = [StreamReader(proc.url, "/v1/completions" if i % 2 else "/v1/chat/completions",
                                (completion_body if i % 2 else chat_body)(3000, stream=True), deadline_s=60)
                   for i in range(streams)]
        ended: list[tuple[int, float, dict]] = []

        def post(i: int) -> None:
            with proc.client(timeout=httpx.Timeout(60.0)) as client:
                resp = client.post("/v1/completions", json=completion_body(3000, stream=False))
                ended.append((resp.status_code, time.monotonic(), resp.json()))

        posters = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(plain)]
        for thread in [*readers, *posters]:
            thread.start()
        wait_until(lambda: _in_flight(proc) == streams + plain, 30, "all requests to be in flight")
        for reader in readers:
            events = reader.finish(timeout=60)
            err = _assert_ends_with_error_event(events)
            assert_openai_error(err, 503)
            assert "injected fault" in err["error"]["message"], err
            assert reader.error_gap() <= 1.0, f"the error came {reader.error_gap():.2f}s after the last token"
        for thread in posters:
            thread.join(60)
        assert len(ended) == plain
        for status, _, body in ended:
            assert status == 503, body
            assert_openai_error(body, 503)
        ends = [reader.error_arrived_at() for reader in readers] + [when for _, when, _ in ended]
        assert max(ends) - min(ends) <= 1.0, f"the in-flight requests ended over {max(ends) - min(ends):.2f}s"
        with proc.client(timeout=httpx.Timeout(10.0)) as client:
            health = client.get("/health")
            assert "injected fault" in health.json()["error"]["message"], health.text
            assert client.get("/metrics").status_code == 200, "the dead server must still be scrapable"
        _assert_dead_but_serving(proc)
        # Its supervisor restarts it by stopping it: it must exit cleanly, and at once.
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.log()[-3000:]
        assert time.monotonic() - start < 10


def test_watchdog_reports_a_stalled_engine_loop_as_dead(ckpt):
    timeout = 1.5
    # The 3rd forward hangs for a minute, as on a hung device; the watchdog must not wait for it.
    with ServerProcess(ckpt, "--max-model-len", "512", "--engine-watchdog-timeout", str(timeout),
                       fault="stall@3:60", startup_timeout=90) as proc:
        with proc.client(timeout=httpx.Timeout(10.0)) as client:
            assert client.get("/health").status_code == 200
        reader = StreamReader(proc.url, "/v1/completions", completion_body(200, stream=True), started_after=1,
                              deadline_s=30)
        reader.start()
        events = reader.finish(timeout=30)
        err = _assert_ends_with_error_event(events)
        assert_openai_error(err, 503)
        assert "watchdog" in err["error"]["message"], err
        assert timeout - 0.1 <= reader.error_gap() <= timeout + 3, f"error after {reader.error_gap():.2f}s"
        with proc.client(timeout=httpx.Timeout(10.0)) as client:
            health = client.get("/health")
            assert health.status_code == 503 and "stalled" in health.json()["error"]["message"], health.text
        _assert_dead_but_serving(proc)
        assert "engine loop stalled" in proc.log()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.log()[-3000:]


def test_sigterm_under_load_finishes_or_errors_every_accepted_request(ckpt):
    """24 requests of both kinds on both routes, half short (they finish within the drain) and half too long to."""
    shutdown_timeout = 3.0
    with _long_stream_server(ckpt, shutdown_timeout) as proc:
        results: dict[int, tuple] = {}

        def run(i: int) -> None:
            stream, chat, short = i % 2 == 0, i % 4 < 2, i % 3 == 0
            tokens = 64 if short else LONG_TOKENS
            body = (chat_body if chat else completion_body)(tokens, stream=stream)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            try:
                with httpx.Client(base_url=proc.url, timeout=httpx.Timeout(60.0)) as client:
                    resp = client.post(path, json=body)
                    results[i] = (stream, tokens, resp.status_code, resp.content)
            except httpx.HTTPError as exc:
                results[i] = (stream, tokens, None, repr(exc))

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(24)]
        for thread in threads:
            thread.start()
        wait_until(lambda: _in_flight(proc) == 24, 30, "all 24 requests to be in flight")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(shutdown_timeout + 30)
        assert proc.wait(timeout=30) == 0, proc.log()[-3000:]
        assert time.monotonic() - sent <= shutdown_timeout + 10
    assert len(results) == 24
    finished = errored = 0
    for i, (stream, tokens, status, content) in sorted(results.items()):
        assert status is not None, f"request {i} lost its connection instead of an answer: {content}"
        if stream:
            assert status == 200, (i, content[:300])
            events = parse_complete_sse(content)
            if any(isinstance(e, dict) and "error" in e for e in events):
                assert_openai_error(_assert_ends_with_error_event(events), 503)
                errored += 1
            else:
                assert finish_reasons(events) == ["length"], (i, events[-3:])
                finished += 1
        elif status == 200:
            body = json.loads(content)
            assert body["usage"]["completion_tokens"] == tokens, body["usage"]
            finished += 1
        else:
            assert status == 503, (i, content[:300])
            assert_openai_error(json.loads(content), 503)
            errored += 1
        if tokens == 64:  # short ones have ample time within the drain
            assert status == 200 and b'"error"' not in content, (i, content[-300:])
    assert finished == 8 and errored == 16, (finished, errored)
