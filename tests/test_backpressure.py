"""Backpressure in the async engine (issue 24, finding 2): a request whose caller stops taking outputs is paused once
its undelivered output reaches the bound, so it holds no slot, no KV block and no engine time, and it resumes, with
the same tokens as an unpaused run, once the caller takes its outputs again."""

from __future__ import annotations

import asyncio
import time

import pytest

import engine.async_engine as async_engine
from engine import AsyncEngine, SamplingParams


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
