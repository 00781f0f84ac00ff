"""Soak test: many concurrent requests against a real `python -m server`, 30% of them dropped mid-flight, with a KV
pool small enough that sequences are preempted (and recomputed) all the time. Then it checks that nothing leaked:

- every request that was not cancelled finished with the right finish_reason and token counts (per choice where
  the response says it: logprobs give one entry per token), streams are well formed (one finish per choice, the
  usage chunk last, `[DONE]`), usage.prompt_tokens equals what /tokenize says;
- the completions that were not cancelled (greedy and seeded) give the same text as the offline engine (`LLM`)
  run afterwards on the same checkpoint with the same engine arguments;
- the engine ends idle: no running or waiting request, no KV block in use;
- the server's metrics equal the client's counts: requests by finish reason (cancelled = "abort"), HTTP statuses
  per route (200, and 499 for a non-streaming request whose client hung up), prompt tokens, request counts of
  the per-request histograms, no failures; and there were preemptions;
- the server's RSS (and its open file descriptors and threads) after the run stays within bounds of their values
  after a warm-up phase.

`tests/test_soak.py` runs it in CI with a fixed request count and seed. By hand, at any length:

    .venv/bin/python tests/soak.py --duration 600          # issue requests for 10 minutes, then check
    .venv/bin/python tests/soak.py --requests 5000 --concurrency 128 --seed 7

It exits 1 (after the summary) if any check failed. Every request's shape comes from (seed, request index) alone,
so a failing run can be replayed.

How cancellations are made to land while the request certainly still runs on the server (so the client's counts
compare exactly with the server's): a cancelled request asks for 150+ tokens with ignore_eos; a stream is closed
after its first 1-40 events (each arrives only once the request is in the engine), a non-streaming request 0.3-1.5 s
after its body was sent (the httpcore trace says when). No request in the last `concurrency` of a phase is
cancelled, so every cancelled one runs under full load. A cancel that still came too late (the whole response
arrived) is counted as completed, and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TESTS = Path(__file__).resolve().parent
for _path in (str(TESTS), str(TESTS.parent)):  # run as a script: tests/ (checkpoints, server_process) and the repo
    if _path not in sys.path:
        sys.path.insert(0, _path)

from checkpoints import PARITY_PROMPTS, make_checkpoint  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from clients.prometheus import Metrics, parse_metrics  # noqa: E402

MODEL_NAME = "soak-model"
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
CANCEL_MIN_TOKENS = 150  # a cancelled request asks for at least this many tokens
GREEDY_MAX_TOKENS = 32  # greedy requests stay within the checkpoints' verified greedy margin (PARITY_PROMPTS x 32)
M = "attnserve_"

# Words for prompts, some multi-byte so the detokenizer holds back partial characters in streams.
WORDS = ("the river stone valley flood delta water carries sand sea over years shape land through wide rich soil "
         "a of and to in is was it for on with as by at from they we you he she this that engineer panel found "
         "opened lighthouse keeper old village morning bread coffee café naïve façade "
         "東京 北京 天气 公园 🌧️ 🚀 α β γ 3 14 159 $4.50 €12 def return print ( ) : , . ?").split()


@dataclass
class SoakConfig:
    model: Path | str | None = None  # None: build the tiny random Llama checkpoint in a temporary directory
    requests: int | None = 1500  # issue exactly this many, or ...
    duration_s: float | None = None  # ... issue until this many seconds have passed (then `requests` is ignored)
    seed: int = 0
    concurrency: int = 96
    cancel_fraction: float = 0.30
    greedy_fraction: float = 0.20
    warmup_requests: int = 150  # RSS, fds and threads are measured after these (drained), and again at the end
    # Engine: a pool of 96 x 16 tokens against ~96 requests of up to 3 sequences each, so it runs dry and
    # sequences are preempted all the time.
    num_kv_blocks: int = 96
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    max_model_len: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    engine_seed: int = 0
    rss_tolerance: float = 0.10
    fd_slack: int = 8
    idle_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    max_offline_checks: int = 250  # completions compared with the offline engine
    progress: bool = False  # a line every 10 s

    def server_args(self) -> list[str]:
        return [
            "--served-model-name", MODEL_NAME, "--device", self.device, "--dtype", self.dtype,
            "--seed", str(self.engine_seed), "--num-kv-blocks", str(self.num_kv_blocks),
            "--block-size", str(self.block_size), "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens), "--max-model-len", str(self.max_model_len),
            "--enable-prefix-caching", "--max-queued-requests", str(max(4096, 4 * self.concurrency)),
            "--disable-log-requests", "--disable-log-stats", "--disable-access-log",
        ]

    def engine_kwargs(self) -> dict[str, Any]:
        """The same engine, offline."""
        return dict(device=self.device, dtype=self.dtype, seed=self.engine_seed, num_kv_blocks=self.num_kv_blocks,
                    block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
                    enable_prefix_caching=True)


# ---- the workload -----------------------------------------------------------------------------------------------

@dataclass
class Prompts:
    """Completion prompts and chat conversations, with their token counts as the server counts them."""

    completions: list[str]
    chats: list[list[dict[str, str]]]
    completion_tokens: list[int]  # prompt tokens of each
    chat_tokens: list[int]

    @staticmethod
    def build(seed: int) -> Prompts:
        rng = random.Random(f"prompts-{seed}")

        def words(lo: int, hi: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

        completions = list(PARITY_PROMPTS) + [words(1, 40) for _ in range(40)]
        chats = []
        for _ in range(32):
            conv = [{"role": "system", "content": words(2, 12)}] if rng.random() < 0.4 else []
            if rng.random() < 0.3:
                conv += [{"role": "user", "content": words(1, 8)}, {"role": "assistant", "content": words(1, 8)}]
            conv.append({"role": "user", "content": words(1, 25)})
            chats.append(conv)
        return Prompts(completions, chats, [], [])

    async def count_tokens(self, client: httpx.AsyncClient) -> None:
        async def count(body: dict) -> int:
            resp = await client.post("/tokenize", json={"model": MODEL_NAME, **body})
            resp.raise_for_status()
            return resp.json()["count"]

        self.completion_tokens = [await count({"prompt": p}) for p in self.completions]
        self.chat_tokens = [await count({"messages": m}) for m in self.chats]


@dataclass
class Plan:
    """One request: what is sent, what must come back, and whether (and when) the client drops it."""

    index: int
    route: str  # "completions" | "chat"
    stream: bool
    n: int
    greedy: bool
    max_tokens: int
    ignore_eos: bool
    logprobs: bool  # per-token entries in the response: exact token counts per choice
    continuous_usage: bool
    prompt_index: int
    prompt_tokens: int
    body: dict[str, Any]
    cancel_after_events: int | None = None  # stream: close after this many SSE events
    cancel_after_s: float | None = None  # non-stream: cancel this long after the body was sent

    @property
    def cancel(self) -> bool:
        return self.cancel_after_events is not None or self.cancel_after_s is not None

    def describe(self) -> str:
        kind = "stream" if self.stream else "non-stream"
        cancel = (f", cancel after {self.cancel_after_events} events" if self.cancel_after_events is not None else
                  f", cancel after {self.cancel_after_s:.2f}s" if self.cancel_after_s is not None else "")
        return (f"#{self.index} {self.route} {kind} n={self.n} max_tokens={self.max_tokens} "
                f"{'greedy' if self.greedy else 'seed=' + str(self.body.get('seed'))} ignore_eos={self.ignore_eos}"
                f"{cancel}")


def make_plan(cfg: SoakConfig, prompts: Prompts, index: int, cancel_p: float) -> Plan:
    """The request with this index; the same (seed, index, cancel_p) always gives the same request. cancel_p is the
    chance that it is cancelled (0 for the tail of a phase)."""
    rng = random.Random(f"plan-{cfg.seed}-{index}")
    route = "completions" if rng.random() < 0.55 else "chat"
    stream = rng.random() < 0.5
    n = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    cancel = rng.random() < cancel_p
    greedy = rng.random() < cfg.greedy_fraction
    logprobs = rng.random() < 0.4
    continuous_usage = stream and rng.random() < 0.25
    if route == "completions":
        # Greedy completions use the prompts whose greedy margins tests/checkpoints.py verifies, so they can be
        # compared with the offline engine exactly.
        pool = range(len(PARITY_PROMPTS)) if greedy and not cancel else range(len(prompts.completions))
        prompt_index = rng.choice(pool)
        prompt_tokens = prompts.completion_tokens[prompt_index]
    else:
        prompt_index = rng.randrange(len(prompts.chats))
        prompt_tokens = prompts.chat_tokens[prompt_index]
    if cancel:
        max_tokens = rng.randint(CANCEL_MIN_TOKENS, cfg.max_model_len - prompt_tokens)
        ignore_eos = True
    else:
        # Mostly short; greedy ones at most GREEDY_MAX_TOKENS.
        max_tokens = min(rng.choice((4, 6, 8, 12, 16, 24, 32)), rng.randint(4, GREEDY_MAX_TOKENS))
        if not greedy and rng.random() < 0.15:
            max_tokens = rng.randint(48, min(128, cfg.max_model_len - prompt_tokens))  # grow into preemptions
        ignore_eos = rng.random() < 0.75
    body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": max_tokens, "n": n, "ignore_eos": ignore_eos,
                            "stream": stream}
    if greedy:
        body["temperature"] = 0.0
    else:
        body["temperature"] = round(rng.uniform(0.5, 1.3), 3)
        body["seed"] = rng.randrange(2**31)
        if rng.random() < 0.3:
            body["top_p"] = 0.9
    if stream:
        body["stream_options"] = {"include_usage": True, **({"continuous_usage_stats": True} if continuous_usage
                                                             else {})}
    if route == "completions":
        body["prompt"] = prompts.completions[prompt_index]
        if logprobs:
            body["logprobs"] = rng.choice((0, 1, 2))
    else:
        body["messages"] = prompts.chats[prompt_index]
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = rng.choice((0, 1, 2))
    plan = Plan(index, route, stream, n, greedy, max_tokens, ignore_eos, logprobs, continuous_usage, prompt_index,
                prompt_tokens, body)
    if cancel:
        if stream:
            plan.cancel_after_events = rng.randint(1, 40)
        else:
            plan.cancel_after_s = round(rng.uniform(0.3, 1.5), 3)
    return plan


# ---- one request ------------------------------------------------------------------------------------------------

@dataclass
class Result:
    plan: Plan
    outcome: str = "failed"  # "completed" | "cancelled" | "failed"
    late_cancel: bool = False  # meant to be cancelled, but the whole response arrived first
    status: int | None = None
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    tokens: list[int | None] = field(default_factory=list)  # per choice, when logprobs give them
    usage: dict | None = None
    events: int = 0
    tokens_seen: int = 0  # a cancelled stream: tokens it received (a lower bound of what the server generated)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.plan.describe()}: {text}")


def _choice_tokens(route: str, logprobs: Any) -> int:
    if logprobs is None:
        return 0
    return len(logprobs["tokens"]) if route == "completions" else len(logprobs["content"])


def check_usage(res: Result, usage: Any) -> None:
    plan = res.plan
    if not isinstance(usage, dict):
        res.problem(f"usage missing: {usage!r}")
        return
    res.usage = usage
    if usage.get("prompt_tokens") != plan.prompt_tokens:
        res.problem(f"usage.prompt_tokens {usage.get('prompt_tokens')} != {plan.prompt_tokens} from /tokenize")
    if usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0):
        res.problem(f"usage.total_tokens is not prompt + completion: {usage}")


def check_completed(res: Result) -> None:
    """Finish reasons and token counts of a request that ran to its end."""
    plan = res.plan
    if len(res.finish_reasons) != plan.n:
        res.problem(f"{len(res.finish_reasons)} choices, expected n={plan.n}")
        return
    allowed = {"length"} if plan.ignore_eos else {"length", "stop"}
    for j, (reason, tokens) in enumerate(zip(res.finish_reasons, res.tokens)):
        if reason not in allowed:
            res.problem(f"choice {j}: finish_reason {reason!r}, expected one of {sorted(allowed)}")
        if tokens is not None:
            if reason == "length" and tokens != plan.max_tokens:
                res.problem(f"choice {j}: finish_reason length after {tokens} tokens, max_tokens {plan.max_tokens}")
            if not 1 <= tokens <= plan.max_tokens:
                res.problem(f"choice {j}: {tokens} tokens, max_tokens {plan.max_tokens}")
    if res.usage is None:
        return
    completion = res.usage.get("completion_tokens")
    if plan.ignore_eos and completion != plan.max_tokens * plan.n:
        res.problem(f"usage.completion_tokens {completion} != max_tokens x n = {plan.max_tokens * plan.n}")
    if all(t is not None for t in res.tokens) and completion != sum(res.tokens):
        res.problem(f"usage.completion_tokens {completion} != the per-choice token counts {res.tokens}")
    if not plan.ignore_eos and not (plan.n <= (completion or 0) <= plan.max_tokens * plan.n):
        res.problem(f"usage.completion_tokens {completion} outside [n, max_tokens x n]")


def read_json_response(res: Result, data: dict) -> None:
    plan = res.plan
    choices = sorted(data.get("choices", []), key=lambda c: c["index"])
    if [c["index"] for c in choices] != list(range(plan.n)):
        res.problem(f"choice indexes {[c['index'] for c in choices]}")
    for c in choices:
        if plan.route == "completions":
            res.texts.append(c["text"])
        else:
            if c["message"]["role"] != "assistant":
                res.problem(f"message role {c['message']['role']!r}")
            res.texts.append(c["message"]["content"] or "")
        res.finish_reasons.append(c["finish_reason"])
        res.tokens.append(_choice_tokens(plan.route, c.get("logprobs")) if plan.logprobs else None)
    check_usage(res, data.get("usage"))


class StreamState:
    """Assembles an SSE response and checks its shape as events arrive."""

    def __init__(self, res: Result):
        self.res = res
        n = res.plan.n
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.roles = 0
        self.usage_chunk: dict | None = None
        self.done = False
        self.last_completion_tokens = 0

    def feed(self, payload: str) -> None:
        res, plan = self.res, self.res.plan
        if self.done:
            res.problem(f"event after [DONE]: {payload[:200]}")
            return
        if payload == "[DONE]":
            self.done = True
            return
        res.events += 1
        chunk = json.loads(payload)
        if "error" in chunk:
            res.problem(f"error event: {chunk['error']}")
            return
        if self.usage_chunk is not None:
            res.problem(f"chunk after the usage chunk: {payload[:200]}")
        usage = chunk.get("usage")
        if not chunk["choices"]:
            self.usage_chunk = chunk
            return
        if plan.continuous_usage:
            if not isinstance(usage, dict) or usage.get("prompt_tokens") != plan.prompt_tokens or \
                    usage.get("completion_tokens", -1) < self.last_completion_tokens:
                res.problem(f"continuous usage {usage} (previous completion_tokens {self.last_completion_tokens})")
            else:
                self.last_completion_tokens = usage["completion_tokens"]
        elif usage is not None:
            res.problem(f"usage {usage!r} on a choice chunk (expected null with include_usage)")
        for c in chunk["choices"]:
            j = c["index"]
            if not 0 <= j < plan.n:
                res.problem(f"choice index {j} with n={plan.n}")
                continue
            if self.finish[j] is not None:
                res.problem(f"choice {j}: chunk after its finish_reason {self.finish[j]!r}")
            if plan.route == "chat":
                delta = c["delta"]
                if "role" in delta:
                    self.roles += 1
                    if delta != {"role": "assistant", "content": ""} or self.tokens[j] or self.texts[j]:
                        res.problem(f"choice {j}: unexpected role delta {delta}")
                text = delta.get("content") or ""
            else:
                text = c["text"]
            self.texts[j] += text
            self.tokens[j] += _choice_tokens(plan.route, c.get("logprobs"))
            res.tokens_seen += _choice_tokens(plan.route, c.get("logprobs")) if plan.logprobs else bool(text)
            if c.get("finish_reason") is not None:
                self.finish[j] = c["finish_reason"]

    def finish_up(self) -> None:
        """The stream ended (the server closed it): check its end and fill the result."""
        res, plan = self.res, self.res.plan
        if not self.done:
            res.problem("stream ended without [DONE]")
        if plan.route == "chat" and self.roles != plan.n:
            res.problem(f"{self.roles} role deltas for n={plan.n}")
        if any(f is None for f in self.finish):
            res.problem(f"choices without a finish_reason: {self.finish}")
        res.texts = self.texts
        res.finish_reasons = self.finish
        res.tokens = list(self.tokens) if plan.logprobs else [None] * plan.n
        if self.usage_chunk is None:
            res.problem("no usage chunk (stream_options.include_usage)")
        else:
            check_usage(res, self.usage_chunk.get("usage"))
            if plan.continuous_usage and res.usage and res.usage.get("completion_tokens") != \
                    self.last_completion_tokens:
                res.problem(f"final usage {res.usage} != the last chunk's completion_tokens "
                            f"{self.last_completion_tokens}")


async def run_request(client: httpx.AsyncClient, plan: Plan) -> Result:
    res = Result(plan)
    path = ROUTES[plan.route]
    try:
        if plan.stream:
            await _run_stream(client, path, res)
        else:
            await _run_json(client, path, res)
    except Exception as exc:  # noqa: BLE001 - any client-side failure of a request is a finding
        res.outcome = "failed"
        res.problem(f"{type(exc).__name__}: {exc}")
    if res.outcome == "completed":
        check_completed(res)
    return res


async def _run_stream(client: httpx.AsyncClient, path: str, res: Result) -> None:
    plan = res.plan
    state = StreamState(res)
    async with client.stream("POST", path, json=plan.body) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            res.problem(f"HTTP {resp.status_code}: {resp.text[:300]}")
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            state.feed(line[len("data: "):])
            if plan.cancel_after_events is not None and res.events >= plan.cancel_after_events and \
                    None in state.finish:
                # Leaving the block closes the response before its end: httpx drops the connection.
                res.outcome = "cancelled"
                return
    state.finish_up()
    res.outcome = "completed"
    res.late_cancel = plan.cancel


async def _run_json(client: httpx.AsyncClient, path: str, res: Result) -> None:
    plan = res.plan
    if plan.cancel_after_s is None:
        resp = await client.post(path, json=plan.body)
    else:
        sent = asyncio.Event()

        async def trace(name: str, info: dict) -> None:
            if name == "http11.send_request_body.complete":
                sent.set()

        task = asyncio.ensure_future(client.post(path, json=plan.body, extensions={"trace": trace}))
        sent_wait = asyncio.ensure_future(sent.wait())
        await asyncio.wait({task, sent_wait}, return_when=asyncio.FIRST_COMPLETED)
        sent_wait.cancel()
        if not task.done():
            await asyncio.wait({task}, timeout=plan.cancel_after_s)
        if not task.done():
            task.cancel()  # httpcore closes the connection of a cancelled request
            await asyncio.gather(task, return_exceptions=True)
            res.outcome = "cancelled"
            return
        resp = task.result()
        res.late_cancel = True
    res.status = resp.status_code
    if resp.status_code != 200:
        res.problem(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return
    read_json_response(res, resp.json())
    res.outcome = "completed"


# ---- the server, from outside ----------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB), Threads, and open file descriptors of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


async def scrape(client: httpx.AsyncClient) -> Metrics:
    resp = await client.get("/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


def _total_finished(m: Metrics) -> float:
    return m.value(M + "request_success_total")


async def wait_idle(client: httpx.AsyncClient, baseline: Metrics, expected_finished: int,
                    timeout: float) -> tuple[Metrics, bool]:
    """Until the engine is idle with every request accounted for in the metrics (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(client)
        idle = (m.value(M + "num_requests_running") == 0 and m.value(M + "num_requests_waiting") == 0
                and m.value(M + "kv_cache_usage_perc") == 0)
        if idle and _total_finished(m) - _total_finished(baseline) >= expected_finished:
            return m, True
        if time.monotonic() > deadline:
            return m, False
        await asyncio.sleep(0.25)


# ---- the run ----------------------------------------------------------------------------------------------------

@dataclass
class SoakReport:
    config: SoakConfig
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # deltas over the run
    warm: dict[str, int] = field(default_factory=dict)  # proc_status after the warm-up
    end: dict[str, int] = field(default_factory=dict)
    offline_checked: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: server start, workload, drain, offline
    problems: list[str] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    def summary(self) -> str:
        late = sum(r.late_cancel for r in self.results)
        rss_w, rss_e = self.warm.get("VmRSS", 0) / 1024, self.end.get("VmRSS", 0) / 1024
        growth = (rss_e / rss_w - 1) * 100 if rss_w else float("nan")
        lines = [
            f"soak: {len(self.results)} requests in {self.wall_s:.1f} s (concurrency {self.config.concurrency}, "
            f"seed {self.config.seed}): {self.count('completed')} completed, {self.count('cancelled')} cancelled, "
            f"{self.count('failed')} failed, {late} cancels that landed too late (counted as completed)",
            f"  engine: {self.metrics.get('preemptions', 0):.0f} preemptions, "
            f"{self.metrics.get('generation_tokens', 0):.0f} tokens generated, "
            f"{self.metrics.get('prompt_tokens', 0):.0f} prompt tokens "
            f"({self.metrics.get('prefix_hits', 0):.0f} from the prefix cache), KV blocks "
            f"{self.config.num_kv_blocks} x {self.config.block_size}; the cancelled requests generated "
            f"{self.metrics.get('cancelled_tokens', 0):.0f} of the {self.metrics.get('cancelled_max_tokens', 0):.0f} "
            f"tokens they asked for before they were aborted",
            f"  server RSS {rss_w:.1f} MiB after warm-up ({min(self.config.warmup_requests, len(self.results))} "
            f"requests) -> {rss_e:.1f} MiB at the end ({growth:+.1f}%); fds {self.warm.get('fds')} -> "
            f"{self.end.get('fds')}; threads {self.warm.get('Threads')} -> {self.end.get('Threads')}",
            f"  offline engine parity: {self.offline_checked['greedy']} greedy and {self.offline_checked['seeded']} "
            f"seeded completions compared",
            "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
            + f", workload {self.wall_s:.1f} s",
        ]
        if self.problems:
            shown = self.problems[:40]
            more = len(self.problems) - len(shown)
            lines.append(f"  PROBLEMS ({len(self.problems)}):")
            lines += [f"    - {p}" for p in shown] + ([f"    ... and {more} more"] if more else [])
        else:
            lines.append("  leaks/problems found: none")
        return "\n".join(lines)


async def _phase(client: httpx.AsyncClient, plans, concurrency: int, results: list[Result],
                 progress: bool, started: float) -> None:
    """Issue the plans with at most `concurrency` in flight; returns when all have ended."""
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    last_print = time.monotonic()

    async def one(plan: Plan) -> None:
        try:
            results.append(await run_request(client, plan))
        finally:
            slots.release()

    for plan in plans:
        await slots.acquire()
        task = asyncio.ensure_future(one(plan))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if progress and time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            c = Counter(r.outcome for r in results)
            print(f"  [{time.monotonic() - started:6.0f} s] issued {plan.index + 1}, completed {c['completed']}, "
                  f"cancelled {c['cancelled']}, failed {c['failed']}", flush=True)
    if tasks:
        await asyncio.gather(*tasks)


def _client(url: str, cfg: SoakConfig) -> httpx.AsyncClient:
    # Keep-alive shorter than the server's 5 s, so a pooled connection is never reused as the server closes it.
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 8,
                          keepalive_expiry=2.0)
    return httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits)


async def _drive(cfg: SoakConfig, server: ServerProcess, report: SoakReport) -> Prompts:
    pid = server.proc.pid
    prompts = Prompts.build(cfg.seed)
    async with _client(server.url, cfg) as c:
        await prompts.count_tokens(c)
        room = cfg.max_model_len - CANCEL_MIN_TOKENS
        too_long = [t for t in prompts.completion_tokens + prompts.chat_tokens if t > room]
        if too_long:
            raise RuntimeError(f"prompts of {too_long} tokens leave no room for {CANCEL_MIN_TOKENS} tokens")
        baseline = await scrape(c)
    started = time.monotonic()
    warmup = cfg.warmup_requests
    if cfg.duration_s is None:
        total = cfg.requests
        warmup = min(warmup, total)

    def plans(lo: int, hi: int):
        # No cancels in the last `concurrency` requests of a phase, so every cancelled request runs under full load;
        # the others are cancelled a little more often to make up for it.
        tail = min(cfg.concurrency, hi - lo)
        cancel_p = 0.0 if hi - lo == tail else min(1.0, cfg.cancel_fraction * (hi - lo) / (hi - lo - tail))
        for i in range(lo, hi):
            yield make_plan(cfg, prompts, i, cancel_p if i < hi - tail else 0.0)

    def timed_plans(lo: int):
        i, deadline = lo, started + cfg.duration_s
        while time.monotonic() < deadline:
            yield make_plan(cfg, prompts, i, cfg.cancel_fraction)
            i += 1
        for j in range(i, i + cfg.concurrency):
            yield make_plan(cfg, prompts, j, 0.0)

    results = report.results
    async with _client(server.url, cfg) as c:
        await _phase(c, plans(0, warmup), cfg.concurrency, results, cfg.progress, started)
    async with _client(server.url, cfg) as c:
        _, idle = await wait_idle(c, baseline, len(results) - sum(r.outcome == "failed" for r in results),
                                  cfg.idle_timeout_s)
    if not idle:
        report.problems.append(f"the engine was not idle {cfg.idle_timeout_s:.0f} s after the warm-up phase")
    await asyncio.sleep(1.0)  # the server closes the connections the client just closed
    report.warm = proc_status(pid)
    if cfg.progress:
        print(f"  warm-up done: {len(results)} requests, server RSS {report.warm['VmRSS'] / 1024:.1f} MiB",
              flush=True)
    async with _client(server.url, cfg) as c:
        rest = timed_plans(warmup) if cfg.duration_s is not None else plans(warmup, total)
        await _phase(c, rest, cfg.concurrency, results, cfg.progress, started)
    report.wall_s = time.monotonic() - started
    drain_started = time.monotonic()
    async with _client(server.url, cfg) as c:
        sent = len(results) - sum(r.outcome == "failed" for r in results)
        final, idle = await wait_idle(c, baseline, sent, cfg.idle_timeout_s)
    await asyncio.sleep(1.0)
    report.end = proc_status(pid)
    report.timings["drain"] = time.monotonic() - drain_started
    check_metrics(report, baseline, final, idle)
    return prompts


def check_metrics(report: SoakReport, baseline: Metrics, final: Metrics, idle: bool) -> None:
    cfg, results, problems = report.config, report.results, report.problems

    def delta(name: str, **labels: str) -> float:
        return final.value(M + name, **labels) - baseline.value(M + name, **labels)

    report.metrics = {"preemptions": delta("num_preemptions_total"),
                      "generation_tokens": delta("generation_tokens_total"),
                      "prompt_tokens": delta("prompt_tokens_total"), "prefix_hits": delta("prefix_cache_hits_total")}
    if not idle:
        problems.append("the engine did not end idle with every request accounted for within "
                        f"{cfg.idle_timeout_s:.0f} s")
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        if final.value(M + gauge) != 0:
            problems.append(f"leak: {M}{gauge} = {final.value(M + gauge)} after the run (expected 0)")
    if report.metrics["preemptions"] <= 0:
        problems.append(f"no preemptions: the KV pool ({cfg.num_kv_blocks} blocks) never ran dry")

    def expect(what: str, server: float, client: float) -> None:
        if server != client:
            problems.append(f"metrics: {what} is {server:g} on the server, {client:g} by the client's count")

    done = [r for r in results if r.outcome == "completed"]
    cancelled = [r for r in results if r.outcome == "cancelled"]
    engine_requests = done + cancelled  # failed ones are reported on their own
    for reason in ("length", "stop"):
        expect(f"request_success_total{{finished_reason={reason}}}", delta("request_success_total",
               finished_reason=reason), sum(r.finish_reasons[0] == reason for r in done if r.finish_reasons))
    expect("request_success_total{finished_reason=abort}",
           delta("request_success_total", finished_reason="abort"), len(cancelled))
    failures = {s.labels.get("reason"): s.value for s in final.get(M + "request_failure_total", [])}
    failures = {k: v - baseline.value(M + "request_failure_total", reason=k) for k, v in failures.items()}
    for reason, count in sorted(failures.items()):
        expect(f"request_failure_total{{reason={reason}}}", count, 0)
    for route, path in ROUTES.items():
        on_route = [r for r in engine_requests if r.plan.route == route]
        expect(f"http_requests_total{{route={path},status=200}}", delta("http_requests_total", route=path,
               status="200"), sum(r.outcome == "completed" or r.plan.stream for r in on_route))
        expect(f"http_requests_total{{route={path},status=499}}", delta("http_requests_total", route=path,
               status="499"), sum(r.outcome == "cancelled" and not r.plan.stream for r in on_route))
        expect(f"http_requests_total{{route={path}}}", delta("http_requests_total", route=path), len(on_route))
    prompt_tokens = sum(r.plan.prompt_tokens for r in engine_requests)
    expect("prompt_tokens_total", delta("prompt_tokens_total"), prompt_tokens)
    expect("request_prompt_tokens_sum", delta("request_prompt_tokens_sum"), prompt_tokens)
    for hist in ("request_prompt_tokens_count", "request_generation_tokens_count",
                 "e2e_request_latency_seconds_count"):
        expect(hist, delta(hist), len(engine_requests))
    generated = delta("generation_tokens_total")
    expect("generation_tokens_total vs request_generation_tokens_sum", generated,
           delta("request_generation_tokens_sum"))
    # Cancelled requests generate an unknown number of tokens: only bounds can be checked for the total.
    completed_tokens = sum((r.usage or {}).get("completion_tokens", 0) for r in done)
    low = completed_tokens + sum(r.tokens_seen for r in cancelled)
    high = completed_tokens + sum(r.plan.max_tokens * r.plan.n for r in cancelled)
    report.metrics["cancelled_tokens"] = generated - completed_tokens
    report.metrics["cancelled_max_tokens"] = high - completed_tokens
    if not low <= generated <= high:
        problems.append(f"metrics: generation_tokens_total {generated:g} outside [{low}, {high}] (completed "
                        f"requests' usage plus what the cancelled ones received / could have generated)")

    warm_rss, end_rss = report.warm.get("VmRSS"), report.end.get("VmRSS")
    if warm_rss and end_rss and end_rss > warm_rss * (1 + cfg.rss_tolerance):
        problems.append(f"leak: server RSS grew from {warm_rss / 1024:.1f} MiB after warm-up to {end_rss / 1024:.1f} "
                        f"MiB (+{(end_rss / warm_rss - 1) * 100:.1f}%, tolerance {cfg.rss_tolerance:.0%})")
    if report.end.get("fds", 0) > report.warm.get("fds", 0) + cfg.fd_slack:
        problems.append(f"leak: the server's open file descriptors went from {report.warm['fds']} after warm-up to "
                        f"{report.end['fds']}")
    if report.end.get("Threads", 0) > report.warm.get("Threads", 0) + cfg.fd_slack:
        problems.append(f"leak: the server's threads went from {report.warm['Threads']} after warm-up to "
                        f"{report.end['Threads']}")


def check_offline(report: SoakReport, model: Path | str, prompts: Prompts) -> None:
    """The completions that ran to their end give what the offline engine gives for the same prompt and params."""
    from engine import LLM
    from engine.sampling_params import SamplingParams

    cfg = report.config
    done = [r for r in report.results if r.outcome == "completed" and r.plan.route == "completions"
            and not r.problems]
    # Up to half greedy and half seeded (seeded ones only when short, to keep the offline run short).
    greedy = [r for r in done if r.plan.greedy]
    seeded = [r for r in done if not r.plan.greedy and r.plan.max_tokens <= GREEDY_MAX_TOKENS]
    n_seeded = min(len(seeded), max(cfg.max_offline_checks // 2, cfg.max_offline_checks - len(greedy)))
    chosen = greedy[:cfg.max_offline_checks - n_seeded] + seeded[:n_seeded]
    chosen.sort(key=lambda r: r.plan.index)
    if not any(r.plan.greedy for r in chosen):
        report.problems.append("offline parity: no greedy completion to compare")
    if not chosen:
        return
    llm = LLM(model, **cfg.engine_kwargs())
    params = [SamplingParams(n=r.plan.n, temperature=r.plan.body["temperature"], top_p=r.plan.body.get("top_p", 1.0),
                             seed=r.plan.body.get("seed"), max_tokens=r.plan.max_tokens,
                             ignore_eos=r.plan.ignore_eos) for r in chosen]
    outs = llm.generate([prompts.completions[r.plan.prompt_index] for r in chosen], params, use_tqdm=False)
    for r, out in zip(chosen, outs):
        report.offline_checked["greedy" if r.plan.greedy else "seeded"] += 1
        if len(out.prompt_token_ids) != r.plan.prompt_tokens:
            r.problem(f"offline prompt has {len(out.prompt_token_ids)} tokens, the server counted "
                      f"{r.plan.prompt_tokens}")
        for j, choice in enumerate(out.outputs):
            if (choice.text, choice.finish_reason) != (r.texts[j], r.finish_reasons[j]):
                report.problems.append(
                    f"offline parity: {r.plan.describe()}, choice {j}: server {r.texts[j]!r} "
                    f"({r.finish_reasons[j]}) != offline {choice.text!r} ({choice.finish_reason})")
            elif r.tokens[j] is not None and r.tokens[j] != len(choice.token_ids):
                report.problems.append(f"offline parity: {r.plan.describe()}, choice {j}: {r.tokens[j]} tokens "
                                       f"on the server, {len(choice.token_ids)} offline")


def run_soak(cfg: SoakConfig) -> SoakReport:
    """Start a server, run the workload, stop the server, compare with the offline engine; see the module doc."""
    report = SoakReport(cfg)
    with tempfile.TemporaryDirectory(prefix="attnserve-soak-") as tmp:
        t0 = time.monotonic()
        model = cfg.model if cfg.model is not None else make_checkpoint("llama", Path(tmp) / "llama")
        server = ServerProcess(model, *cfg.server_args())
        report.timings["start"] = time.monotonic() - t0
        try:
            prompts = asyncio.run(_drive(cfg, server, report))
            log = server.log()
        finally:
            code = server.stop()
        errors = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
        if errors:
            report.problems.append(f"server log has {len(errors)} error lines, e.g. {errors[:3]}; log tail:\n"
                                   + "\n".join(log.splitlines()[-40:]))
        if code != 0:
            report.problems.append(f"the server exited with {code} on SIGTERM")
        for r in report.results:
            report.problems.extend(r.problems)
        t0 = time.monotonic()
        check_offline(report, model, prompts)
        report.timings["offline"] = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=None, metavar="S",
                        help="issue requests for S seconds (after the warm-up's start), then check")
    length.add_argument("--requests", type=int, default=1500, help="issue this many requests (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency,
                   help=f"requests in flight (default: {SoakConfig.concurrency})")
    p.add_argument("--cancel-fraction", type=float, default=SoakConfig.cancel_fraction)
    p.add_argument("--warmup-requests", type=int, default=SoakConfig.warmup_requests)
    p.add_argument("--num-kv-blocks", type=int, default=SoakConfig.num_kv_blocks)
    p.add_argument("--max-num-seqs", type=int, default=SoakConfig.max_num_seqs)
    p.add_argument("--model", default=None, help="checkpoint directory (default: build the tiny random Llama)")
    p.add_argument("--rss-tolerance", type=float, default=SoakConfig.rss_tolerance)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    cfg = SoakConfig(model=args.model, requests=None if args.duration else args.requests, duration_s=args.duration,
                     seed=args.seed, concurrency=args.concurrency, cancel_fraction=args.cancel_fraction,
                     warmup_requests=args.warmup_requests, num_kv_blocks=args.num_kv_blocks,
                     max_num_seqs=args.max_num_seqs, rss_tolerance=args.rss_tolerance, progress=not args.quiet)
    report = run_soak(cfg)
    print(report.summary(), flush=True)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
