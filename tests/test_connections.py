"""Connections that send no request are closed (issue 24, finding 1): new and kept-alive ones that send nothing, and
ones that send a request head too slowly; and past --max-connections new connections are closed at once. Requests
keep being served meanwhile."""

from __future__ import annotations

import resource
import socket
import time

import pytest

from server_process import InProcessServer

HEAD_TIMEOUT = 1.0
IDLE = 500  # the count of idle sockets
MAX_CONNECTIONS = IDLE + 20  # room for them, the slow one and the test's own client
# Both ends of every connection live in this process (the server runs in a thread of it).
FDS_NEEDED = 2 * MAX_CONNECTIONS + 200


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FDS_NEEDED:
        if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
            pytest.skip(f"needs {FDS_NEEDED} file descriptors; the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def server(make_ckpt):
    kwargs = {"request_head_timeout_s": HEAD_TIMEOUT, "max_connections": MAX_CONNECTIONS}
    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=32, server_kwargs=kwargs) as srv:
        yield srv


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes the connection within `within` seconds (recv sees EOF or a reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_are_closed_while_requests_are_served(server):
    idle = [connect(server) for _ in range(IDLE)]
    slow = connect(server)
    start = time.monotonic()
    slow_closed_after = None
    with server.client() as http:
        # A request head trickling in, one byte every 0.2 s, never completes within the timeout.
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):  # the server closed it
                slow_closed_after = time.monotonic() - start
                break
            time.sleep(0.2)
            assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert slow_closed_after is not None and HEAD_TIMEOUT <= slow_closed_after < 3 * HEAD_TIMEOUT
    for sock in idle:
        assert closed_by_server(sock, within=2 * HEAD_TIMEOUT)
        sock.close()
    slow.close()
    assert time.monotonic() - start < 5 * HEAD_TIMEOUT


def test_a_kept_alive_connection_gets_the_same_timeout_for_its_next_head(server):
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /hea")  # the next head starts and stalls: uvicorn's keep-alive timer no longer runs
    assert closed_by_server(sock, within=3 * HEAD_TIMEOUT)
    sock.close()


def test_connections_past_the_cap_are_closed_at_once_and_service_recovers(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # all accepted
    extra = connect(server)
    assert closed_by_server(extra, within=0.5)
    extra.close()
    for sock in held:
        sock.close()
    time.sleep(0.2)
    with server.client() as http:
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
