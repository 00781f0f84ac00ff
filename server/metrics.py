"""Prometheus metrics at GET /metrics, from a registry owned by the app (so several apps can live in one process).

Names follow Prometheus conventions with the prefix `attnserve_` (vLLM's `vllm:` metrics, renamed), and every series
carries `model_name`. Gauges and engine totals are read from the engine's snapshot at scrape time; per-request
histograms are fed by the engine thread's measurements (engine.stats) after each step; HTTP and failure counters
by the server.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine
from engine.stats import IterationStats

PREFIX = "attnserve_"

# vLLM's bucket sets, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to limit (token-count histograms)."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > limit:
                return out
            out.append(value)
        scale *= 10


class _EngineCollector(Collector):
    """Gauges and totals the engine already keeps, read at scrape time so they are never stale."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", stats.kv_cache_usage)
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool.", stats.num_kv_blocks)
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", stats.prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", stats.generation_tokens_total)
        yield counter("num_preemptions", "Sequences preempted (their KV freed, to be recomputed).",
                      stats.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        # vLLM's spec_decode_* counters: mean acceptance length = 1 + accepted tokens / drafts.
        yield counter("spec_decode_num_drafts", "Speculative decoding: sequence steps that verified draft tokens.",
                      stats.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed.",
                      stats.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
                      stats.spec_num_accepted_tokens)


class Metrics:
    def __init__(self, engine: AsyncEngine, model_name: str, info: dict[str, str], max_model_len: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        r.register(_EngineCollector(engine, model_name))
        Info(PREFIX + "engine", "Engine build and configuration.", registry=r).info({"model_name": model_name, **info})

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Gap between consecutive tokens of a sequence.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt length per request.", token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Tokens generated per request (all samples).",
                                           buckets_1_2_5(max_model_len * 16))
        self.iteration_tokens = histogram("iteration_tokens", "Tokens computed per engine step.",
                                          ITERATION_TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.failure = Counter(PREFIX + "request_failure", "Requests refused or failed, by reason.",
                               ["model_name", "reason"], registry=r)
        self.http = Counter(PREFIX + "http_requests", "HTTP requests by route and status.",
                            ["model_name", "route", "status"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)  # exported at 0 from the start, so rate() works at once
        engine.add_stats_listener(self.observe)

    def observe(self, stats: IterationStats) -> None:
        """Runs on the engine thread after each loop turn."""
        for n in stats.step_tokens:
            self.iteration_tokens.observe(n)
        for value in stats.ttfts_s:
            self.ttft.observe(value)
        for value in stats.itls_s:
            self.itl.observe(value)
        for req in stats.finished:
            self.success.labels(self.model_name, req.finish_reason).inc()
            self.e2e.observe(req.e2e_s)
            self.prompt_tokens.observe(req.prompt_tokens)
            self.generation_tokens.observe(req.generation_tokens)
            if req.queue_s is not None:
                self.queue.observe(req.queue_s)
            if req.prefill_s is not None:
                self.prefill.observe(req.prefill_s)
                self.decode.observe(req.decode_s)

    def count_failure(self, reason: str) -> None:
        self.failure.labels(self.model_name, reason).inc()

    def count_http(self, route: str, status: int) -> None:
        self.http.labels(self.model_name, route, str(status)).inc()
