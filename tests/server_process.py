"""A real `python -m server` in a subprocess on a free loopback port, for live-server tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """Starts the server with `--port 0` and reads the URL it logs. Use as a context manager, or call stop()."""

    def __init__(self, model: Path | str | None, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0, fault: str | None = None):
        """`fault`: a tests/faulty_server.py spec (raise@N, stall@N:S) to inject into the model forward."""
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="attnserve-", suffix=".log", delete=False)
        server = ["-m", "server"] if fault is None else [str(Path(__file__).with_name("faulty_server.py")), fault]
        cmd = [sys.executable, *server, "--host", "127.0.0.1", "--port", "0", *args]
        if model is not None:
            cmd += ["--model", str(model)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        self.url = self._wait_for_url(startup_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def rss_kib(self) -> int:
        """The server's resident memory (VmRSS), in KiB (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.proc.pid}")

    def metrics(self) -> dict[str, float]:
        """/metrics as name -> value, with `{finished_reason}` after the name where a series has that label."""
        from clients.prometheus import parse_metrics

        with self.client() as http:
            parsed = parse_metrics(http.get("/metrics").text)
        out = {}
        for name, samples in parsed.items():
            for sample in samples:
                reason = sample.labels.get("finished_reason")
                out[f"{name}{{{reason}}}" if reason else name] = sample.value
        return out

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        os.unlink(self.log_file.name)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class InProcessServer:
    """The app on a real uvicorn, in a thread of the test process, so a test can also look inside the engine
    (running requests, KV blocks in use) while it talks HTTP to it."""

    def __init__(self, model: Path | str, *, served_model_name: str = "test-model", server_kwargs: dict | None = None,
                 wrap=None, **engine_kwargs):
        """`wrap(app) -> app` puts ASGI middleware of the test's own in front (e.g. to inject faults)."""
        import threading

        import uvicorn

        from engine.async_engine import AsyncEngine
        from server.app import build_app
        from server.config import ServerConfig
        from server.serve import bind_socket, uvicorn_config

        self.engine = AsyncEngine.from_args(str(model), **engine_kwargs)
        config = ServerConfig(served_model_names=(served_model_name,), **(server_kwargs or {}))
        self.app = build_app(self.engine, config)
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        served = self.app if wrap is None else wrap(self.app)
        self.server = uvicorn.Server(uvicorn_config(served, config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request is running or waiting and every KV block is free; raises if that does not happen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0 and self.engine.engine.core.pool.num_free == \
                    self.engine.engine.core.pool.num_blocks:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle after {timeout}s: {self.engine.stats()}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.shutdown()
        self.sock.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def child_pids(pid: int) -> set[int]:
    """The live (not zombie) child processes of `pid` (Linux /proc)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return {p for p in pids if alive(p)}


def alive(pid: int) -> bool:
    """Does process `pid` exist and not as a zombie?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def address(proc: ServerProcess) -> tuple[str, int]:
    host, port = proc.url.removeprefix("http://").split(":")
    return host, int(port)


def open_stream(proc: ServerProcess, payload: dict, rcvbuf: int | None = None) -> socket.socket:
    """Send a streamed completion on a raw socket and read nothing."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connecting: it sizes the window
    sock.settimeout(30)
    sock.connect(address(proc))
    body = json.dumps({**payload, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def reset(sock: socket.socket) -> None:
    """Hang up with RST, as a killed client or a proxy timing out does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
