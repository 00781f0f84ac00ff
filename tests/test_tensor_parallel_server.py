"""`python -m server --tensor-parallel-size 2` on CPU: the existing openai-client parity tests against it, a rank
that dies or hangs mid-stream, and two "nodes" (separate processes joining over loopback) serving one model.

The parity tests are tests/test_server_openai.py's own, imported here: pytest runs them against this module's
fixtures, so the server they drive has two ranks while the offline reference has one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from checkpoints import PARITY_PROMPTS
from clients.prometheus import parse_metrics
from engine import LLM, SamplingParams
from server_process import REPO, ServerProcess, alive, child_pids
from test_server_lifecycle import (StreamReader, _assert_dead_but_serving, _assert_ends_with_error_event,
                                   assert_openai_error, completion_body)
from test_server_openai import (MAX_MODEL_LEN, MODEL, test_chat_greedy_equals_offline_chat,  # noqa: F401
                                test_completion_logprobs_match_offline_engine,
                                test_completions_greedy_equal_offline_engine,
                                test_echo_logprobs_report_the_prompt_then_the_completion_streamed_or_not,
                                test_prompt_logprobs_in_vllm_shape_on_completions_and_chat,
                                test_streamed_completion_equals_offline_engine)

TP = ("--tensor-parallel-size", "2")


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def server(llama):
    with ServerProcess(llama, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), *TP) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(llama):
    return LLM(str(llama), max_model_len=MAX_MODEL_LEN)  # one rank: the reference


def children(pid: int) -> list[int]:
    return sorted(child_pids(pid))


def test_metrics_show_one_engine_and_its_layout(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        metrics = parse_metrics(http.get("/metrics").text)
    [info] = metrics["attnserve_engine_info"]
    assert info.labels["tensor_parallel_size"] == "2" and "tensor parallel size 2" in info.labels["parallel_layout"]
    assert len(metrics["attnserve_num_requests_running"]) == 1
    assert "tensor parallel size 2 over 1 node(s), 2 rank(s) per node, gloo" in server.log()
    assert "all-reduce through shared memory" in server.log()  # one CPU node: engine/shm_allreduce.py
    [worker] = children(server.proc.pid)
    assert alive(worker)


def _long_stream(proc: ServerProcess) -> StreamReader:
    reader = StreamReader(proc.url, "/v1/completions", completion_body(400, stream=True), started_after=3,
                          deadline_s=60)
    reader.start()
    assert reader.started.wait(30)
    return reader


def test_a_rank_killed_mid_stream_kills_the_engine_not_the_server(llama):
    with ServerProcess(llama, "--max-model-len", "512", *TP) as proc:
        [worker] = children(proc.proc.pid)
        reader = _long_stream(proc)
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        events = reader.finish(timeout=30)
        assert_openai_error(_assert_ends_with_error_event(events), 503)
        assert reader.error_arrived_at() - killed_at < 5
        _assert_dead_but_serving(proc)
        assert "tensor-parallel" in proc.log() or "Connection" in proc.log()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.log()[-3000:]
    assert not alive(worker)


def test_a_rank_that_dies_while_idle_turns_health_to_503_at_once(llama):
    """No step needs to fail first: the engine loop checks the worker processes every turn (at least every 0.5 s)."""
    with ServerProcess(llama, "--max-model-len", "512", *TP) as proc:
        [worker] = children(proc.proc.pid)
        with proc.client(timeout=httpx.Timeout(10.0)) as client:
            assert client.get("/health").status_code == 200
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while (health := client.get("/health")).status_code == 200:
                assert time.monotonic() < deadline, "/health still 200 five seconds after a rank died"
                time.sleep(0.1)
        assert health.status_code == 503 and "worker rank 1" in health.json()["error"]["message"], health.text
        _assert_dead_but_serving(proc)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.log()[-3000:]


def test_a_stopped_rank_ends_the_engine_within_seconds(llama):
    """SIGSTOP: the worker is alive, holds its sockets and answers nothing. Rank 0, waiting for it, sees it stopped
    (check_workers) and ends the engine after a second, without the watchdog (off here)."""
    with ServerProcess(llama, "--max-model-len", "512", "--engine-watchdog-timeout", "0", *TP) as proc:
        [worker] = children(proc.proc.pid)
        reader = _long_stream(proc)
        os.kill(worker, signal.SIGSTOP)
        stopped_at = time.monotonic()
        events = reader.finish(timeout=30)
        err = _assert_ends_with_error_event(events)
        assert_openai_error(err, 503)
        assert "stopped" in err["error"]["message"], err
        assert reader.error_arrived_at() - stopped_at < 10
        _assert_dead_but_serving(proc)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.log()[-3000:]
    assert not alive(worker)


# Rank 1's 40th forward never returns (this sitecustomize is on the server's PYTHONPATH; rank 0 is left alone).
_HANG_RANK_1 = """
import time

import engine.model_runner as runner

_forward = runner.ModelRunner._eager_forward
_calls = [0]


def _eager_forward(self, batch):
    if self.tp is not None and self.tp.rank == 1:
        _calls[0] += 1
        if _calls[0] == 40:
            time.sleep(3600)
    return _forward(self, batch)


runner.ModelRunner._eager_forward = _eager_forward
"""


def test_a_hung_rank_is_caught_by_the_watchdog_and_killed_at_shutdown(llama, tmp_path):
    """A rank that runs but never arrives (not stopped: sleeping in its forward) is the watchdog's to catch."""
    (tmp_path / "sitecustomize.py").write_text(_HANG_RANK_1)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    with ServerProcess(llama, "--max-model-len", "512", "--engine-watchdog-timeout", "3", *TP, env=env) as proc:
        [worker] = children(proc.proc.pid)
        reader = StreamReader(proc.url, "/v1/completions", completion_body(400, stream=True), started_after=3,
                              deadline_s=60)
        reader.start()
        events = reader.finish(timeout=40)
        err = _assert_ends_with_error_event(events)
        assert_openai_error(err, 503)
        assert "watchdog" in err["error"]["message"], err
        assert 2.5 < reader.error_gap() < 10
        _assert_dead_but_serving(proc)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.log()[-3000:]
    assert not alive(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_serve_one_model(llama, offline, tmp_path):
    """Node 1 runs rank 1 headless; node 0 runs rank 0 and serves. They meet at --master-addr:--master-port only."""
    port = _free_port()
    nodes = ("--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "--max-model-len", str(MAX_MODEL_LEN))
    log = (tmp_path / "node1.log").open("w")
    node1 = subprocess.Popen([sys.executable, "-m", "server", "--model", str(llama), *nodes, "--node-rank", "1"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        with ServerProcess(llama, *nodes, "--node-rank", "0") as node0:
            assert children(node0.proc.pid) == []  # rank 1 is node 1's
            expected = offline.generate(PARITY_PROMPTS[:3], SamplingParams(temperature=0, max_tokens=16),
                                        use_tqdm=False)
            with openai.OpenAI(base_url=f"{node0.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
                response = c.completions.create(model=str(llama), prompt=PARITY_PROMPTS[:3], max_tokens=16,
                                                temperature=0)
            assert [x.text for x in response.choices] == [e.outputs[0].text for e in expected]
            assert "all-reduce through torch.distributed" in node0.log()  # across nodes: gloo
            node0.signal(signal.SIGTERM)
            assert node0.wait(timeout=30) == 0
        assert node1.wait(timeout=30) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
    assert "node 1 runs ranks [1]" in (tmp_path / "node1.log").read_text()


def test_two_torchrun_nodes_serve_one_model(llama, offline, tmp_path):
    """The documented torchrun launch, one rank per "node", both on loopback: rank 0 serves, rank 1 follows; stopping
    the server stops rank 1 cleanly."""
    port, http_port = _free_port(), _free_port()
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
             str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "attnserve", "serve",
             str(llama), "--tensor-parallel-size", "2", "--distributed-executor-backend", "external_launcher",
             "--host", "127.0.0.1", "--port", str(http_port), "--max-model-len", str(MAX_MODEL_LEN)],
            cwd=REPO, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in logs[0].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.2)
        expected = offline.generate(PARITY_PROMPTS[3], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
            body = http.post("/v1/completions", json={"prompt": PARITY_PROMPTS[3], "max_tokens": 16,
                                                      "temperature": 0}).json()
        assert body["choices"][0]["text"] == expected[0].outputs[0].text
        procs[0].send_signal(signal.SIGTERM)  # torchrun passes it to rank 0, which drains and stops rank 1
        assert procs[1].wait(timeout=60) == 0, logs[1].read_text()[-3000:]
        procs[0].wait(timeout=60)
        assert "shut down" in logs[0].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
