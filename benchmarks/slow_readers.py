"""What streams whose clients never read cost the server: memory, engine time, and what is left when they hang up
(docs/reliability.md, "Clients that stop reading").

    python -m benchmarks.slow_readers             # 32 streams, n=16, logprobs=20, 30 s unread, then RST
    python -m benchmarks.slow_readers --model DIR --max-model-len 32768 --max-tokens 16000 --seconds 60

With the demo model (max_model_len 512) the loopback socket buffers, up to 4 MB a connection, take in most of a
stream before it ends; a small model with a long context shows the server's own bound, as tests/test_backpressure.py
does (its checkpoint: tests/checkpoints.py make_checkpoint("llama", DIR)).

Starts `python -m server` with the demo model (eager) and --stream-write-timeout well above the unread period when
the server has that flag. Each stream is a raw socket that sends one streamed completion and never reads. It prints
the server's RSS and the generated-token counter every 5 s, then closes every socket with RST and prints, after 1 s,
the KV blocks in use, the aborts and 499s in /metrics, and the RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.long_prompts import rss_mib
from benchmarks.serve_compare import Server, free_port


def metric(text: str, name: str, label: str = "") -> float:
    pattern = rf"^[\w:]*{name}(?:\{{[^}}]*{label}[^}}]*\}})? (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def open_unread_stream(port: int, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly, as a stalled reader's would
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--logprobs", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--model", default=None, help="a model directory (default: the demo model)")
    p.add_argument("--max-model-len", type=int, default=None)
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--enforce-eager"]
    if args.model:
        cmd += ["--model", args.model, "--num-kv-blocks", "16384"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True).stdout
    if "--stream-write-timeout" in help_text:
        cmd += ["--stream-write-timeout", str(args.seconds * 4)]
    body = {"prompt": "def main():", "n": args.n, "logprobs": args.logprobs, "max_tokens": args.max_tokens,
            "temperature": 1.0,
            "ignore_eos": True, "stream": True}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("attnserve", cmd, port, {}, Path(tmp) / "server.log")
        try:
            with httpx.Client(base_url=server.base_url, timeout=60) as http:
                http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 8})  # warm-up
                rss0 = rss_mib(server.proc.pid)
                tokens0 = metric(http.get("/metrics").text, "generation_tokens_total")
                print(f"before: RSS {rss0} MiB")
                socks = [open_unread_stream(port, body) for _ in range(args.streams)]
                start = time.monotonic()
                while (elapsed := time.monotonic() - start) < args.seconds:
                    time.sleep(5)
                    text = http.get("/metrics").text
                    print(f"{elapsed + 5:4.0f} s: RSS {rss_mib(server.proc.pid)} MiB (+{rss_mib(server.proc.pid) - rss0}),"
                          f" tokens generated {metric(text, 'generation_tokens_total') - tokens0:.0f},"
                          f" running {metric(text, 'num_requests_running'):.0f},"
                          f" waiting {metric(text, 'num_requests_waiting'):.0f}", flush=True)
                for sock in socks:  # hang up with RST, unread data and all
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                time.sleep(1)
                text = http.get("/metrics").text
                print(f"1 s after the hang-ups: KV in use {metric(text, 'kv_cache_usage_perc'):.3f}, "
                      f"aborts {metric(text, 'request_success_total', 'abort'):.0f}, "
                      f"499s {metric(text, 'http_requests_total', '499'):.0f}, running "
                      f"{metric(text, 'num_requests_running'):.0f}, RSS {rss_mib(server.proc.pid)} MiB")
        finally:
            server.stop()
        log = (Path(tmp) / "server.log").read_text()
        print(f"server log: {log.count('socket.send() raised exception')} 'socket.send() raised exception' lines, "
              f"{log.count(' 499 ') + log.count('status=499')} lines with 499")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
