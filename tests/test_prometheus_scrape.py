"""A real Prometheus (Debian's `prometheus` binary, which .ci/run installs) scrapes a live server every second on
loopback while it serves a small workload; its query API must then see generation throughput and a TTFT quantile."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_process import InProcessServer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Debian's prometheus binary is not on PATH (apt-get install prometheus; .ci/run installs it)",
)
MODEL = "scraped-model"
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "prometheus.yml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _query(client: httpx.Client, expr: str) -> list[dict]:
    response = client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(client: httpx.Client, expr: str, ok, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = _query(client, expr)
        if result and ok(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr} never satisfied the check; last result {result}")


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus with the shipped deploy/prometheus/prometheus.yml, its target pointed at a live server and
    its interval cut to 1 s: yields `start(target_host_port, api_key) -> query client`."""
    procs: list[subprocess.Popen] = []
    log = tmp_path / "prometheus.log"

    def start(target: str, api_key: str = "") -> httpx.Client:
        shipped = SHIPPED_CONFIG.read_text()
        assert "attnserve:8000" in shipped and "scrape_interval: 5s" in shipped
        config = tmp_path / "prometheus.yml"
        config.write_text(shipped.replace("attnserve:8000", target).replace("scrape_interval: 5s",
                                                                            "scrape_interval: 1s"))
        (tmp_path / "api_key").write_text(api_key)  # the credentials_file, next to the config as in compose
        port = _free_port()
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT))
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert procs[0].poll() is None, f"prometheus exited:\n{log.read_text()}"
            try:
                if client.get("/-/ready").status_code == 200:
                    return client
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after 60 s:\n{log.read_text()}")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("api_key", ["", "scrape-key"], ids=["no-key", "with-key"])
def test_prometheus_scrapes_throughput_and_ttft(make_ckpt, prometheus, api_key):
    """With an API key, Prometheus sends it from the credentials file (without it, /metrics is a 401)."""
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, max_model_len=256, num_kv_blocks=64,
                         server_kwargs={"api_key": api_key or None}) as server:
        query = prometheus(server.url.removeprefix("http://"), api_key)
        stop = threading.Event()
        done = []
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

        def workload() -> None:
            # Steady traffic for a while, so that several 1 s scrapes see the counters move.
            with server.client(headers=headers) as c:
                while not stop.is_set():
                    r = c.post("/v1/completions", json={"prompt": "count with me", "max_tokens": 16,
                                                        "ignore_eos": True, "stream": len(done) % 2 == 0})
                    assert r.status_code == 200
                    done.append(1)

        thread = threading.Thread(target=workload, daemon=True)
        thread.start()
        try:
            up = _wait_for(query, 'up{job="attnserve"}', lambda r: r[0]["value"][1] == "1")
            assert up[0]["metric"]["instance"] == server.url.removeprefix("http://")
            rate = _wait_for(query, "rate(attnserve_generation_tokens_total[5s])",
                             lambda r: float(r[0]["value"][1]) > 0)
            assert rate[0]["metric"]["model_name"] == MODEL
            p90 = _wait_for(
                query, "histogram_quantile(0.9, sum by (le) (rate(attnserve_time_to_first_token_seconds_bucket[5s])))",
                lambda r: math.isfinite(float(r[0]["value"][1])))
            ttft = float(p90[0]["value"][1])
            assert 0 < ttft <= 2560  # inside the bucket range: a real quantile, not +Inf
        finally:
            stop.set()
            thread.join(60)
        assert done
