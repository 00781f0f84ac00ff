"""Scheduling policies over HTTP (issue 24, finding 4): under the default fair policy one request that fills the
engine (many prompts x n) cannot hold up a short one, and its own output is what it would be alone; the `priority`
field needs --scheduling-policy priority, where it decides who runs first."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from engine.default_model import demo_model_path
from server_process import InProcessServer

COMPLETIONS = "/v1/completions"
MODEL = "demo"


@pytest.fixture(scope="module")
def demo_server():
    # 128 slots for 24 prompts x n=16 = 384 samples: the big request alone fills the engine and has samples waiting.
    with InProcessServer(demo_model_path(), served_model_name=MODEL, max_num_seqs=128) as srv:
        yield srv


def _choices(body: dict) -> dict[int, dict]:
    return {c["index"]: c for c in body["choices"]}


def test_a_short_request_beside_one_that_fills_the_engine_finishes_at_once(demo_server):
    prompts = [f"def f{i}(x):" for i in range(24)]
    big = {"model": MODEL, "prompt": prompts, "n": 16, "max_tokens": 24, "temperature": 1.0, "seed": 3,
           "ignore_eos": True}
    short = {"model": MODEL, "prompt": "import os\n", "max_tokens": 8, "temperature": 0.0}
    big_response: dict[str, httpx.Response] = {}

    def send_big():
        with demo_server.client(timeout=300) as c:
            big_response["r"] = c.post(COMPLETIONS, json=big)

    sender = threading.Thread(target=send_big)
    sender.start()
    deadline = time.monotonic() + 60
    while demo_server.engine.stats().num_waiting == 0:  # the big request fills the engine and has more waiting
        assert time.monotonic() < deadline and sender.is_alive(), "the big request never filled the engine"
        time.sleep(0.05)
    with demo_server.client() as c:
        started = time.monotonic()
        r = c.post(COMPLETIONS, json=short)
        elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert sender.is_alive(), "the big request had already finished: the test measured nothing"
    assert elapsed < 2.0, f"the short request took {elapsed:.2f} s beside the big one"

    sender.join(300)
    body = big_response["r"].json()
    assert big_response["r"].status_code == 200, body
    assert len(body["choices"]) == 24 * 16
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 24 * 16 * 24
    # Shared with the short one, preempted and recomputed, its samples are those of the same prompts sent alone.
    with demo_server.client() as c:
        alone = c.post(COMPLETIONS, json={**big, "prompt": prompts[:2]}).json()
    together = _choices(body)
    for index, choice in _choices(alone).items():
        assert together[index]["text"] == choice["text"], index  # choice i*16+k: prompt i, sample k
    demo_server.wait_idle()


def test_priority_needs_the_priority_policy(make_ckpt):
    llama = make_ckpt("llama")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "priority": 1}
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=64) as srv, srv.client() as c:
        r = c.post(COMPLETIONS, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "priority" and "--scheduling-policy priority" in error["message"], error
        assert c.post(COMPLETIONS, json={**body, "priority": 0}).status_code == 200
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -3}
        assert c.post("/v1/chat/completions", json=chat).status_code == 400
        srv.wait_idle()
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=64, scheduling_policy="priority") as srv, \
            srv.client() as c:
        assert c.post(COMPLETIONS, json=body).status_code == 200
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        for bad in (1.5, "high", 2**63):
            r = c.post(COMPLETIONS, json={**body, "priority": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
        srv.wait_idle()
