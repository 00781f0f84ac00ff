"""Backpressure (issue 24, finding 2): a request whose caller stops taking outputs is paused once its undelivered
output reaches the bound, so it holds no slot, no KV block and no engine time, and it resumes, with the same tokens
as an unpaused run, once the caller takes its outputs again. Over HTTP, with clients that never read."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

import engine.async_engine as async_engine
from engine import AsyncEngine, SamplingParams
from server_process import ServerProcess, open_stream, reset


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


def test_a_request_nobody_reads_is_paused_and_resumes_with_the_same_tokens(llama, monkeypatch):
    monkeypatch.setattr(async_engine, "MAX_PENDING_ENTRIES", 16)
    engine = AsyncEngine.from_args(str(llama), max_model_len=256, num_kv_blocks=64)
    core = engine.engine.core
    params = SamplingParams(max_tokens=60, temperature=0.8, seed=11, ignore_eos=True, logprobs=3)
    prompt = list(range(5, 25))

    async def go():
        stalled = engine.add_request(prompt, params, request_id="stalled")
        # A token with 3 top logprobs is 4 entries: past 16 the request pauses, after 5 tokens.
        deadline = time.monotonic() + 10
        while "stalled" not in core.scheduler.paused:
            assert time.monotonic() < deadline, "the unread request was never paused"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # paused: nothing more is generated however long the caller stays away
        assert stalled._queue.qsize() == 5
        assert core.stats().num_running == 0 and core.pool.num_free == core.pool.num_blocks  # no slot, no KV
        # Another request runs meanwhile, unhindered.
        other = [o async for o in engine.add_request([7, 8, 9], SamplingParams(max_tokens=4), request_id="other")]
        assert other[-1].finished
        tokens = []
        async for out in stalled:  # the caller comes back: taking half the entries resumes the request
            tokens += out.outputs[0].token_ids
        return tokens

    try:
        paused_tokens = asyncio.run(go())

        async def straight():
            tokens = []
            async for out in engine.add_request(prompt, params, request_id="straight"):
                tokens += out.outputs[0].token_ids
            return tokens

        assert paused_tokens == asyncio.run(straight())
        assert len(paused_tokens) == 60
        assert not core.scheduler.paused and core.pool.num_free == core.pool.num_blocks
    finally:
        engine.shutdown()


def test_a_paused_request_that_is_aborted_frees_everything(llama, monkeypatch):
    monkeypatch.setattr(async_engine, "MAX_PENDING_ENTRIES", 8)
    engine = AsyncEngine.from_args(str(llama), max_model_len=256, num_kv_blocks=64)
    core = engine.engine.core

    async def go():
        stream = engine.add_request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), request_id="gone")
        deadline = time.monotonic() + 10
        while "gone" not in core.scheduler.paused:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await stream.aclose()  # the client hung up
        while core.has_unfinished():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    try:
        asyncio.run(go())
        assert not core.scheduler.paused and core.pool.num_free == core.pool.num_blocks
        assert engine.stats().num_waiting == 0
    finally:
        engine.shutdown()



def test_merging_the_prompts_of_one_request_keeps_the_backpressure():
    """A request of several prompts reads their streams through server.generation.merge; a consumer that stops must
    stop the pumps as well, or the outputs would pile up in merge's queue, where the engine does not count them."""
    from server.generation import merge

    pulled = [0, 0, 0]

    async def endless(i: int):
        while True:
            pulled[i] += 1
            yield i
            await asyncio.sleep(0)

    async def go():
        merged = merge([endless(i) for i in range(3)])
        taken = [await merged.__anext__() for _ in range(5)]
        await asyncio.sleep(0.2)  # the consumer stops reading
        stalled = list(pulled)
        await asyncio.sleep(0.2)
        assert pulled == stalled, "the pumps kept pulling for a consumer that stopped"
        # At most the queue's 3 places, plus one output in each pump's hands, beyond what was taken.
        assert sum(pulled) <= len(taken) + 3 + 3, pulled
        await merged.aclose()
        await asyncio.sleep(0)
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert asyncio.run(go()) == []  # every pump ended with the consumer

# ---- over HTTP: 32 streams whose clients never read ------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's RSS from /proc")
def test_32_streams_nobody_reads_cost_no_engine_time_and_free_everything_on_hang_up(llama):
    """The issue's case: 32 streamed requests (n=16, 20 logprobs) whose clients never read. Once the socket buffers
    are full (the kernel's, up to 4 MB a connection on loopback: 20-30 s here), each request pauses at the bound on its
    undelivered output: the engine stops generating for them, they hold no KV block, and the server's memory stops
    growing (what it holds for them is bounded: 32 x ~0.5 MB of queued outputs, plus each connection's 64 KiB transport
    buffer; the RSS it gained before includes the KV pool's pages, touched for the first time). When the
    clients reset their connections: 32 lines of 499, 32 aborts in /metrics, and nothing left in the engine within a
    second. (The write timeout, 60 s by default, would abort them later; tests/test_slow_clients.py covers it.)"""
    with ServerProcess(llama, "--max-model-len", "32768", "--num-kv-blocks", "16384", startup_timeout=90) as proc:
        with proc.client() as http:
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 200
        before = proc.metrics()
        rss_before = proc.rss_kib() / 1024
        payload = {"prompt": "Once upon a time", "n": 16, "logprobs": 20, "max_tokens": 16000, "ignore_eos": True}
        socks = [open_stream(proc, payload, rcvbuf=4096) for _ in range(32)]
        opened = time.monotonic()
        try:
            deadline = opened + 60
            while (now := proc.metrics())["attnserve_num_requests_waiting"] < 32 or \
                    now["attnserve_num_requests_running"] > 0:
                assert time.monotonic() < deadline, f"not every unread request was paused: {now}"
                time.sleep(0.2)
            paused_after = time.monotonic() - opened
            tokens = now["attnserve_generation_tokens_total"]
            rss_paused = proc.rss_kib() / 1024
            time.sleep(max(3.0, 30 - (time.monotonic() - opened)))  # unread for the 30 s at least
            now = proc.metrics()
            assert now["attnserve_generation_tokens_total"] == tokens, "paused requests still took engine time"
            assert now["attnserve_kv_cache_usage_perc"] == 0  # paused: no KV block held
            rss_end = proc.rss_kib() / 1024
            print(f"all paused after {paused_after:.1f} s, {tokens - before['attnserve_generation_tokens_total']:.0f} "
                  f"tokens generated; RSS {rss_before:.0f} -> {rss_paused:.0f} MiB when paused -> {rss_end:.0f} MiB "
                  f"{time.monotonic() - opened:.0f} s after the streams opened")
            assert rss_end - rss_paused < 16, (rss_paused, rss_end)
        finally:
            for sock in socks:
                reset(sock)
        hung_up = time.monotonic()
        while (now := proc.metrics())["attnserve_num_requests_waiting"] > 0 or now["attnserve_kv_cache_usage_perc"] > 0:
            assert time.monotonic() - hung_up < 1.0, now
            time.sleep(0.05)
        aborts = now["attnserve_request_success_total{abort}"] - before.get("attnserve_request_success_total{abort}", 0)
        assert aborts == 32
        lines = [line for line in proc.log().splitlines() if "request finished" in line and "status=499" in line]
        assert len(lines) == 32, proc.log()[-3000:]
