"""Operator logs: one line per finished request whose numbers match what the client got, an engine stats line while
busy, JSON lines with --log-format json, and prompts only with --log-prompts."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest

from engine.core import EngineStats
from engine.stats import RequestTimes
from server.logs import JsonFormatter, RequestLog, StatsReporter, TextFormatter
from server_process import InProcessServer, ServerProcess

MODEL = "logs-model"
SECRET = "a prompt that must stay private"


@pytest.fixture(scope="module")
def server(make_ckpt):
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=256, num_kv_blocks=64) as s:
        yield s


@pytest.fixture
def request_lines(caplog):
    caplog.set_level(logging.INFO, logger="attnserve.requests")

    def lines(expected: int, timeout: float = 10.0) -> list[dict]:
        # The line is written as the response ends, which can be just after the client has read it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r.fields for r in caplog.records if r.name == "attnserve.requests"]
            if len(found) >= expected:
                assert len(found) == expected, found
                return found
            time.sleep(0.02)
        raise AssertionError(f"expected {expected} request log lines, got {found}")

    return lines


def check_timings(line: dict) -> None:
    assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["e2e_s"], line


def test_non_streaming_line_matches_usage(server, request_lines):
    with server.client() as c:
        body = c.post("/v1/completions", json={"prompt": ["one two", "three four five"], "max_tokens": 6, "n": 2,
                                               "model": MODEL}).json()
    (line,) = request_lines(1)
    assert line["request_id"] == body["id"]
    assert line["status"] == 200
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["output_tokens"] == body["usage"]["completion_tokens"] == 4 * 6
    assert line["finish_reason"] == "length"
    assert "prompt" not in line
    check_timings(line)


def test_streaming_line_matches_usage(server, request_lines):
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
               "stream_options": {"include_usage": True}}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=payload) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    usage = chunks[-1]["usage"]
    (line,) = request_lines(1)
    assert line["request_id"] == chunks[0]["id"] and line["status"] == 200
    assert (line["prompt_tokens"], line["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert line["finish_reason"] == next(c["choices"][0]["finish_reason"] for c in chunks
                                         if c["choices"] and c["choices"][0]["finish_reason"])
    check_timings(line)


def test_line_aggregates_prompts_and_samples():
    """Several prompts x samples: reasons listed once each in order of appearance, an unfinished sample counts as
    aborted, the longest queue wait and the earliest first token are reported."""
    params = SimpleNamespace(n=2)
    prepared = [SimpleNamespace(params=params, prompt_token_ids=[1, 2, 3], arrival_time=time.monotonic() - 1.0,
                                prompt="first"),
                SimpleNamespace(params=params, prompt_token_ids=[4, 5], arrival_time=time.monotonic() - 0.5,
                                prompt=None)]
    a = SimpleNamespace(num_output_tokens=7, finish_reasons={0: "length", 1: "stop"}, num_cached_tokens=0,
                        metrics=RequestTimes(arrival=10.0, first_scheduled=10.5, first_token=11.0))
    b = SimpleNamespace(num_output_tokens=2, finish_reasons={1: "length"}, num_cached_tokens=16,
                        metrics=RequestTimes(arrival=20.0, first_scheduled=20.1, first_token=20.2))
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: f"decoded {ids}")
    fields = RequestLog("cmpl-x", prepared, [a, b], log_prompts=True).fields(200, tokenizer)
    assert fields["finish_reason"] == "length,stop,abort"
    assert (fields["prompt_tokens"], fields["output_tokens"], fields["cached_tokens"]) == (5, 9, 16)
    assert fields["queue_s"] == 0.5 and fields["ttft_s"] == pytest.approx(0.2)
    assert fields["e2e_s"] >= 1.0
    assert fields["prompt"] == ["first", "decoded [4, 5]"]


def test_client_disconnect_is_logged_as_aborted(server, request_lines):
    payload = {"prompt": "keep going", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=payload) as r:
        for raw in r.iter_lines():
            if raw.startswith("data: {"):
                break  # leave after the first token
    (line,) = request_lines(1)
    assert line["status"] == 499 and line["finish_reason"] == "abort"
    assert 1 <= line["output_tokens"] < 200
    server.wait_idle()


def _stream_until_first_token(client, payload: dict) -> tuple:
    """Open a streamed completion and read up to its first token. Returns the response (still open), its line
    iterator, and the seconds from sending the request to receiving that token, as the client saw them."""
    sent = time.monotonic()
    request = client.build_request("POST", "/v1/completions", json=payload)
    response = client.send(request, stream=True)
    lines = response.iter_lines()
    for raw in lines:
        if raw.startswith("data: {") and json.loads(raw[6:])["choices"][0]["text"]:
            return response, lines, time.monotonic() - sent
    raise AssertionError("the stream ended before its first token")


def test_client_disconnect_logs_the_ttft_of_the_tokens_it_got(server, request_lines):
    """The engine stamps TTFT only on a finished request's output; one the client left still reports it."""
    payload = {"prompt": "keep going", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with server.client() as c:
        response, _, client_ttft = _stream_until_first_token(c, payload)
        response.close()  # leave after the first token
    (line,) = request_lines(1)
    assert line["status"] == 499 and line["finish_reason"] == "abort" and 1 <= line["output_tokens"] < 200
    # The server saw the request arrive after the client sent it, and the token before the client got it.
    assert line["ttft_s"] is not None and 0 < line["ttft_s"] <= client_ttft, (line, client_ttft)
    assert line["ttft_s"] <= line["e2e_s"], line
    server.wait_idle()


def test_engine_stop_logs_the_ttft_of_the_tokens_it_got(make_ckpt, request_lines):
    payload = {"prompt": "keep going", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with InProcessServer(make_ckpt("llama"), max_model_len=512, num_kv_blocks=64) as s, s.client() as c:
        response, lines, client_ttft = _stream_until_first_token(c, payload)
        s.engine.shutdown(reason="stopped by the test")
        rest = list(lines)  # the error event and [DONE]
        response.close()
    (line,) = request_lines(1)
    assert any("stopped by the test" in raw for raw in rest), rest
    assert line["status"] == 503 and line["finish_reason"] == "abort" and 1 <= line["output_tokens"] < 400
    assert line["ttft_s"] is not None and 0 < line["ttft_s"] <= client_ttft, (line, client_ttft)


def test_rejected_request_writes_no_request_line(server, request_lines, caplog):
    with server.client() as c:
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    request_lines(1)  # only the admitted one: refusals show in the access log and request_failure_total


def test_prompts_logged_only_when_asked(make_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="attnserve.requests")
    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=32,
                         server_kwargs={"log_prompts": True}) as s, s.client() as c:
        c.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 2})
        c.post("/v1/completions", json={"prompt": [SECRET, "second"], "max_tokens": 2})
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if r.name == "attnserve.requests"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    first, second = [r.fields["prompt"] for r in caplog.records if r.name == "attnserve.requests"]
    assert SECRET in first
    assert isinstance(second, list) and SECRET in second[0] and "second" in second[1]


def test_disabled_request_log(make_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="attnserve.requests")
    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=32,
                         server_kwargs={"log_requests": False}) as s, s.client() as c:
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.name == "attnserve.requests"]


# ---- formatting -------------------------------------------------------------------------------------


def _record(msg: str, fields: dict | None) -> logging.LogRecord:
    record = logging.LogRecord("attnserve.requests", logging.INFO, __file__, 1, msg, None, None)
    if fields is not None:
        record.fields = fields
    return record


def test_json_formatter_is_one_parseable_object():
    fields = {"request_id": "cmpl-1", "status": 200, "e2e_s": 0.25, "prompt": 'say "hi"\nnow', "queue_s": None}
    line = JsonFormatter().format(_record("request finished", fields))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "request finished" and data["level"] == "INFO"
    assert data["logger"] == "attnserve.requests" and data["time"].endswith("Z")
    assert {k: data[k] for k in fields} == fields


def test_text_formatter_appends_key_values():
    line = TextFormatter().format(_record("request finished", {"status": 200, "e2e_s": 0.123456, "queue_s": None,
                                                               "prompt": "two words"}))
    assert line.endswith('request finished status=200 e2e_s=0.1235 queue_s=- prompt="two words"')
    assert TextFormatter().format(_record("plain", None)).endswith("attnserve.requests: plain")


# ---- engine stats -----------------------------------------------------------------------------------


class _FakeEngine:
    def __init__(self):
        self.now = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks=10,
                               num_preemptions=0)

    def stats(self) -> EngineStats:
        return self.now


def test_stats_reporter_rates_and_silence_when_idle():
    engine = _FakeEngine()
    reporter = StatsReporter(engine, now=0.0)
    assert reporter.report(now=10.0) is None  # idle: nothing to say
    engine.now = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_kv_blocks=10,
                             num_preemptions=4, prompt_tokens_total=1000, generation_tokens_total=500,
                             prefix_cache_queries=1000, prefix_cache_hits=250)
    assert reporter.report(now=20.0) == {"prompt_throughput_tok_s": 100.0, "generation_throughput_tok_s": 50.0,
                                         "running": 3, "waiting": 2, "kv_cache_usage_perc": 25.0, "preemptions": 4,
                                         "prefix_cache_hit_rate_perc": 25.0}
    engine.now = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks=10,
                             num_preemptions=4, prompt_tokens_total=1000, generation_tokens_total=700)
    report = reporter.report(now=25.0)  # finished during the interval: still reported once
    assert report["generation_throughput_tok_s"] == 40.0 and report["preemptions"] == 0
    assert reporter.report(now=35.0) is None


def test_stats_line_reports_speculation_when_it_ran():
    engine = _FakeEngine()
    reporter = StatsReporter(engine, now=0.0)
    engine.now = EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.1, num_kv_blocks=10, num_preemptions=0,
                             generation_tokens_total=90, spec_num_drafts=20, spec_num_draft_tokens=60,
                             spec_num_accepted_tokens=45)
    report = reporter.report(now=10.0)
    # 45 of 60 drafts accepted; each of the 20 verifying steps gave 1 + 45 / 20 tokens.
    assert report["spec_acceptance_rate_perc"] == 75.0 and report["spec_mean_acceptance_length"] == 3.25


# ---- the real process -------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line must parse: no stray text output


def test_json_log_format_end_to_end(make_ckpt):
    with ServerProcess(make_ckpt("llama"), "--log-format", "json", "--max-model-len", "128",
                       "--num-kv-blocks", "32", env={"ATTNSERVE_LOG_STATS_INTERVAL": "0.2"}) as server:
        with server.client() as c:
            body = c.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 30, "ignore_eos": True}).json()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            records = _json_lines(server.log())
            # The last stats line can trail the request line by one interval: wait for one that saw tokens.
            if any(r["logger"] == "attnserve.stats" and r["generation_throughput_tok_s"] > 0 for r in records) \
                    and any(r["logger"] == "attnserve.requests" for r in records):
                break
            time.sleep(0.1)
        log = server.log()
    records = _json_lines(log)
    assert SECRET not in log  # prompts stay out of the logs unless --log-prompts
    (line,) = [r for r in records if r["logger"] == "attnserve.requests"]
    assert line["request_id"] == body["id"] and line["output_tokens"] == 30 and line["finish_reason"] == "length"
    stats = [r for r in records if r["logger"] == "attnserve.stats"]
    assert stats and sum(r["generation_throughput_tok_s"] > 0 for r in stats) >= 1
    assert {"running", "waiting", "kv_cache_usage_perc", "preemptions", "prompt_throughput_tok_s"} <= set(stats[0])
    assert any(r["logger"] == "uvicorn.access" for r in records)  # uvicorn's lines go through the same formatter


def test_log_prompts_flag_end_to_end(make_ckpt):
    with ServerProcess(make_ckpt("llama"), "--log-prompts", "--disable-log-stats", "--max-model-len", "128",
                       "--num-kv-blocks", "32") as server:
        with server.client() as c:
            assert c.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 2}).status_code == 200
        deadline = time.monotonic() + 10
        while "request finished" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log()
    line = next(x for x in log.splitlines() if "attnserve.requests" in x)
    assert f'{SECRET}"' in line and "status=200" in line and "output_tokens=2" in line
    assert "attnserve.stats" not in log


def test_bad_log_format_is_refused():
    with pytest.raises(SystemExit) as exc:
        from attnserve.cli import main
        main(["serve", "--log-format", "xml"])
    assert exc.value.code == 2

