"""The load generator: sends the workload on its arrival schedule, streams every response, times it.

One httpx.AsyncClient carries the load, its pool sized for the concurrency limit; a second one carries the control
traffic (/v1/models, /tokenize, /metrics) so that never waits behind the load. Both go to --base-url only, and ignore
proxy variables (trust_env=False) so the traffic measured is the traffic sent.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from clients.base import auth_headers
from clients.bench import BenchError
from clients.bench.arrivals import arrival_gaps
from clients.bench.counters import LocalTokenizer, ServerTokenizer
from clients.bench.datasets import BenchRequest, build_from_file, build_random, fit_lengths
from clients.bench.defaults import DEFAULT_DURATION_PROMPTS, DEFAULT_NUM_PROMPTS
from clients.bench.metrics import RequestRecord, summarize
from clients.bench.scrape import Samples, parse_exposition, server_summary
from clients.errors import error_fields
from clients.sse import aiter_sse

ERROR_DETAIL_CHARS = 500  # enough of an error body to say what went wrong, not a whole HTML page
# Control calls (/v1/models, /tokenize, /detokenize, /metrics) are small; they get their own bound, so a tight
# --request-timeout meant for generation does not break the set-up.
CONTROL_TIMEOUT_S = 60.0
CONTROL_CONNECTIONS = 16


@dataclass
class RunConfig:
    base_url: str
    api_key: str | None
    model: str | None
    endpoint: str  # "completions" or "chat"
    request_timeout: float
    temperature: float
    ignore_eos: bool
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    duration: float | None
    warmup: int
    seed: int
    slos_ms: dict[str, float] = field(default_factory=dict)
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        return cls(base_url=args.base_url.rstrip("/"), api_key=args.api_key, model=args.model,
                   endpoint=args.endpoint, request_timeout=args.request_timeout, temperature=args.temperature,
                   ignore_eos=args.ignore_eos, request_rate=args.request_rate, burstiness=args.burstiness,
                   max_concurrency=args.max_concurrency, duration=args.duration, warmup=args.warmup, seed=args.seed,
                   slos_ms=dict(args.goodput or ()), progress=not args.disable_tqdm)


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    summary: dict


def check_duration(duration: float | None, rate: float, concurrency: int | None) -> None:
    if duration is not None and math.isinf(rate) and concurrency is None:
        raise BenchError("--duration with a request rate of inf needs --max-concurrency (else it would open "
                         "requests without limit)")


def make_client(cfg: RunConfig, max_connections: int | None, timeout: float | None = None) -> httpx.AsyncClient:
    """A client for --base-url only; `max_connections` None means no pool limit (the load's own bound applies)."""
    headers = auth_headers(cfg.api_key)
    return httpx.AsyncClient(
        base_url=cfg.base_url, headers=headers, trust_env=False,
        timeout=httpx.Timeout(timeout or cfg.request_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def make_control_client(cfg: RunConfig) -> httpx.AsyncClient:
    return make_client(cfg, CONTROL_CONNECTIONS, CONTROL_TIMEOUT_S)


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, _, _ = error_fields(body, response.text)
    return message[:ERROR_DETAIL_CHARS]


async def served_model(control: httpx.AsyncClient, model: str | None) -> tuple[str, int | None]:
    """The model to load-test and its max_model_len, from GET /v1/models: --model, else the first model listed.
    The length is what vLLM and attnserve list per model; None when the server does not say (OpenAI's API does
    not), or when --model is given and the listing is unavailable."""
    try:
        response = await control.get("/v1/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {control.base_url}: {exc!r}") from None
    if response.status_code == 401:
        raise BenchError(f"{control.base_url} wants an API key: give --api-key or set $ATTNSERVE_API_KEY")
    if response.status_code != 200:
        if model is not None:
            return model, None
        raise BenchError(f"GET /v1/models answered {response.status_code}: {_error_message(response)}; "
                         f"give --model NAME")
    try:
        cards = [card for card in response.json()["data"] if isinstance(card, dict)]
        card = next(c for c in cards if c.get("id") == model) if model is not None else cards[0]
        name = str(card["id"])
    except (ValueError, LookupError, TypeError, StopIteration):
        if model is not None:  # not listed: its requests will say so (404) with the server's own message
            return model, None
        raise BenchError(f"GET /v1/models listed no model ({response.text[:200]}); give --model NAME") from None
    limit = card.get("max_model_len")
    return name, limit if isinstance(limit, int) and not isinstance(limit, bool) else None


async def scrape(control: httpx.AsyncClient) -> Samples | None:
    """The server's /metrics, parsed; None when it has none (not every OpenAI-compatible server does)."""
    try:
        response = await control.get("/metrics")
        if response.status_code != 200:
            return None
        return parse_exposition(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def build_payload(cfg: RunConfig, model: str, req: BenchRequest) -> tuple[str, dict]:
    """Route and body of one streamed request. Usage is asked for, because output tokens are counted from it."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        return "/v1/chat/completions", {**body, "messages": req.messages, "max_completion_tokens": req.max_tokens}
    return "/v1/completions", {**body, "prompt": req.prompt, "max_tokens": req.max_tokens}


def _content(chunk: dict, chat: bool) -> str:
    """The text one chunk adds (the chat role chunk and the usage chunk add none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    # reasoning models stream their thinking separately; it is generated output too.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _fail(record: RequestRecord, kind: str, detail: str | None = None) -> None:
    if record.error is None:  # the first failure is the cause; later ones are consequences
        record.success, record.error, record.error_detail = False, kind, detail


async def _stream(client: httpx.AsyncClient, route: str, body: dict, chat: bool, record: RequestRecord,
                  sent: float) -> None:
    """Send one request and read its stream, filling `record` as it goes (so a timeout keeps what arrived)."""
    headers_seen = False
    try:
        async with client.stream("POST", route, json=body) as response:
            headers_seen = True
            if response.status_code != 200:
                await response.aread()
                _fail(record, f"http_{response.status_code}", _error_message(response))
                return
            done, last, first_choice = False, None, None
            async for event in aiter_sse(response.aiter_lines()):
                now = time.perf_counter()
                if event.is_done:
                    done = True
                    record.e2el_ms = (now - sent) * 1000
                    break
                try:
                    chunk = event.json()
                except ValueError:
                    _fail(record, "invalid_chunk", event.data[:ERROR_DETAIL_CHARS])
                    return
                if not isinstance(chunk, dict):
                    _fail(record, "invalid_chunk", event.data[:ERROR_DETAIL_CHARS])
                    return
                if chunk.get("error") is not None:  # an error after the 200 went out travels as an event
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    _fail(record, "stream_error", str(message)[:ERROR_DETAIL_CHARS])
                    return
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    record.prompt_len = usage.get("prompt_tokens")
                    record.output_len = usage.get("completion_tokens")
                if first_choice is None and chunk.get("choices"):
                    first_choice = now
                if _content(chunk, chat):
                    if last is None:
                        record.ttft_ms = (now - sent) * 1000
                    else:
                        record.itl_ms.append((now - last) * 1000)
                    last = now
            if not done:
                _fail(record, "incomplete_stream", "the stream ended without [DONE]")
                return
            if record.ttft_ms is None and first_choice is not None:
                # No chunk carried text (e.g. only special tokens, which are skipped): the first choice is the
                # closest thing to a first token.
                record.ttft_ms = (first_choice - sent) * 1000
            if not isinstance(record.output_len, int) or not isinstance(record.prompt_len, int):
                _fail(record, "no_usage", "no usage chunk, though stream_options.include_usage was sent")
                return
            record.success = True
    except httpx.TimeoutException as exc:
        _fail(record, "timeout", repr(exc))
    except httpx.HTTPError as exc:
        # Before the headers the server was not reached (or refused us); after them, the stream broke off.
        _fail(record, "incomplete_stream" if headers_seen else "connection_error", repr(exc))


async def send_request(client: httpx.AsyncClient, cfg: RunConfig, model: str, req: BenchRequest, index: int,
                       origin: float) -> RequestRecord:
    record = RequestRecord(index=index, expected_prompt_len=req.expected_prompt_len, max_tokens=req.max_tokens)
    route, body = build_payload(cfg, model, req)
    sent = time.perf_counter()
    record.start_s = sent - origin
    try:
        await asyncio.wait_for(_stream(client, route, body, cfg.endpoint == "chat", record, sent),
                               cfg.request_timeout)
    except asyncio.TimeoutError:
        _fail(record, "timeout", f"no complete response within --request-timeout {cfg.request_timeout:g} s")
    return record


def _progress(total: int | None, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


async def warm_up(client: httpx.AsyncClient, cfg: RunConfig, model: str, requests: list[BenchRequest],
                  concurrency: int | None) -> int:
    """Send cfg.warmup requests (cycling through the workload), all at once up to the concurrency limit, and
    return how many failed. They are not recorded: they pay for first-call costs (connections, allocations)."""
    semaphore = asyncio.Semaphore(concurrency or cfg.warmup)
    origin = time.perf_counter()

    async def one(i: int) -> RequestRecord:
        async with semaphore:
            return await send_request(client, cfg, model, requests[i % len(requests)], i, origin)

    records = await asyncio.gather(*(one(i) for i in range(cfg.warmup)))
    return sum(1 for r in records if not r.success)


async def run_load(client: httpx.AsyncClient, control: httpx.AsyncClient, cfg: RunConfig, model: str,
                   requests: list[BenchRequest], *, rate: float, concurrency: int | None,
                   label: str = "requests") -> RunResult:
    """One measured run: len(requests) requests, or as many as --duration allows (cycling through them)."""
    gaps = arrival_gaps(rate, cfg.burstiness, cfg.seed)
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    before = await scrape(control)
    tasks: list[asyncio.Task] = []
    progress = _progress(None if cfg.duration else len(requests), label, cfg.progress)

    async def one(i: int, origin: float) -> RequestRecord:
        try:
            return await send_request(client, cfg, model, requests[i % len(requests)], i, origin)
        finally:
            if semaphore is not None:
                semaphore.release()
            progress.update(1)

    start = time.perf_counter()
    deadline = None if cfg.duration is None else start + cfg.duration
    offset, i = 0.0, 0
    try:
        while deadline is not None or i < len(requests):
            due = start + offset  # an absolute schedule, so sleeping late never shifts later arrivals
            if deadline is not None and due >= deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is not None:
                # Waiting for a slot here (not inside the task) keeps at most `concurrency` tasks alive, and sends
                # request i at max(its arrival, a slot freeing up), as vLLM's semaphore does.
                await semaphore.acquire()
                if deadline is not None and time.perf_counter() >= deadline:
                    semaphore.release()
                    break
            tasks.append(asyncio.create_task(one(i, start)))
            i += 1
            offset += next(gaps)
        records = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        progress.close()
    duration = time.perf_counter() - start
    after = await scrape(control)
    summary = summarize(records, duration, cfg.slos_ms)
    summary["server"] = server_summary(before, after)
    summary["request_rate"] = "inf" if math.isinf(rate) else rate
    summary["max_concurrency"] = concurrency
    return RunResult(records, duration, summary)


@dataclass
class Workload:
    model: str
    requests: list[BenchRequest]
    note: str | None
    build_s: float
    label: str  # what the plot titles name: "random 256→64 tok", "sharegpt.json", ...
    input_len: int | None  # the random dataset's lengths as run (defaults resolved); None where a file decides
    output_len: int | None


def workload_size(args: argparse.Namespace) -> int:
    if args.num_prompts is not None:
        return args.num_prompts
    return DEFAULT_DURATION_PROMPTS if args.duration is not None else DEFAULT_NUM_PROMPTS


def dataset_kind(args: argparse.Namespace) -> str | None:
    """Check vLLM's --dataset-name against --dataset/--dataset-path (one flag); return the file format it asks
    for ("sharegpt" or "custom"), or None (random, or a file of either format)."""
    name, is_random = args.dataset_name, args.dataset == "random"
    if name == "random" and not is_random:
        raise BenchError(f"--dataset-name random takes no --dataset-path (got {args.dataset!r}); drop one of them")
    if name not in (None, "random") and is_random:
        raise BenchError(f"--dataset-name {name} needs --dataset-path FILE")
    return None if name in (None, "random") else name


async def build_workload(args: argparse.Namespace, control: httpx.AsyncClient, cfg: RunConfig) -> Workload:
    started = time.perf_counter()
    kind = dataset_kind(args)  # first, so a bad combination fails before any traffic
    is_random = args.dataset == "random"
    # The random dataset's lengths must fit the server's max_model_len, which only the listing says; a file with
    # --model needs no control call at all.
    if cfg.model is None or is_random:
        model, max_model_len = await served_model(control, cfg.model)
    else:
        model, max_model_len = cfg.model, None
    local = LocalTokenizer(args.tokenizer) if args.tokenizer else None

    def counter():
        return local or ServerTokenizer(control, model)

    n, chat = workload_size(args), cfg.endpoint == "chat"
    if is_random:
        input_len, output_len, why = fit_lengths(max_model_len, args.input_len, args.output_len, args.range_ratio)
        if why:
            print(why, file=sys.stderr)
        requests = await build_random(counter(), n=n, input_len=input_len, output_len=output_len,
                                      ratio=args.range_ratio, seed=args.seed, chat=chat)
        note = None
        label = f"random {input_len}→{output_len} tok" + (f", range ratio {args.range_ratio:g}"
                                                          if args.range_ratio else "")
    else:
        requests, note = await build_from_file(args.dataset, n=n, chat=chat, output_len=args.output_len,
                                               counter=counter, kind=kind)
        input_len, output_len = None, args.output_len
        label = Path(args.dataset).name + (f", output {output_len} tok" if output_len else "")
    if chat:
        label += ", chat"
    return Workload(model, requests, note, time.perf_counter() - started, label, input_len, output_len)


def config_json(args: argparse.Namespace, workload: Workload) -> dict:
    """The run's settings for the results file: every flag but the API key, infinities as "inf" (JSON has none),
    and the lengths as run (a default may have been lowered to fit the server)."""
    skip = {"api_key", "command", "bench_command", "plot", "out", "save_result", "result_dir", "result_filename",
            "disable_tqdm"}
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in skip or callable(value):
            continue
        if key == "goodput":
            value = dict(value) if value else None
        out[key] = _json_safe(value)
    out["model"] = workload.model
    out["input_len"], out["output_len"] = workload.input_len, workload.output_len
    out["api_key_set"] = bool(args.api_key)
    return out


def check_results_args(args: argparse.Namespace) -> None:
    """Before the run: one way to name the results file, and --result-dir made (as vLLM makes it)."""
    if args.out and (args.save_result or args.result_dir or args.result_filename):
        raise BenchError("give --out FILE, or vLLM's --save-result with --result-dir/--result-filename, not both")
    if args.result_dir:
        try:
            Path(args.result_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchError(f"--result-dir {args.result_dir}: {exc}") from None


def results_path(args: argparse.Namespace, model: str, load: str) -> Path | None:
    """Where the results JSON goes: --out; else, with --save-result (or --result-dir/--result-filename, which
    mean it), --result-filename or vLLM's pattern {endpoint}-{load}-{model}-{YYYYMMDD-HHMMSS}.json in
    --result-dir (default: here), with -2, -3, ... added rather than overwriting. `load` is "10qps",
    "infqps-concurrency8" or "sweep". None: no results file."""
    if args.out:
        return Path(args.out)
    if not (args.save_result or args.result_dir or args.result_filename):
        return None
    directory = Path(args.result_dir or ".")
    if args.result_filename:
        return directory / args.result_filename
    stem = f"{args.endpoint}-{load}-{model.rstrip('/').split('/')[-1]}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = directory / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.json"
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


async def _serve(args: argparse.Namespace, cfg: RunConfig) -> tuple[Workload, RunResult, int]:
    async with make_control_client(cfg) as control:
        workload = await build_workload(args, control, cfg)
        print(f"Workload: {len(workload.requests)} requests for model {workload.model!r} "
              f"({workload.build_s:.1f} s to build)", file=sys.stderr)
        if workload.note:
            print(f"Note: {workload.note}", file=sys.stderr)
        pool = cfg.max_concurrency  # None: no limit, the arrival rate alone bounds what is in flight
        async with make_client(cfg, pool) as client:
            warmup_failed = 0
            if cfg.warmup:
                warmup_failed = await warm_up(client, cfg, workload.model, workload.requests, cfg.max_concurrency)
                print(f"Warmup: {cfg.warmup} requests, {warmup_failed} failed", file=sys.stderr)
            result = await run_load(client, control, cfg, workload.model, workload.requests,
                                    rate=cfg.request_rate, concurrency=cfg.max_concurrency)
    return workload, result, warmup_failed


def run_serve(args: argparse.Namespace) -> int:
    """`attnserve bench serve`: exit status 0 when at least one request succeeded."""
    from clients.bench import report

    cfg = RunConfig.from_args(args)
    check_duration(cfg.duration, cfg.request_rate, cfg.max_concurrency)
    check_results_args(args)
    if args.plot:
        report.require_matplotlib()  # fail before the run, not after it
    workload, result, warmup_failed = asyncio.run(_serve(args, cfg))
    print(report.format_summary(result.summary))
    concurrency = "" if cfg.max_concurrency is None else f"-concurrency{cfg.max_concurrency}"
    path = results_path(args, workload.model, f"{cfg.request_rate:g}qps{concurrency}")
    if path:
        report.write_json(path, {
            "config": config_json(args, workload),
            "warmup": {"requests": cfg.warmup, "failed": warmup_failed},
            "summary": result.summary,
            "records": [r.to_json() for r in result.records],
        })
        print(f"Results written to {path}", file=sys.stderr)
    if args.plot:
        title = report.plot_title(workload.model, workload.label,
                                  report.load_label([cfg.request_rate], [cfg.max_concurrency]))
        report.plot_run(args.plot, result.records, result.duration_s, title)
        print(f"Plot written to {args.plot}", file=sys.stderr)
    return 0 if result.summary["completed"] else 1

