"""GET /metrics: names and labels follow the conventions, and the numbers are true for a known workload (totals equal
the usage fields returned, one observation per request, gauges back to 0 when idle)."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import InProcessServer

MODEL = "metrics-model"


@pytest.fixture(scope="module")
def server(make_ckpt):
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=256, num_kv_blocks=64) as s:
        yield s


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without model_name): value}, checking every sample carries model_name."""
    with server.client() as c:
        response = c.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if not s.name.startswith("attnserve_"):
                continue
            assert s.labels.get("model_name") == MODEL, s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_names_follow_prometheus_conventions(server):
    samples = scrape(server)
    names = {name for name, _ in samples}
    assert all(re.fullmatch(r"attnserve_[a-z0-9_]+", n) for n in names)
    for expected in ("attnserve_num_requests_running", "attnserve_num_requests_waiting",
                     "attnserve_kv_cache_usage_perc", "attnserve_kv_cache_blocks_total",
                     "attnserve_prompt_tokens_total", "attnserve_generation_tokens_total",
                     "attnserve_num_preemptions_total", "attnserve_prefix_cache_queries_total",
                     "attnserve_prefix_cache_hits_total", "attnserve_request_success_total",
                     "attnserve_time_to_first_token_seconds_bucket", "attnserve_inter_token_latency_seconds_bucket",
                     "attnserve_e2e_request_latency_seconds_bucket", "attnserve_request_queue_time_seconds_bucket",
                     "attnserve_request_prefill_time_seconds_bucket", "attnserve_request_decode_time_seconds_bucket",
                     "attnserve_request_prompt_tokens_bucket", "attnserve_request_generation_tokens_bucket",
                     "attnserve_iteration_tokens_bucket", "attnserve_engine_info"):
        assert expected in names, expected
    assert value(samples, "attnserve_kv_cache_blocks_total") == 64
    info = next(labels for (name, labels) in samples if name == "attnserve_engine_info")
    assert dict(info)["max_model_len"] == "256" and dict(info)["block_size"] == "16"
    assert dict(info)["dtype"] == "float32" and dict(info)["device"] == "cpu"
    # The TTFT buckets start at 1 ms.
    ttft_bounds = sorted(float(dict(labels)["le"]) for name, labels in samples
                         if name == "attnserve_time_to_first_token_seconds_bucket")
    assert ttft_bounds[0] == 0.001


def test_numbers_match_a_known_workload(server):
    before = scrape(server)
    usage_prompt = usage_completion = 0
    engine_requests = 0
    with server.client() as c:
        bodies = [
            ("/v1/completions", {"prompt": "hello there", "max_tokens": 7, "ignore_eos": True}, 1),
            ("/v1/completions", {"prompt": ["a b", "c d e"], "max_tokens": 4, "n": 2, "ignore_eos": True}, 2),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3,
                                      "ignore_eos": True}, 1),
            ("/v1/completions", {"prompt": "x y z", "max_tokens": 3, "stop_token_ids": [0, 1, 2, 3]}, 1),
        ]
        for path, body, requests in bodies:
            usage = c.post(path, json=body).json()["usage"]
            usage_prompt += usage["prompt_tokens"]
            usage_completion += usage["completion_tokens"]
            engine_requests += requests
        with c.stream("POST", "/v1/completions", json={"prompt": "stream me", "max_tokens": 6, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        usage = httpx.Response(200, content=lines[-1][len("data: "):]).json()["usage"]
        usage_prompt += usage["prompt_tokens"]
        usage_completion += usage["completion_tokens"]
        engine_requests += 1
    server.wait_idle()
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("attnserve_prompt_tokens_total") == usage_prompt
    assert delta("attnserve_generation_tokens_total") == usage_completion
    successes = sum(delta("attnserve_request_success_total", finished_reason=r) for r in ("stop", "length", "abort"))
    assert successes == engine_requests
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                      "request_generation_tokens"):
        assert delta(f"attnserve_{histogram}_count") == engine_requests, histogram
    assert delta("attnserve_request_prompt_tokens_sum") == usage_prompt
    assert delta("attnserve_request_generation_tokens_sum") == usage_completion
    # Every token after a sequence's first is one inter-token gap; every step computed at least one token.
    sequences = 1 + 2 * 2 + 3 + 1 + 1
    assert delta("attnserve_inter_token_latency_seconds_count") == usage_completion - sequences
    assert delta("attnserve_iteration_tokens_sum") >= usage_prompt + usage_completion - sequences
    assert delta("attnserve_http_requests_total", route="/v1/completions", status="200") == 4
    assert delta("attnserve_http_requests_total", route="/v1/chat/completions", status="200") == 1
    # Idle again: the gauges are back to 0.
    for gauge in ("attnserve_num_requests_running", "attnserve_num_requests_waiting", "attnserve_kv_cache_usage_perc"):
        assert value(after, gauge) == 0, gauge


def test_aborts_and_failures_are_counted(server):
    before = scrape(server)
    with server.client() as c:
        assert c.post("/v1/completions", json={"prompt": "", "max_tokens": 2}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": "a", "model": "other"}).status_code == 404
        assert c.get("/no/such/route").status_code == 404
        with c.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 200, "ignore_eos": True,
                                                       "stream": True}) as r:
            next(r.iter_lines())
    server.wait_idle()
    after = scrape(server)
    assert value(after, "attnserve_request_success_total", finished_reason="abort") - \
        value(before, "attnserve_request_success_total", finished_reason="abort") == 1
    assert value(after, "attnserve_request_failure_total", reason="validation") - \
        value(before, "attnserve_request_failure_total", reason="validation") == 1
    assert value(after, "attnserve_request_failure_total", reason="not_found") - \
        value(before, "attnserve_request_failure_total", reason="not_found") == 1
    # An unknown path is counted under one label, so scanners cannot grow the series without bound.
    assert value(after, "attnserve_http_requests_total", route="other", status="404") - \
        value(before, "attnserve_http_requests_total", route="other", status="404") == 1


def test_each_app_has_its_own_registry(server, make_ckpt):
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=128, num_kv_blocks=32) as other:
        with other.client() as c:
            assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
        other.wait_idle()
        mine, theirs = scrape(server), scrape(other)
    assert value(theirs, "attnserve_kv_cache_blocks_total") == 32 and value(mine, "attnserve_kv_cache_blocks_total") == 64
    assert sum(value(theirs, "attnserve_request_success_total", finished_reason=r) for r in ("stop", "length")) == 1
