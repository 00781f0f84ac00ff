"""`attnserve bench` end to end, through `attnserve.cli.main`, against live loopback servers on a tiny checkpoint.

Each run is small (tens of requests of a few tokens), so every test takes seconds on a 2-core CPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import socket

import httpx
import pytest

from attnserve.cli import main
from clients.bench.scrape import GENERATION_TOKENS, PROMPT_TOKENS, parse_exposition, total
from server_process import InProcessServer, ServerProcess

MODEL = "bench-model"
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server(make_ckpt):
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=MAX_MODEL_LEN,
                         num_kv_blocks=256) as s:
        yield s


def _server_tokens(url: str) -> tuple[float, float]:
    samples = parse_exposition(httpx.get(url + "/metrics", timeout=30).text)
    return total(samples, PROMPT_TOKENS), total(samples, GENERATION_TOKENS)


def _bench(url: str, tmp_path, *args: str, command: str = "serve", expect: int = 0) -> dict:
    out = tmp_path / f"results-{len(list(tmp_path.iterdir()))}.json"
    rc = main(["bench", command, "--base-url", url, "--disable-tqdm", "--out", str(out), *args])
    assert rc == expect
    return json.loads(out.read_text())


def _check_ordered_percentiles(summary: dict) -> None:
    for metric in ("ttft", "tpot", "itl", "e2el"):
        stats = summary[f"{metric}_ms"]
        assert 0 <= stats["median"] <= stats["p90"] <= stats["p99"] <= stats["max"], (metric, stats)


def test_random_workload_exact_lengths_and_server_deltas(server, tmp_path, capsys):
    before = _server_tokens(server.url)
    data = _bench(server.url, tmp_path, "--num-prompts", "40", "--request-rate", "20", "--max-concurrency", "8",
                  "--input-len", "16", "--output-len", "8", "--goodput", "ttft:60000", "e2el:60000")
    after = _server_tokens(server.url)
    summary, records = data["summary"], data["records"]

    assert len(records) == 40 and summary["completed"] == 40 and summary["failed"] == 0
    assert summary["failures"] == {}
    assert all(r["success"] and r["prompt_len"] == 16 and r["expected_prompt_len"] == 16 for r in records)
    assert all(r["max_tokens"] == 8 and r["output_len"] == 8 for r in records)
    assert all(r["ttft_ms"] > 0 and r["e2el_ms"] >= r["ttft_ms"] and r["tpot_ms"] > 0 for r in records)
    assert all(isinstance(r["itl_ms"], list) and r["error"] is None for r in records)
    _check_ordered_percentiles(summary)

    # Client totals come from the usage chunks; the server counts the same tokens.
    assert summary["total_input_tokens"] == 40 * 16 == after[0] - before[0]
    assert summary["total_output_tokens"] == 40 * 8 == after[1] - before[1]
    server_side = summary["server"]
    assert server_side["prompt_tokens"] == 640 and server_side["generation_tokens"] == 320
    assert server_side["ttft_observations"] == 40 and server_side["ttft_p50_ms"] > 0
    assert summary["goodput"]["good_requests"] == 40
    assert summary["request_throughput"] == pytest.approx(40 / summary["duration_s"])
    assert summary["max_concurrency"] == 8 and summary["request_rate"] == 20

    config = data["config"]
    assert config["model"] == MODEL and config["request_rate"] == 20 and "api_key" not in config
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Server TTFT p50 (ms):" in out and "Mean TPOT (ms):" in out


def test_default_lengths_fit_the_servers_max_model_len(server, tmp_path, capsys):
    # vLLM's defaults (1024 + 128 tokens) do not fit this server's 128; they are scaled down, and the line says so.
    data = _bench(server.url, tmp_path, "--num-prompts", "2")
    records = data["records"]
    assert data["summary"]["failed"] == 0
    assert (data["config"]["input_len"], data["config"]["output_len"]) == (113, 14)  # 8:1, 127 of 128 tokens
    assert all(r["prompt_len"] == 113 and r["output_len"] == 14 for r in records)
    err = capsys.readouterr().err
    assert f"lowered to fit the server's max_model_len {MAX_MODEL_LEN}" in err


def test_lengths_that_cannot_fit_fail_before_any_request(server, capsys):
    before = _server_tokens(server.url)
    for command, points in (("serve", []), ("sweep", ["--max-concurrencies", "1"])):
        assert main(["bench", command, "--base-url", server.url, "--disable-tqdm", *points, "--input-len", "120",
                     "--output-len", "9"]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"attnserve bench {command}: error: --input-len 120 + --output-len 9 reach 129 tokens, above "
                       f"the server's max_model_len {MAX_MODEL_LEN}; lower them")
    assert _server_tokens(server.url) == before  # no completion request reached the server


def test_vllm_flag_names(server, tmp_path):
    results = tmp_path / "results"
    rc = main(["bench", "serve", "--base-url", server.url, "--disable-tqdm", "--num-prompts", "4",
               "--dataset-name", "random", "--random-input-len", "12", "--random-output-len", "4",
               "--random-range-ratio", "0.5", "--max-concurrency", "2", "--save-result", "--result-dir", str(results)])
    assert rc == 0
    [saved] = results.iterdir()
    assert saved.name.startswith(f"completions-infqps-concurrency2-{MODEL}-") and saved.suffix == ".json"
    data = json.loads(saved.read_text())
    assert data["config"]["input_len"] == 12 and data["config"]["range_ratio"] == 0.5
    assert all(6 <= r["prompt_len"] <= 18 and 2 <= r["output_len"] <= 6 for r in data["records"])


def test_chat_endpoint_counts_the_templated_prompt(server, tmp_path):
    before = _server_tokens(server.url)
    data = _bench(server.url, tmp_path, "--endpoint", "chat", "--num-prompts", "12", "--input-len", "30",
                  "--range-ratio", "0.3", "--output-len", "6", "--max-concurrency", "4")
    after = _server_tokens(server.url)
    records = data["records"]
    assert data["summary"]["failed"] == 0
    assert all(r["prompt_len"] == r["expected_prompt_len"] for r in records)
    assert len({r["prompt_len"] for r in records}) > 1  # --range-ratio varied them
    assert all(r["output_len"] == r["max_tokens"] for r in records)
    assert data["summary"]["total_input_tokens"] == after[0] - before[0]
    assert data["summary"]["total_output_tokens"] == after[1] - before[1]


def test_local_tokenizer_counts_like_the_server(server, make_ckpt, tmp_path):
    data = _bench(server.url, tmp_path, "--tokenizer", str(make_ckpt("llama")), "--endpoint", "chat",
                  "--num-prompts", "6", "--input-len", "24", "--output-len", "3")
    assert all(r["success"] and r["prompt_len"] == r["expected_prompt_len"] == 24 for r in data["records"])


def test_jsonl_dataset(server, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Once upon a time", "max_tokens": 3},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
         "max_tokens": 5},
        {"prompt": "The river", "max_tokens": 4},
    ]) + "\n")
    data = _bench(server.url, tmp_path, "--dataset", str(path), "--endpoint", "chat", "--num-prompts", "6")
    records = data["records"]
    assert data["summary"]["failed"] == 0
    assert [r["max_tokens"] for r in records] == [3, 5, 4, 3, 5, 4]
    assert all(r["output_len"] == r["max_tokens"] and r["prompt_len"] > 0 for r in records)
    assert records[0]["prompt_len"] == records[3]["prompt_len"]  # cycled: the same record


def test_sharegpt_dataset(server, tmp_path):
    answers = ["Paris is the capital.", "Rivers carve valleys over thousands of years."]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                      {"from": "gpt", "value": answers[0]}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no question"}]},  # skipped: no human turn
        {"id": "c", "conversations": [{"from": "human", "value": "Tell me about rivers."},
                                      {"from": "gpt", "value": answers[1]},
                                      {"from": "human", "value": "More?"}]},
    ], indent=2))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        expected = [client.post("/tokenize", json={"prompt": a, "add_special_tokens": False}).json()["count"]
                    for a in answers]
    # vLLM's spelling, which also checks that the file is ShareGPT (tests/test_bench_cli_names.py: the mismatch).
    data = _bench(server.url, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "2")
    assert [r["max_tokens"] for r in data["records"]] == expected
    assert all(r["success"] and r["output_len"] == r["max_tokens"] for r in data["records"])


def test_duration_cycles_the_prompts_until_time_is_up(server, tmp_path):
    data = _bench(server.url, tmp_path, "--duration", "1.5", "--request-rate", "20", "--max-concurrency", "4",
                  "--num-prompts", "5", "--input-len", "12", "--output-len", "4")
    records = data["records"]
    assert len(records) > 5 and data["summary"]["failed"] == 0  # more requests than distinct prompts
    assert max(r["start_s"] for r in records) < 1.5
    assert data["summary"]["duration_s"] >= 1.4


def test_warmup_is_excluded(server, tmp_path):
    before = _server_tokens(server.url)
    data = _bench(server.url, tmp_path, "--warmup", "3", "--num-prompts", "5", "--input-len", "12",
                  "--output-len", "4", "--max-concurrency", "2")
    after = _server_tokens(server.url)
    summary = data["summary"]
    assert len(data["records"]) == 5 and data["warmup"] == {"requests": 3, "failed": 0}
    assert summary["total_output_tokens"] == 5 * 4 == summary["server"]["generation_tokens"]
    assert after[1] - before[1] == 8 * 4  # the server saw the warmup too; the results do not
    assert summary["server"]["ttft_observations"] == 5


def test_plot_writes_a_png(server, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    png = tmp_path / "latency.png"
    _bench(server.url, tmp_path, "--num-prompts", "8", "--input-len", "12", "--output-len", "4", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_two_points(server, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    args = ["--max-concurrencies", "1,4", "--num-prompts", "6", "--input-len", "12", "--output-len", "4"]
    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--plot", str(png)]
    data = _bench(server.url, tmp_path, *args, command="sweep")
    points = data["points"]
    assert [p["summary"]["max_concurrency"] for p in points] == [1, 4]
    assert all(len(p["records"]) == 6 and p["summary"]["failed"] == 0 for p in points)
    assert all(p["summary"]["server"]["generation_tokens"] == 24 for p in points)
    out = capsys.readouterr().out
    assert "out tok/s" in out and "TTFT p99" in out
    if "--plot" in args:
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_http_errors_are_counted_by_status(server, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 2}\n')
    data = _bench(server.url, tmp_path, "--dataset", str(path), "--num-prompts", "3", "--model", "no-such-model",
                  expect=1)
    assert data["summary"]["failures"] == {"http_404": 3}
    assert all("no-such-model" in r["error_detail"] for r in data["records"])


def test_request_timeout(server, tmp_path):
    data = _bench(server.url, tmp_path, "--num-prompts", "2", "--input-len", "12", "--output-len", "16",
                  "--request-timeout", "0.001", expect=1)
    assert data["summary"]["failures"] == {"timeout": 2}
    server.wait_idle()  # the aborted requests were cleaned up by the server


def test_unreachable_server_is_one_line(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnserve bench serve: error: cannot reach") and len(err.splitlines()) == 1
    # With a model and a file, no control call is needed: every request fails with a connection error.
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 2}\n')
    data = _bench(f"http://127.0.0.1:{port}", tmp_path, "--dataset", str(path), "--model", "m", "--num-prompts", "2",
                  expect=1)
    assert data["summary"]["failures"] == {"connection_error": 2} and data["summary"]["server"] is None


def test_error_event_inside_a_200_stream_is_a_failure(make_ckpt, tmp_path):
    # The engine loop dies in its 4th model forward: streams already running end with an error event (status 200 already
    # sent), and requests arriving later are refused with 503.
    with ServerProcess(make_ckpt("llama"), "--max-model-len", str(MAX_MODEL_LEN), "--disable-log-stats",
                       fault="raise@4") as proc:
        data = _bench(proc.url, tmp_path, "--num-prompts", "6", "--input-len", "12", "--output-len", "32",
                      "--request-rate", "inf", expect=1)
        # Once the engine is dead, the server refuses new requests before any stream starts.
        later = _bench(proc.url, tmp_path, "--num-prompts", "3", "--input-len", "12", "--output-len", "4", expect=1)
    assert later["summary"]["failures"] == {"http_503": 3}
    summary = data["summary"]
    summary_failures = summary["failures"]
    assert summary["completed"] == 0 and summary["failed"] == 6
    assert summary_failures.get("stream_error", 0) >= 1
    assert set(summary_failures) <= {"stream_error", "http_503"}
    streamed = [r for r in data["records"] if r["error"] == "stream_error"]
    assert all(r["error_detail"] for r in streamed)


def test_offline_runs_in_process(make_ckpt, tmp_path, capsys, monkeypatch):
    import benchmarks.offline as offline

    monkeypatch.setattr(offline, "_transformers_available", lambda: False)
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", "--model", str(make_ckpt("llama")), "--num-prompts", "4", "--input-len", "6",
                 "--output-len", "3", "--range-ratio", "0.34", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformers is not installed" in printed and "attnserve:" in printed
    report = json.loads(out.read_text())
    assert report["workload"] == {"requests": 4, "input_len": [3, 9], "output_len": [1, 5]}
    assert report["transformers"] == [] and report["attnserve"]["output_tokens"] >= 4
    # Eager: tests/conftest.py sets ATTNSERVE_ENFORCE_EAGER=1, and the printed line says which path ran.
    assert report["attnserve"]["compiled"] is False and report["attnserve"]["ready_s"] > 0
    assert "(eager, ready after" in printed
