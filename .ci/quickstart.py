#!/usr/bin/env python3
"""The README's quickstart, run as a new user runs it, on the checkout CI made: `make serve` (which installs the
runtime dependencies only, as a fresh clone does), wait for /health, send the README's own curl command, check
that it streams completion chunks and ends with `data: [DONE]`, then stop the server with SIGTERM and require
exit status 0. Every wait is bounded; on a failure the server's last log lines are printed.

Standard library only: it runs with the system python3, before any venv exists.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEALTH_URL = "http://127.0.0.1:8000/health"
START_TIMEOUT_S = 900  # creating .venv and installing torch and the rest, then loading the demo model
CURL_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
LOG_TAIL_LINES = 60


class QuickstartError(Exception):
    pass


def readme_commands() -> tuple[str, str]:
    """(the quickstart's serve command, the curl command), read from README.md so the check follows the text."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    serve = next((line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                  if line.startswith("make serve")), None)
    curl = next((block.strip() for block in blocks if block.lstrip().startswith("curl -N")), None)
    if serve != "make serve" or curl is None:
        raise QuickstartError("README.md must give `make serve` and a `curl -N ...` block in ```bash fences")
    return serve, curl


def wait_healthy(server: subprocess.Popen) -> float:
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if server.poll() is not None:
            raise QuickstartError(f"`make serve` exited with status {server.returncode} before /health answered")
        try:
            with urllib.request.urlopen(HEALTH_URL, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise QuickstartError(f"/health did not answer 200 within {START_TIMEOUT_S} s")


def check_stream(output: str) -> str:
    """The text the stream carried; raises unless it is JSON chunks with text, then `data: [DONE]` last."""
    events = [line[len("data: "):] for line in output.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise QuickstartError(f"the stream did not end with `data: [DONE]`; it was:\n{output[-2000:]}")
    chunks = [json.loads(event) for event in events[:-1]]
    if not chunks or any(chunk.get("object") != "text_completion" for chunk in chunks):
        raise QuickstartError(f"expected text_completion chunks before [DONE]; got:\n{output[-2000:]}")
    text = "".join(choice.get("text", "") for chunk in chunks for choice in chunk.get("choices", []))
    if not text.strip():
        raise QuickstartError("the stream's chunks carried no text")
    return text


def server_process(make_pid: int) -> int:
    """The `python -m server` process under `make serve` (make may run it directly or through a shell)."""
    frontier, seen = [make_pid], []
    while frontier:
        pid = frontier.pop()
        seen.append(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.exists():
            frontier += [int(c) for c in children.read_text().split()]
    for pid in seen:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"-m" in cmdline and b"server" in cmdline:
            return pid
    raise QuickstartError("could not find the `python -m server` process under `make serve`")


def print_tail(log_path: Path) -> None:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    print(f"--- last {min(LOG_TAIL_LINES, len(lines))} lines of the `make serve` output ---", file=sys.stderr)
    print("\n".join(lines[-LOG_TAIL_LINES:]), file=sys.stderr)


def main() -> int:
    serve_command, curl_command = readme_commands()
    log_path = Path(tempfile.mkdtemp(prefix="attnserve-quickstart-")) / "serve.log"
    with open(log_path, "wb") as log:
        # Its own session, so that a failure can stop make, pip and the server together.
        server = subprocess.Popen(serve_command.split(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        took = wait_healthy(server)
        print(f"quickstart: `{serve_command}` answered /health after {took:.0f} s")
        curl = subprocess.run(["bash", "-c", curl_command], cwd=ROOT, capture_output=True, text=True,
                              timeout=CURL_TIMEOUT_S)
        if curl.returncode != 0:
            raise QuickstartError(f"the README's curl command exited {curl.returncode}: {curl.stderr.strip()}")
        text = check_stream(curl.stdout)
        print(f"quickstart: the README's curl streamed {curl.stdout.count('data: ') - 1} chunks and [DONE]: "
              f"{text!r}")
        os.kill(server_process(server.pid), signal.SIGTERM)
        status = server.wait(timeout=STOP_TIMEOUT_S)
        if status != 0:
            raise QuickstartError(f"after SIGTERM, `make serve` exited with status {status}, not 0")
        print("quickstart: SIGTERM stopped the server with exit status 0")
        return 0
    except (QuickstartError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"quickstart: FAILED: {exc}", file=sys.stderr)
        print_tail(log_path)
        return 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
