"""Automatic prefix caching: outputs identical with it on and off (heavy sharing, eviction, preemption), the pool's
reference counts and LRU eviction, collisions caught by the token-id check, salt isolation, and the accounting after
a long randomized run with aborts."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.block_hash import ROOT, block_key, hash_block
from engine.kv_cache import BlockPool
from engine.llm_engine import LLMEngine

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


def shared_workload(seed: int = 0) -> list[list[int]]:
    """The same 3-block system prompt with 50 different suffixes, mixed with 10 unrelated prompts."""
    rng = random.Random(seed)
    system = [rng.randrange(5, 500) for _ in range(3 * BLOCK)]
    shared = [system + [rng.randrange(5, 500) for _ in range(rng.randint(1, 40))] for _ in range(50)]
    unrelated = [[rng.randrange(5, 500) for _ in range(rng.randint(5, 70))] for _ in range(10)]
    mixed = shared + unrelated
    rng.shuffle(mixed)
    return mixed


def run(llm: LLM, prompts, params=GREEDY):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
            assert lx.token_id == ly.token_id and abs(lx.logprob - ly.logprob) < 1e-4


def assert_pool_consistent(engine: LLMEngine) -> None:
    """Every block is exactly one of free, cached (count 0 with contents) or in use, and the counts add up."""
    pool = engine.core.pool
    in_use = sum(1 for b in range(pool.num_blocks) if pool.ref_count(b) > 0)
    plain_free = pool.num_free - pool.num_cached
    assert plain_free + pool.num_cached + in_use == pool.num_blocks
    held = {}
    for seq in list(engine.core.scheduler.running) + list(engine.core.scheduler.waiting):
        for b in seq.block_ids:
            held[b] = held.get(b, 0) + 1
    assert all(pool.ref_count(b) == n for b, n in held.items()), "a block's count differs from its holders"
    assert in_use == len(held)


# ---- outputs do not change --------------------------------------------------------------------------------


def test_heavy_sharing_same_outputs_and_hits(llama):
    prompts = shared_workload()
    on = LLM(str(llama), max_model_len=256, enable_prefix_caching=True)
    off = LLM(str(llama), max_model_len=256, enable_prefix_caching=False)
    # Two passes on the cached engine: the first fills the cache within one batch, the second hits it fully.
    first = run(on, prompts)
    second = run(on, prompts)
    reference = run(off, prompts)
    assert_same(first, reference)
    assert_same(second, reference)
    stats = on.engine.stats()
    assert stats.prefix_cache_hits >= 50 * 3 * BLOCK  # every shared prompt found the system prompt, at least
    assert stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert off.engine.stats().prefix_cache_hits == 0 == off.engine.stats().prefix_cache_queries
    assert_pool_consistent(on.engine)
    assert on.engine.core.pool.num_free == on.engine.core.pool.num_blocks  # idle: nothing in use, the rest is cached


def test_cached_tokens_reported_per_request(llama):
    llm = LLM(str(llama), max_model_len=256)
    prompt = list(range(10, 10 + 3 * BLOCK + 5))
    cold = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    warm = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 3 * BLOCK
    exact = list(range(10, 10 + 2 * BLOCK))  # a prompt of whole blocks keeps its last token to compute
    llm.generate([exact], GREEDY, use_tqdm=False)
    assert llm.generate([exact], GREEDY, use_tqdm=False)[0].num_cached_tokens == BLOCK
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_blocks_filled_during_decode_are_reused(llama):
    """Multi-turn: the next turn resends prompt + answer; the answer's full blocks come from the cache."""
    llm = LLM(str(llama), max_model_len=256)
    prompt = list(range(20, 20 + BLOCK + 3))
    answer = run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2 * BLOCK, ignore_eos=True))[0]
    turn2 = prompt + answer.token_ids + [7, 8, 9]
    out = llm.generate([turn2], GREEDY, use_tqdm=False)[0]
    # The last generated token's K/V were never computed, so the cache covers up to it, in whole blocks.
    assert out.num_cached_tokens == (len(prompt) + len(answer.token_ids) - 1) // BLOCK * BLOCK
    reference = LLM(str(llama), max_model_len=256, enable_prefix_caching=False)
    assert_same([out.outputs[0]], run(reference, [turn2]))


def test_small_pool_eviction_and_preemption_same_outputs(llama):
    prompts = shared_workload(seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    tight = LLM(str(llama), max_model_len=128, num_kv_blocks=24, enable_prefix_caching=True)
    roomy = LLM(str(llama), max_model_len=128, enable_prefix_caching=False)
    outs = run(tight, prompts, params)
    assert_same(outs, run(roomy, prompts, params))
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert_pool_consistent(tight.engine)
    assert tight.engine.core.pool.num_free == 24


# ---- the pool -----------------------------------------------------------------------------------------------


def test_block_shared_by_three_survives_two_frees():
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    pool.register(block, b"h", ("key",))
    pool.acquire(block)
    pool.acquire(block)
    assert pool.ref_count(block) == 3
    pool.free([block])
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_used == 1
    assert pool.allocate(3) and pool.num_free == 0  # the shared block was not handed out
    pool.free([block])
    assert pool.num_cached == 1 and pool.lookup(b"h", ("key",)) == block  # kept for reuse
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([block])


def test_eviction_least_recently_used_first_and_tail_before_head():
    pool = BlockPool(6)
    chain_a = pool.allocate(3)
    chain_b = pool.allocate(2)
    for i, b in enumerate(chain_a + chain_b):
        pool.register(b, bytes([i]), i)
    pool.free(chain_a[::-1])  # a sequence frees its blocks tail first
    pool.free(chain_b[::-1])
    assert pool.num_cached == 5 and pool.num_free == 6
    # The never-used free block goes first, then cached ones: chain A (freed earlier) tail to head, then B.
    order = [pool.allocate(1)[0] for _ in range(6)]
    assert order[1:] == chain_a[::-1] + chain_b[::-1]
    assert pool.num_cached == 0 and all(pool.lookup(bytes([i]), i) is None for i in range(5))


def test_a_cache_hit_revives_a_cached_block_out_of_the_lru():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"a", "a")
    pool.register(b, b"b", "b")
    pool.free([a, b])
    pool.acquire(pool.lookup(b"a", "a"))  # a is in use again: the next allocation must evict b, not a
    assert pool.allocate(1) == [b]
    assert pool.lookup(b"a", "a") == a and pool.lookup(b"b", "b") is None


def test_forced_hash_collision_is_caught_by_the_token_check(llama, monkeypatch):
    """With every block hashing to the same value, a lookup must still never return another prompt's block."""
    monkeypatch.setattr("engine.scheduler.hash_block", lambda parent, tokens, salt: b"collide")
    llm = LLM(str(llama), max_model_len=256)
    a = list(range(30, 30 + 2 * BLOCK + 4))
    b = list(range(300, 300 + 2 * BLOCK + 4))
    run(llm, [a])
    out_b = llm.generate([b], GREEDY, use_tqdm=False)[0]
    assert out_b.num_cached_tokens == 0  # same hash, different tokens: a miss
    reference = LLM(str(llama), max_model_len=256, enable_prefix_caching=False)
    assert_same([out_b.outputs[0]], run(reference, [b]))
    assert llm.generate([a], GREEDY, use_tqdm=False)[0].num_cached_tokens == BLOCK  # its own first block


def test_hash_is_keyed_chained_and_salted():
    tokens = list(range(BLOCK))
    h = hash_block(ROOT, tokens, None)
    assert h == hash_block(ROOT, tokens, None) and len(h) == 16
    assert hash_block(h, tokens, None) != h  # chained: the parent changes it
    assert hash_block(ROOT, tokens, "tenant") != h
    assert hash_block(ROOT, tokens[:-1] + [99], None) != h
    assert block_key(ROOT, tokens, "s") == (ROOT, tuple(tokens), "s")


# ---- salts ----------------------------------------------------------------------------------------------------


def test_salt_isolates_tenants(llama):
    llm = LLM(str(llama), max_model_len=256)
    engine = llm.engine
    prompt = list(range(40, 40 + 3 * BLOCK + 2))

    def cached(salt, rid):
        engine.add_prepared(engine.prepare_request(rid, prompt, GREEDY, cache_salt=salt))
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                out = o if o.request_id == rid else out
        return out.num_cached_tokens

    assert cached("tenant-a", "1") == 0
    assert cached("tenant-b", "2") == 0  # same prompt, other salt: no reuse
    assert cached(None, "3") == 0  # nor without a salt
    assert cached("tenant-a", "4") == 3 * BLOCK  # its own salt: reused
    with pytest.raises(Exception, match="cache_salt"):
        engine.prepare_request("5", prompt, GREEDY, cache_salt="")


# ---- a long randomized run ------------------------------------------------------------------------------------


def test_randomized_run_with_aborts_keeps_the_accounting(llama):
    rng = random.Random(7)
    llm = LLM(str(llama), max_model_len=128, num_kv_blocks=16, max_num_batched_tokens=64)
    engine = llm.engine
    prefixes = [[rng.randrange(5, 500) for _ in range(rng.choice([16, 32, 40]))] for _ in range(4)]
    live: set[str] = set()
    for step in range(400):
        if rng.random() < 0.3 and len(live) < 24:
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randrange(5, 500) for _ in range(rng.randint(1, 20))]
            params = SamplingParams(temperature=1.0, seed=step, max_tokens=rng.randint(1, 60), ignore_eos=True,
                                    n=rng.choice([1, 1, 2]))
            engine.add_prepared(engine.prepare_request(rid, prompt, params))
            live.add(rid)
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
            live.discard(victim)
        for out in engine.step() if engine.has_unfinished_requests() else []:
            if out.finished:
                live.discard(out.request_id)
        assert_pool_consistent(engine)
    for rid in list(live):
        engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert_pool_consistent(engine)
    assert engine.core.pool.num_free == engine.core.pool.num_blocks
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


# ---- over HTTP ----------------------------------------------------------------------------------------------


def test_http_usage_metrics_and_salt(llama):
    from server_process import InProcessServer

    system = "You are a terse assistant. " * 12
    with InProcessServer(llama, max_model_len=256, num_kv_blocks=64) as server, server.client() as c:
        def usage(body):
            response = c.post("/v1/completions", json={"max_tokens": 3, **body})
            assert response.status_code == 200, response.text
            return response.json()["usage"]

        cold = usage({"prompt": system + "first"})
        warm = usage({"prompt": system + "second"})
        assert cold["prompt_tokens_details"] == {"cached_tokens": 0}
        cached = warm["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % BLOCK == 0 and cached < warm["prompt_tokens"]
        assert usage({"prompt": system + "second", "cache_salt": "t1"})["prompt_tokens_details"]["cached_tokens"] == 0
        assert usage({"prompt": system + "third", "cache_salt": "t1"})["prompt_tokens_details"]["cached_tokens"] > 0
        # Streaming usage reports it too, and so does chat.
        lines = c.post("/v1/completions", json={"prompt": system + "fourth", "max_tokens": 2, "stream": True,
                                                "stream_options": {"include_usage": True}}).text.splitlines()
        final = [ln for ln in lines if '"usage":{' in ln][-1]
        assert '"cached_tokens":' + str(cached) in final.replace(" ", "")
        assert c.post("/v1/completions", json={"prompt": "x", "cache_salt": ""}).status_code == 400
        metrics = c.get("/metrics").text
        hits = [float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("attnserve_prefix_cache_hits_total")]
        queries = [float(ln.split()[-1]) for ln in metrics.splitlines()
                   if ln.startswith("attnserve_prefix_cache_queries_total")]
        assert 0 < hits[0] < queries[0]
        assert hits[0] == server.engine.stats().prefix_cache_hits


def test_http_prefix_caching_can_be_switched_off(llama):
    from server_process import ServerProcess

    with ServerProcess(llama, "--no-enable-prefix-caching", "--max-model-len", "256",
                       "--num-kv-blocks", "64") as proc, proc.client() as c:
        prompt = "The same long prompt, sent twice. " * 8
        for _ in range(2):
            body = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert "prefix caching off" in proc.log()
