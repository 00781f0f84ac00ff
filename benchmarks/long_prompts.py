"""How fast a server refuses prompts far longer than its context, and what memory that leaves behind
(docs/reliability.md, "Over-long prompts are refused before they are tokenized").

    python -m benchmarks.long_prompts            # the demo model, --max-model-len 512, 50 requests of each kind

Starts `python -m server` (eager, so that start-up takes seconds), sends each kind of over-long request 50 times, one
at a time, and prints the median and slowest time to the 400 and the server's RSS after each kind (cumulative).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_compare import Server, free_port

KINDS = {
    "completion, 400 KB prompt": ("/v1/completions", {"prompt": "word " * 80_000, "max_tokens": 2}),
    "completion, 4 MB prompt": ("/v1/completions", {"prompt": "x" * 4_000_000, "max_tokens": 2}),
    "chat, one 400 KB message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 80_000}]}),
}


def rss_mib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("attnserve", [sys.executable, "-m", "server", "--port", str(port), "--enforce-eager",
                                      "--max-model-len", str(args.max_model_len)], port, {}, Path(tmp) / "server.log")
        try:
            with httpx.Client(base_url=server.base_url, timeout=120) as http:
                http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                print(f"RSS after one small request: {rss_mib(server.proc.pid)} MiB")
                for name, (route, body) in KINDS.items():
                    times = []
                    for _ in range(args.requests):
                        start = time.perf_counter()
                        status = http.post(route, json=body).status_code
                        times.append(time.perf_counter() - start)
                        assert status == 400, f"{name}: {status}"
                    times.sort()
                    print(f"{name}: median {times[len(times) // 2] * 1000:.0f} ms, slowest {times[-1] * 1000:.0f} ms;"
                          f" RSS {rss_mib(server.proc.pid)} MiB")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
