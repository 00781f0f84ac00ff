"""Clients that stop reading, and running out of file descriptors (issue 24, findings 1 and 2). The accept back-off and
its log are unit-tested; the rest runs on a real server process over loopback:

- at the descriptor limit, accept() failures make a line or two of log, not a storm, and service resumes once
  descriptors free up;
- a stream whose client never reads is aborted after --stream-write-timeout: 499 in the request log, an abort in
  /metrics, no KV block left in use;
- a client that reads part of a stream and resets the connection after generation ended is logged 499, without
  asyncio's "socket.send() raised exception." warnings.

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import resource
import socket
import sys
import time
from collections.abc import Callable

import pytest

from server.accept_errors import AcceptErrorLog, ListeningSocket
from server.cli import parse_serve_args
from server.config import ServerConfig
from server_process import ServerProcess, address, open_stream, reset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses prlimit")

WRITE_TIMEOUT = 2.0
LONG_LEN = 32768  # RoPE lets max_model_len exceed the checkpoint's 256 positions: streams that run for minutes


@pytest.fixture(scope="module")
def impatient(make_ckpt):
    """A server that gives up on a client after 2 s without reading."""
    with ServerProcess(make_ckpt("llama"), "--max-model-len", str(LONG_LEN), "--num-kv-blocks", "16384",
                       "--stream-write-timeout", str(WRITE_TIMEOUT), startup_timeout=90) as proc:
        yield proc


@pytest.fixture(scope="module")
def patient(make_ckpt):
    """A server with the default write timeout (60 s), for a client that reads nothing until generation ended."""
    with ServerProcess(make_ckpt("llama"), "--max-model-len", "256", "--num-kv-blocks", "4096",
                       startup_timeout=90) as proc:
        yield proc


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def request_lines(proc: ServerProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if "request finished" in line]


def test_the_stream_write_timeout_flag_takes_positive_seconds():
    assert parse_serve_args([]).stream_write_timeout == 60.0
    assert parse_serve_args(["--stream-write-timeout", "2.5"]).stream_write_timeout == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit):
            parse_serve_args(["--stream-write-timeout", bad])
    with pytest.raises(ValueError, match="stream_write_timeout_s must be > 0"):
        ServerConfig(served_model_names=("m",), stream_write_timeout_s=0)


def test_the_listening_socket_reports_one_resource_error_per_burst():
    with ListeningSocket() as sock:
        errors = iter([OSError(errno.EMFILE, "Too many open files")] * 3 + [OSError(errno.EINVAL, "other")])

        def failing_accept():
            raise next(errors)

        sock._accept = failing_accept
        with pytest.raises(OSError) as first:
            sock.accept()
        assert first.value.errno == errno.EMFILE  # asyncio sees this one: it backs off and retries in a second
        with pytest.raises(BlockingIOError):  # the rest of the same burst: "nothing to accept" ends asyncio's loop
            sock.accept()
        sock._reported_at -= 1.0  # asyncio's retry, a second later
        with pytest.raises(OSError) as retried:
            sock.accept()
        assert retried.value.errno == errno.EMFILE and not isinstance(retried.value, BlockingIOError)
        with pytest.raises(OSError) as other:
            sock.accept()
        assert other.value.errno == errno.EINVAL  # other errors pass unchanged


def test_accept_error_log_rate_limits_accept_failures_and_passes_other_reports_on(caplog):
    loop = asyncio.new_event_loop()
    passed_on = []
    loop.set_exception_handler(lambda _loop, context: passed_on.append(context["message"]))
    handler = AcceptErrorLog(loop, interval_s=0.2, max_connections=100)
    emfile = {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "Too many")}
    try:
        with caplog.at_level(logging.ERROR, logger="attnserve"):
            for _ in range(5):
                handler(loop, emfile)
            handler(loop, {"message": "Task exception was never retrieved", "exception": ValueError("x")})
            handler(loop, {"message": "Fatal write error on socket transport", "exception": OSError(errno.EMFILE, "")})
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and "accept() failed 1 time (EMFILE" in lines[0], lines
            assert "lower --max-connections (now 100)" in lines[0] and "ulimit -n" in lines[0]
            loop.run_until_complete(asyncio.sleep(0.4))  # the interval's end reports the rest of the burst
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 2 and "accept() failed 4 times in the last 0 s" in lines[1], lines
    finally:
        loop.close()
    assert passed_on == ["Task exception was never retrieved", "Fatal write error on socket transport"]


def test_accept_errors_at_the_descriptor_limit_are_a_line_not_a_storm(impatient):
    pid = impatient.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    log_before = len(impatient.log())
    try:
        with impatient.client() as probe:  # connected before the limit is hit: it must keep being served
            assert probe.get("/health").status_code == 200
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 20, hard))
            # 40 more than the server can take: the kernel completes them into the listen backlog, where they wait.
            held = [socket.create_connection(address(impatient), timeout=5) for _ in range(60)]
            wait_until(lambda: "cannot accept new connections" in impatient.log()[log_before:], 10,
                       "the accept-error line")
            started = time.monotonic()
            while time.monotonic() - started < 3:  # asyncio retries accept() every second meanwhile
                sent = time.monotonic()
                assert probe.get("/health").status_code == 200
                assert time.monotonic() - sent < 1.0
                time.sleep(0.25)
            for sock in held:
                sock.close()
        # Recovery needs no higher limit: closing the sockets frees the descriptors.
        with impatient.client(timeout=15) as http:
            assert http.get("/health").status_code == 200
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    log = impatient.log()[log_before:]
    accept_lines = [line for line in log.splitlines()
                    if "cannot accept new connections" in line or ("accept" in line and " asyncio" in line)]
    # The first failure's line, and maybe the next one's ten seconds on; before the fix, ~10,000 reports a second.
    assert 1 <= len(accept_lines) <= 2, accept_lines[:5]
    assert "ulimit -n" in accept_lines[0] and "EMFILE" in accept_lines[0], accept_lines[0]
    assert "out of system resource" not in log and "Traceback" not in log


def test_a_stream_nobody_reads_is_aborted_after_the_write_timeout(impatient):
    before = impatient.metrics()
    lines_before = len(request_lines(impatient))
    # Long (it would run for minutes) and bulky (64 events of about 1.5 KB a step, with 20 logprobs each), so the
    # socket buffers (about 4 MB on loopback, whatever the client's receive buffer) and then the transport's fill
    # within a few dozen steps. That takes 1-2 s on an idle 2-core machine, several times longer on a busy one.
    prompts = 4
    sock = open_stream(impatient, {"prompt": ["Once upon a time"] * prompts, "n": 16, "max_tokens": 8000,
                                   "ignore_eos": True, "logprobs": 20}, rcvbuf=4096)
    sent = time.monotonic()
    try:
        wait_until(lambda: len(request_lines(impatient)) > lines_before, WRITE_TIMEOUT + 40, "the request's log line",
                   every=0.1)
        took = time.monotonic() - sent
        (line,) = request_lines(impatient)[lines_before:]
        assert "status=499" in line and "finish_reason=abort" in line, line
        assert took >= WRITE_TIMEOUT, took
        assert re.search(r"closing the connection of 127\.0\.0\.1:\d+: its response has waited 2 s for it to read",
                         impatient.log()), impatient.log()[-2000:]
        # The engine request was aborted (not finished), and its KV blocks are free.
        wait_until(lambda: impatient.metrics()["attnserve_num_requests_running"] == 0, 5, "the engine to be idle")
        after = impatient.metrics()
        aborted = after["attnserve_request_success_total{abort}"] - before["attnserve_request_success_total{abort}"]
        assert aborted == prompts
        assert after["attnserve_kv_cache_usage_perc"] == 0
        assert after["attnserve_num_requests_waiting"] == 0
        # The client finds the connection closed: what was buffered for it, then EOF, without the end of the stream.
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received
    finally:
        sock.close()


def test_a_client_that_resets_after_generation_ended_is_logged_499_without_send_warnings(patient):
    before = patient.metrics()
    lines_before = len(request_lines(patient))
    # 10 prompts x n=16 x 200 tokens: 32,000 events of about 340 bytes (usage in every chunk), about 11 MB, of which
    # the socket buffers hold about 4 MB when the engine finishes (the client reads nothing until then); the rest is
    # queued in the server. Each engine request has at most 3,200 outputs waiting, under the engine's bound on
    # undelivered output (4,096), so the engine does finish.
    prompts = 10
    sock = open_stream(patient, {"prompt": ["def f(x):"] * prompts, "n": 16, "max_tokens": 200, "ignore_eos": True,
                                 "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    try:
        def engine_done() -> bool:
            now = patient.metrics()
            done = now["attnserve_request_success_total{length}"] - before["attnserve_request_success_total{length}"]
            return done == prompts
        wait_until(engine_done, 120, "the engine to finish the requests", every=0.25)
        assert not request_lines(patient)[lines_before:], "the response ended before the client read it"
        # Read some, so the server writes the queued events without pausing, then reset the connection mid-write.
        # (Before the fix: about 15,500 warnings in each of 3 runs, and status 200.)
        sock.settimeout(10)
        received = 0
        while received < 5_000_000:
            chunk = sock.recv(1 << 16)
            assert chunk, f"the server closed the connection after {received} bytes"
            received += len(chunk)
        reset(sock)
    finally:
        sock.close()
    wait_until(lambda: len(request_lines(patient)) > lines_before, 10, "the request's log line")
    (line,) = request_lines(patient)[lines_before:]
    assert "status=499" in line and "finish_reason=length" in line, line
    time.sleep(0.5)  # any warnings would have come with the writes, before the line
    assert "socket.send() raised exception" not in patient.log()
    # The engine had finished every request: they count under their finish reason, as in vLLM, not as aborts.
    after = patient.metrics()
    assert after["attnserve_request_success_total{abort}"] == before["attnserve_request_success_total{abort}"]
    assert after["attnserve_kv_cache_usage_perc"] == 0
