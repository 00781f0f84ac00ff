"""`attnserve bench` pieces without a server: arrivals, statistics, histogram_quantile, dataset parsing, and the
stream reader against scripted responses (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import httpx
import pytest

from clients.bench import BenchError
from clients.bench.arrivals import arrival_gaps, arrival_times
from clients.bench.cli import main as bench_main
from clients.bench.counters import LocalTokenizer
from clients.bench.datasets import (
    BenchRequest,
    DatasetError,
    build_from_file,
    build_random,
    load_file,
    random_lengths,
)
from clients.bench.metrics import RequestRecord, describe, goodput, meets_slos, percentile, summarize, tpot_ms
from clients.bench.report import format_summary, load_label, plot_title, run_figure, sweep_figure, token_rate_series
from clients.bench.runner import RunConfig, send_request
from clients.bench.scrape import histogram_buckets, histogram_quantile, parse_exposition, server_summary

# ----- arrivals -----


def _take(gen, n: int) -> list[float]:
    return [next(gen) for _ in range(n)]


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_mean_gap_is_one_over_rate(rate):
    gaps = _take(arrival_gaps(rate, 1.0, seed=1), 20000)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_coefficient_of_variation_follows_burstiness(burstiness):
    gaps = _take(arrival_gaps(10.0, burstiness, seed=2), 20000)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.04)  # the mean does not depend on the shape
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert _take(arrival_gaps(math.inf, 0.5, seed=3), 100) == [0.0] * 100
    assert arrival_times(5, math.inf) == [0.0] * 5


def test_arrivals_are_reproducible_and_start_at_zero():
    times = arrival_times(50, 5.0, 1.0, seed=7)
    assert times[0] == 0.0 and times == sorted(times)
    assert times == arrival_times(50, 5.0, 1.0, seed=7)
    assert times != arrival_times(50, 5.0, 1.0, seed=8)


@pytest.mark.parametrize("rate,burstiness", [(0, 1), (-1, 1), (1, 0), (1, math.inf)])
def test_arrivals_refuse_bad_parameters(rate, burstiness):
    with pytest.raises(ValueError):
        next(arrival_gaps(rate, burstiness))


# ----- statistics -----


def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # order must not matter
    # rank = (n - 1) * p / 100 over the sorted values 1, 2, 3, 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5  # rank 1.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 90) == 90
    with pytest.raises(ValueError):
        percentile([], 50)


def test_describe():
    stats = describe([10.0, 20.0, 30.0, 40.0, 50.0])
    assert stats == {"mean": 30.0, "median": 30.0, "p90": pytest.approx(46.0), "p99": pytest.approx(49.6),
                     "max": 50.0}
    assert describe([]) == {"mean": None, "median": None, "p90": None, "p99": None, "max": None}


def test_tpot_excludes_the_first_token():
    assert tpot_ms(e2el_ms=110.0, ttft_ms=20.0, output_len=10) == 10.0  # (110 - 20) / 9
    assert tpot_ms(e2el_ms=50.0, ttft_ms=50.0, output_len=1) is None  # undefined for a single token
    assert tpot_ms(None, 20.0, 10) is None


def _record(i: int, ttft: float, e2el: float, out: int, ok: bool = True, prompt: int = 10) -> RequestRecord:
    return RequestRecord(index=i, prompt_len=prompt, output_len=out, ttft_ms=ttft, e2el_ms=e2el, success=ok,
                         error=None if ok else "http_503", itl_ms=[(e2el - ttft) / max(out - 1, 1)] * (out - 1))


def test_goodput_counts_requests_meeting_every_slo():
    records = [
        _record(0, ttft=100, e2el=1000, out=10),  # tpot 100
        _record(1, ttft=300, e2el=1200, out=10),  # ttft too slow
        _record(2, ttft=100, e2el=2100, out=11),  # tpot 200: too slow for tpot:150
        _record(3, ttft=100, e2el=100, out=1),  # one token: no tpot, so it meets a tpot SLO
        _record(4, ttft=50, e2el=60, out=2, ok=False),  # failed requests never count
    ]
    slos = {"ttft": 200.0, "tpot": 150.0}
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    assert goodput(records, slos, duration_s=4.0) == (2, 0.5)
    assert goodput(records, {"e2el": 1100.0}, duration_s=2.0) == (2, 1.0)  # records 0 and 3


def test_summary_totals_throughput_and_failures():
    records = [_record(0, 10, 100, 10, prompt=20), _record(1, 20, 120, 5, prompt=30),
               _record(2, 0, 0, 0, ok=False), RequestRecord(index=3, error="timeout")]
    s = summarize(records, duration_s=2.0, slos_ms={"ttft": 15.0})
    assert (s["completed"], s["failed"], s["failures"]) == (2, 2, {"http_503": 1, "timeout": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (50, 15)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 7.5 and s["total_token_throughput"] == 32.5
    assert s["ttft_ms"]["median"] == 15.0 and s["e2el_ms"]["max"] == 120.0
    assert s["tpot_ms"]["mean"] == pytest.approx((10 + 25) / 2)  # (100-10)/9 and (120-20)/4
    assert s["goodput"] == {"slos_ms": {"ttft": 15.0}, "good_requests": 1, "request_goodput": 0.5}
    table = format_summary({**s, "server": None})
    assert "Serving Benchmark Result" in table and "timeout:" in table and "Mean TTFT (ms):" in table


def test_token_rate_series_spreads_usage_tokens_over_chunks():
    r = RequestRecord(index=0, start_s=0.0, output_len=8, ttft_ms=100.0, itl_ms=[500.0, 500.0, 500.0], success=True)
    centres, rates = token_rate_series([r], duration_s=2.0, bins=2)
    assert centres == [0.5, 1.5]
    assert rates == [4.0, 4.0]  # chunks at 0.1, 0.6, 1.1, 1.6 s carry 2 tokens each


# ----- server metrics -----


# ----- plots -----


def _point(rate: float | str, concurrency: int | None, throughput: float, ms: float) -> dict:
    stats = {"mean": ms, "median": ms, "p90": ms * 1.2, "p99": ms * 1.5, "max": ms * 2}
    return {"request_rate": rate, "max_concurrency": concurrency, "output_throughput": throughput,
            "ttft_ms": stats, "tpot_ms": stats}


def test_sweep_plot_names_model_and_workload_and_keeps_labels_in_the_frame():
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
    # The rate-inf point is the fastest and the slowest: at the top right corner, where a label drawn up and to
    # the right of its point leaves the axes.
    points = [_point(1, 8, 60, 20), _point(4, 8, 230, 40), _point(16, 8, 400, 90), _point("inf", 8, 520, 900)]
    title = plot_title("attnserve-demo", "random 256→64 tok", load_label([1, 4, 16, math.inf], [8]))
    assert title == "attnserve-demo · random 256→64 tok · rate 1, 4, 16, inf req/s, concurrency 8"
    fig = sweep_figure(points, title)
    fig.canvas.draw()
    assert fig.get_suptitle() == title
    for ax in fig.axes:
        frame = ax.get_window_extent()
        labels = {text.get_text(): text.get_window_extent() for text in ax.texts}
        assert set(labels) == {"1 req/s", "4 req/s", "16 req/s", "inf req/s"}  # the varying part only
        for label, box in labels.items():
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, label


def test_run_plot_names_model_workload_and_load():
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
    records = [_record(i, ttft=10 + i, e2el=50 + i, out=4) for i in range(5)]
    title = plot_title("m", "sharegpt.json, chat", load_label([math.inf], [None]))
    fig = run_figure(records, 2.0, title)
    assert fig.get_suptitle().splitlines() == ["m · sharegpt.json, chat · rate inf, concurrency unlimited",
                                               "5 of 5 requests succeeded in 2.0 s"]


def test_histogram_quantile_matches_hand_computed_values():
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.4)  # rank 5 in (0.1, 0.5]: 0.1 + 0.4 * 3/4
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)  # rank 1 in (0, 0.1]: half way
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.75)  # rank 7 in (0.5, 1.0]: 0.5 + 0.5 * 1/2
    assert histogram_quantile(0.95, buckets) == 1.0  # rank 9.5 in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None  # no observations (NaN in Prometheus)
    assert histogram_quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket
    assert histogram_quantile(0.5, [(-1.0, 4.0), (math.inf, 4.0)]) == -1.0  # non-positive lowest bound


_BEFORE = """# TYPE attnserve_time_to_first_token_seconds histogram
attnserve_time_to_first_token_seconds_bucket{le="0.01",model_name="m"} 1.0
attnserve_time_to_first_token_seconds_bucket{le="0.02",model_name="m"} 2.0
attnserve_time_to_first_token_seconds_bucket{le="0.04",model_name="m"} 2.0
attnserve_time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 2.0
attnserve_time_to_first_token_seconds_count{model_name="m"} 2.0
attnserve_time_to_first_token_seconds_sum{model_name="m"} 0.02
# TYPE attnserve_generation_tokens counter
attnserve_generation_tokens_total{model_name="m"} 100.0
# TYPE attnserve_prompt_tokens counter
attnserve_prompt_tokens_total{model_name="m"} 50.0
"""


def test_server_summary_uses_the_deltas():
    after = (_BEFORE.replace('le="0.01",model_name="m"} 1.0', 'le="0.01",model_name="m"} 1.0')
             .replace('le="0.02",model_name="m"} 2.0', 'le="0.02",model_name="m"} 4.0')
             .replace('le="0.04",model_name="m"} 2.0', 'le="0.04",model_name="m"} 6.0')
             .replace('le="+Inf",model_name="m"} 2.0', 'le="+Inf",model_name="m"} 6.0')
             .replace("} 100.0", "} 180.0").replace("} 50.0", "} 82.0"))
    before_samples, after_samples = parse_exposition(_BEFORE), parse_exposition(after)
    assert histogram_buckets(after_samples, "attnserve_time_to_first_token_seconds")[-1] == (math.inf, 6.0)
    summary = server_summary(before_samples, after_samples)
    # Deltas: (0.01: 0), (0.02: 2), (0.04: 4), (+Inf: 4). Rank 2 ends the 0.02 bucket, so p50 = 20 ms.
    assert summary == {"prompt_tokens": 32, "generation_tokens": 80, "ttft_observations": 4,
                       "ttft_p50_ms": pytest.approx(20.0)}
    assert server_summary(None, after_samples) is None
    other = parse_exposition("# TYPE vllm_x counter\nvllm_x_total 3.0\n")
    assert server_summary(other, other) is None  # not attnserve


# ----- datasets -----


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a"}\n{"prompt": \n', ":2: not valid JSON"),
    ('{"prompt": "a"}\n\n{"text": "a"}\n', ':3: expected exactly one of "prompt"'),
    ('{"prompt": "a", "messages": []}\n', ':1: expected exactly one of "prompt"'),
    ('{"prompt": ""}\n', ":1: 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "max_tokens": 0}\n', ":1: 'max_tokens' must be a positive integer"),
    ('{"prompt": "a", "max_tokens": true}\n', ":1: 'max_tokens' must be a positive integer"),
    ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] must be an object"),
    ('["a"]\n', ":1: expected a JSON object"),
    ('[{"conversations": [{"from": "human", "value": "hi"}]},\n {"conversations": "x"}]', ":2: 'conversations' must"),
    ('[{"conversations": [{"from": "human", "value": "hi"}]},\n\n {"conversations": [{"from": 1}]}]',
     ":3: conversations[0] must be"),
    ('[{"prompt": "a"} {"prompt": "b"}]', "expected ',' or ']'"),
])
def test_dataset_errors_name_the_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "data.jsonl", text)
    with pytest.raises(DatasetError) as err:
        load_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_file(tmp_path / "nope.jsonl")


def test_messages_records_need_the_chat_endpoint(tmp_path):
    path = _write(tmp_path, "d.jsonl", '{"prompt": "a", "max_tokens": 2}\n{"messages": [{"role": "user", '
                                       '"content": "hi"}], "max_tokens": 3}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: a 'messages' record needs --endpoint chat"):
        asyncio.run(build_from_file(path, n=2, chat=False, output_len=None, counter=_no_counter))
    requests, note = asyncio.run(build_from_file(path, n=3, chat=True, output_len=None, counter=_no_counter))
    assert [r.max_tokens for r in requests] == [2, 3, 2] and "cycling" in note
    assert requests[0].messages == [{"role": "user", "content": "a"}] and requests[0].prompt is None


def _no_counter():
    raise AssertionError("records with explicit lengths must not need a tokenizer")


def test_sharegpt_skips_conversations_without_a_prompt_or_answer(tmp_path):
    data = [{"conversations": [{"from": "gpt", "value": "only an answer"}]},
            {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a b c"}]},
            {"conversations": [{"from": "human", "value": "q2"}]}]
    path = _write(tmp_path, "sharegpt.json", json.dumps(data, indent=1))
    records, skipped = load_file(path)
    assert skipped == 1 and [r.prompt for r in records] == ["q1", "q2"]

    class Counter:
        async def encode(self, text):
            return text.split()

    requests, note = asyncio.run(build_from_file(path, n=1, chat=False, output_len=None, counter=Counter))
    assert [(r.prompt, r.max_tokens) for r in requests] == [("q1", 3)] and "skipped 2" in note
    requests, _ = asyncio.run(build_from_file(path, n=2, chat=False, output_len=7, counter=_no_counter))
    assert [(r.prompt, r.max_tokens) for r in requests] == [("q1", 7), ("q2", 7)]


def test_random_lengths_stay_in_range():
    lengths = random_lengths(500, 100, 10, 0.5, seed=0)
    assert all(50 <= p <= 150 and 5 <= o <= 15 for p, o in lengths)
    assert len({p for p, _ in lengths}) > 50
    assert random_lengths(3, 100, 10, 0.0, seed=0) == [(100, 10)] * 3


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tools.bpe import build_bpe_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(build_bpe_tokenizer().to_str())
    return path


def test_random_prompts_have_exact_counts_with_a_local_tokenizer(tokenizer_file):
    tok = LocalTokenizer(tokenizer_file)
    requests = asyncio.run(build_random(tok, n=30, input_len=40, output_len=8, ratio=0.8, seed=5, chat=False))

    async def counts():
        return [await tok.count_prompt(r.prompt) for r in requests]

    assert asyncio.run(counts()) == [r.expected_prompt_len for r in requests]
    assert len({r.expected_prompt_len for r in requests}) > 5


def test_random_chat_prompts_with_a_model_directory(make_ckpt):
    tok = LocalTokenizer(make_ckpt("llama"))
    requests = asyncio.run(build_random(tok, n=5, input_len=30, output_len=4, ratio=0.0, seed=1, chat=True))
    assert all(asyncio.run(tok.count_chat(r.messages)) == 30 for r in requests)
    with pytest.raises(DatasetError, match="chat template"):
        asyncio.run(build_random(tok, n=1, input_len=3, output_len=4, ratio=0.0, seed=1, chat=True))


def test_chat_needs_a_model_directory_not_a_bare_tokenizer(tokenizer_file):
    with pytest.raises(BenchError, match="needs a model directory"):
        asyncio.run(LocalTokenizer(tokenizer_file).count_chat([{"role": "user", "content": "x"}]))
    with pytest.raises(BenchError, match="no such file"):
        LocalTokenizer(tokenizer_file.parent / "missing.json")


# Uses what transformers' template environment has and plain Jinja lacks (raise_exception, a tojson that keeps
# non-ASCII and HTML characters, {% generation %}), the named special tokens, and a special token that only
# tokenizer_config.json declares.
_TRICKY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
    "{% endif %}<|tool_call|>{{ m['content'] | tojson }}{% generation %}{{ m['role'] }}{{ eos_token }}"
    "{% endgeneration %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_local_tokenizer_counts_as_the_server_reads_the_directory(make_ckpt, tmp_path):
    """The reference is the server's own tokenizer (engine/tokenizer.py, which matches transformers): the same
    counts for prompts and templated chats, on a test checkpoint and on a directory whose tokenizer.json truncates
    and lacks a special token the config declares."""
    from engine.tokenizer import Tokenizer
    from tools.bpe import build_bpe_tokenizer, write_tokenizer_files

    tricky = tmp_path / "tricky"
    tricky.mkdir()
    backend = build_bpe_tokenizer()
    backend.enable_truncation(max_length=8)  # the server ignores it; so must the count
    write_tokenizer_files(backend, tricky, chat_template=_TRICKY_TEMPLATE)
    config_path = tricky / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["additional_special_tokens"].append("<|tool_call|>")
    config_path.write_text(json.dumps(config))

    texts = ["", "The river carves valleys over thousands of years, and the sea", "café ☕ <b>&</b> \"quoted\""]
    for directory in (make_ckpt("llama"), tricky):
        ours, server = LocalTokenizer(directory), Tokenizer.from_dir(directory)
        for text in texts:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
            assert asyncio.run(ours.count_prompt(text)) == len(server.encode(text))
            assert asyncio.run(ours.encode(text)) == server.encode(text, add_special_tokens=False)
            assert asyncio.run(ours.count_chat(messages)) == len(server.encode_chat(messages))
    tricky_tok = LocalTokenizer(tricky)
    assert len(asyncio.run(tricky_tok.encode("<|tool_call|>"))) == 1  # registered, as the server registers it
    assert asyncio.run(tricky_tok.count_prompt(texts[1])) > 8  # not truncated
    with pytest.raises(BenchError, match="rendering the chat template failed: no tool turns"):
        asyncio.run(tricky_tok.count_chat([{"role": "tool", "content": "x"}]))


def test_a_model_directory_without_a_chat_template_counts_prompts_only(tmp_path):
    from tools.bpe import build_bpe_tokenizer, write_tokenizer_files

    write_tokenizer_files(build_bpe_tokenizer(), tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    tok = LocalTokenizer(tmp_path)
    assert asyncio.run(tok.count_prompt("hello")) >= 2  # BOS + text
    with pytest.raises(BenchError, match="has no chat template"):
        asyncio.run(tok.count_chat([{"role": "user", "content": "x"}]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no tokenizer.json in it"):
        LocalTokenizer(tmp_path / "empty")


# ----- the stream reader, against scripted responses -----


def _config(**overrides) -> RunConfig:
    values = dict(base_url="http://bench.test", api_key=None, model="m", endpoint="completions", request_timeout=5.0,
                  temperature=0.0, ignore_eos=True, request_rate=math.inf, burstiness=1.0, max_concurrency=None,
                  duration=None, warmup=0, seed=0, progress=False)
    return RunConfig(**{**values, **overrides})


def _sse(*events: object) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}], "usage": None}


USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def _send(body: bytes, status: int = 200, cfg: RunConfig | None = None) -> tuple[RequestRecord, dict]:
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["path"] = request.url.path
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(base_url="http://bench.test", transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, cfg or _config(), "m", BenchRequest("hi", None, 3), 0, 0.0)

    return asyncio.run(go()), seen


def test_a_complete_stream_is_a_success():
    record, seen = _send(_sse(_chunk("a"), _chunk(""), _chunk("b"), _chunk("c"), USAGE, "[DONE]"))
    assert record.success and record.error is None
    assert (record.prompt_len, record.output_len) == (5, 3)
    assert record.ttft_ms is not None and len(record.itl_ms) == 2  # the empty chunk carries no content
    assert record.e2el_ms >= record.ttft_ms
    assert seen["path"] == "/v1/completions"
    assert seen["body"] == {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0.0,
                                 "stream_options": {"include_usage": True}, "ignore_eos": True}


def test_chat_payload_and_role_chunk():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    text = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    record, seen = _send(_sse(role, text, text, text, USAGE, "[DONE]"), cfg=_config(endpoint="chat"))
    assert record.success and len(record.itl_ms) == 2
    assert seen["path"] == "/v1/chat/completions" and seen["body"]["max_completion_tokens"] == 3
    assert "messages" in seen["body"] and "prompt" not in seen["body"]


@pytest.mark.parametrize("body,status,kind", [
    (_sse(_chunk("a"), USAGE), 200, "incomplete_stream"),
    (_sse(_chunk("a"), "[DONE]"), 200, "no_usage"),
    (_sse(_chunk("a"), {"error": {"message": "engine died", "code": 503}}, "[DONE]"), 200, "stream_error"),
    (_sse(_chunk("a"), "not json", "[DONE]"), 200, "invalid_chunk"),
    (b'{"error": {"message": "queue full"}}', 429, "http_429"),
    (b"oops", 500, "http_500"),
])
def test_failure_kinds(body, status, kind):
    record, _ = _send(body, status)
    assert not record.success and record.error == kind and record.error_detail


def test_connection_errors_and_timeouts():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    async def go(handler):
        async with httpx.AsyncClient(base_url="http://bench.test", transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, _config(), "m", BenchRequest("hi", None, 3), 0, 0.0)

    assert asyncio.run(go(refuse)).error == "connection_error"
    assert asyncio.run(go(slow)).error == "timeout"


# ----- command line -----


@pytest.mark.parametrize("argv,message", [
    (["serve", "--request-rate", "0"], "--request-rate: expected requests per second > 0, or inf"),
    (["serve", "--goodput", "latency:3"], "expected KEY:MS"),
    (["serve", "--range-ratio", "1"], "expected a ratio in [0, 1)"),
    (["sweep", "--request-rates", "1,,2"], "comma-separated list"),
])
def test_bad_flags_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["sweep"], "give the points to run"),
    (["serve", "--duration", "5"], "--duration with a request rate of inf needs --max-concurrency"),
])
def test_bad_combinations_fail_before_any_traffic(capsys, argv, message):
    assert bench_main([*argv, "--base-url", "http://127.0.0.1:9"]) == 1
    assert message in capsys.readouterr().err
