"""How long a short request waits beside one request that fills the engine, under each scheduling policy
(docs/reliability.md, "One request no longer starves the rest").

    python -m benchmarks.fairness                      # 256 prompts x n=16 x 256 tokens beside max_tokens 8
    python -m benchmarks.fairness --policies fair --complete-big

For each policy it starts `python -m server` with the demo model (eager, so start-up takes seconds), sends the big
completion request, waits until it fills the running batch and has samples waiting, then sends the short request and
times it (up to --short-timeout; longer is reported as such), and the same short request again on the idle server
for reference. Then it hangs up on the big request, or with --complete-big waits for it and reports its tokens and
time.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.serve_compare import Server, free_port

SHORT = {"prompt": "import os\n", "max_tokens": 8, "temperature": 0.0}


def waiting_requests(http: httpx.Client) -> float:
    found = re.search(r"^[\w:]*num_requests_waiting(?:\{[^}]*\})? (\S+)$", http.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def timed_short(http: httpx.Client, timeout: float) -> float | None:
    start = time.perf_counter()
    try:
        r = http.post("/v1/completions", json=SHORT, timeout=timeout)
    except httpx.TimeoutException:
        return None
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def run_policy(policy: str, args, tmp: Path) -> dict:
    port = free_port()
    server = Server(policy, [sys.executable, "-m", "server", "--port", str(port), "--enforce-eager",
                             "--scheduling-policy", policy], port, {}, tmp / f"{policy}.log")
    result: dict = {"policy": policy}
    try:
        with httpx.Client(base_url=server.base_url, timeout=None) as http:
            result["idle_s"] = timed_short(http, args.short_timeout)
            big = {"prompt": [f"def f{i}(x):" for i in range(args.prompts)], "n": args.n,
                   "max_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
            big_client = httpx.Client(base_url=server.base_url, timeout=None)
            done: dict = {}

            def send_big():
                start = time.perf_counter()
                try:
                    r = big_client.post("/v1/completions", json=big)
                    done["status"], done["seconds"] = r.status_code, time.perf_counter() - start
                    if r.status_code == 200:
                        done["tokens"] = r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError as exc:  # we hung up on it
                    done["status"] = type(exc).__name__

            sender = threading.Thread(target=send_big, daemon=True)
            sender.start()
            while waiting_requests(http) == 0:
                time.sleep(0.2)
            time.sleep(args.settle)  # let it run a while: the short one arrives mid-generation
            result["beside_big_s"] = timed_short(http, args.short_timeout)
            if args.complete_big:
                sender.join()
                result["big"] = done
            else:
                big_client.close()
                sender.join(30)
                result["big"] = {"status": "closed by the benchmark"}
    finally:
        server.stop()
    return result


def fmt(seconds: float | None, timeout: float) -> str:
    return f"> {timeout:.0f} s (gave up)" if seconds is None else f"{seconds:.2f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["fcfs", "fair"], choices=["fcfs", "fair", "priority"])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--settle", type=float, default=5.0, help="seconds between the big request filling the engine "
                                                             "and the short one (default: 5)")
    p.add_argument("--short-timeout", type=float, default=120.0)
    p.add_argument("--complete-big", action="store_true", help="wait for the big request to finish")
    args = p.parse_args()
    print(f"big request: {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens; short: max_tokens 8")
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies:
            r = run_policy(policy, args, Path(tmp))
            print(f"{policy}: short request idle {fmt(r['idle_s'], args.short_timeout)}, beside the big one "
                  f"{fmt(r['beside_big_s'], args.short_timeout)}; big request: {r['big']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
