"""Logs for operators: one line per finished request, an engine stats line every few seconds while busy, in text for
people or JSON lines for machines (--log-format).

Structured values travel as `extra={"fields": {...}}` on the log record: the text formatter appends them as
key=value, the JSON formatter as keys of the object. Prompts are logged only with --log-prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from engine.async_engine import AsyncEngine, RequestStream
from engine.core import EngineStats, PreparedRequest

REQUEST_LOGGER = logging.getLogger("attnserve.requests")
STATS_LOGGER = logging.getLogger("attnserve.stats")
LOG_FORMATS = ("text", "json")
STATS_INTERVAL_ENV = "ATTNSERVE_LOG_STATS_INTERVAL"  # seconds between engine stats lines (default 10)
DEFAULT_STATS_INTERVAL_S = 10.0


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "fields", None) or {}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return line


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)  # quoted, so a prompt with spaces stays one value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"time": stamp.replace("+00:00", "Z"), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Route every logger (ours, uvicorn's) through one handler on stderr in the chosen format."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# ---- per request ----------------------------------------------------------------------------------


def _ttft_s(stream: RequestStream, arrival_time: float) -> float | None:
    # NOTE: the engine's stamp when there is one, so a finished request's line agrees with the TTFT histogram; a
    # request cut short has only the time its first token reached the server.
    if stream.metrics is not None:
        return stream.metrics.ttft_s
    return None if stream.first_token_at is None else stream.first_token_at - arrival_time


@dataclass
class RequestLog:
    """What one API request's log line needs; the line is written once its response has ended."""

    request_id: str
    prepared: list[PreparedRequest]
    streams: list[RequestStream]
    log_prompts: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.prompt_token_ids) for p in self.prepared)

    @property
    def cached_tokens(self) -> int:
        return sum(s.num_cached_tokens for s in self.streams)

    def fields(self, status: int, tokenizer) -> dict[str, Any]:
        finished = [s.metrics for s in self.streams if s.metrics is not None]
        reasons: list[str] = []
        for prep, stream in zip(self.prepared, self.streams):
            for index in range(prep.params.n):
                # A sample with no finish reason was cut short (client gone, engine stopped): aborted.
                reason = stream.finish_reasons.get(index, "abort")
                if reason not in reasons:
                    reasons.append(reason)
        arrival = min(p.arrival_time for p in self.prepared)
        ttfts = [t for t in (_ttft_s(s, p.arrival_time) for p, s in zip(self.prepared, self.streams)) if t is not None]
        queues = [m.queue_s for m in finished if m.queue_s is not None]
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "status": status,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": sum(s.num_output_tokens for s in self.streams),
            # Several prompts in one request: the longest wait and the earliest first token.
            "queue_s": round(max(queues), 6) if queues else None,
            "ttft_s": round(min(ttfts), 6) if ttfts else None,
            "e2e_s": round(time.monotonic() - arrival, 6),
            "finish_reason": ",".join(reasons),
        }
        if self.log_prompts:
            prompts = [p.prompt if p.prompt is not None else tokenizer.decode(p.prompt_token_ids,
                                                                                skip_special_tokens=False)
                       for p in self.prepared]
            out["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        return out

    def write(self, status: int, tokenizer) -> None:
        if REQUEST_LOGGER.isEnabledFor(logging.INFO):
            REQUEST_LOGGER.info("request finished", extra={"fields": self.fields(status, tokenizer)})


# ---- engine stats ---------------------------------------------------------------------------------


class StatsReporter:
    """Throughput and load since the previous report, or None when the engine was idle all along."""

    def __init__(self, engine: AsyncEngine, now: float | None = None):
        self.engine = engine
        self._last = engine.stats()
        self._last_time = time.monotonic() if now is None else now

    def report(self, now: float | None = None) -> dict[str, Any] | None:
        now = time.monotonic() if now is None else now
        stats, last = self.engine.stats(), self._last
        elapsed = max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        if not _busy(stats, last):
            return None
        fields = {
            "prompt_throughput_tok_s": round((stats.prompt_tokens_total - last.prompt_tokens_total) / elapsed, 1),
            "generation_throughput_tok_s": round(
                (stats.generation_tokens_total - last.generation_tokens_total) / elapsed, 1),
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_cache_usage_perc": round(stats.kv_cache_usage * 100, 1),
            "preemptions": stats.num_preemptions - last.num_preemptions,
            "prefix_cache_hit_rate_perc": _hit_rate(stats.prefix_cache_hits - last.prefix_cache_hits,
                                                    stats.prefix_cache_queries - last.prefix_cache_queries),
        }
        drafts = stats.spec_num_drafts - last.spec_num_drafts
        if drafts:  # speculative decoding ran: the share of draft tokens accepted, and tokens per verified draft
            accepted = stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens
            fields["spec_acceptance_rate_perc"] = _hit_rate(accepted, stats.spec_num_draft_tokens
                                                            - last.spec_num_draft_tokens)
            fields["spec_mean_acceptance_length"] = round(1 + accepted / drafts, 2)
        return fields


def _hit_rate(hits: int, queries: int) -> float | None:
    return round(100 * hits / queries, 1) if queries else None


def _busy(stats: EngineStats, last: EngineStats) -> bool:
    return bool(stats.num_running or stats.num_waiting
                or stats.prompt_tokens_total != last.prompt_tokens_total
                or stats.generation_tokens_total != last.generation_tokens_total)


async def log_stats_periodically(engine: AsyncEngine, interval_s: float) -> None:
    reporter = StatsReporter(engine)
    while True:
        await asyncio.sleep(interval_s)
        fields = reporter.report()
        if fields is not None:
            STATS_LOGGER.info("engine stats", extra={"fields": fields})
