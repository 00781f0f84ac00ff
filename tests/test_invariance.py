"""Batching must not change results: batch size, prefill chunking, preemption and block size all give
the same tokens as the plain run."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)


def random_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(llm: LLM, prompts, params=GREEDY):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert lx.token_id == ly.token_id
            assert abs(lx.logprob - ly.logprob) < 1e-4


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


def test_batch_of_one_equals_batch_of_64(llama):
    llm = LLM(str(llama), max_model_len=128)
    prompts = random_prompts(64)
    batched = run(llm, prompts)
    alone = [run(llm, [p])[0] for p in prompts]
    assert_same(batched, alone)


def test_seeded_sampling_is_independent_of_the_batch(llama):
    llm = LLM(str(llama), max_model_len=128)
    prompts = random_prompts(64, seed=1)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=None) for _ in prompts[1:]]
    among = llm.generate(prompts, [seeded] + others, use_tqdm=False)[0].outputs[0]
    alone = run(llm, [prompts[0]], seeded)[0]
    assert among.token_ids == alone.token_ids
    again = run(llm, [prompts[0]], seeded)[0]
    assert again.token_ids == alone.token_ids
    other_seed = run(llm, [prompts[0]], seeded.clone(seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_chunked_prefill_equals_one_chunk(kind, make_ckpt):
    path = make_ckpt(kind)
    prompts = random_prompts(8, seed=2, lo=20, hi=70)
    whole = run(LLM(str(path), max_model_len=128, max_num_batched_tokens=2048), prompts)
    chunked = LLM(str(path), max_model_len=128, max_num_batched_tokens=7)
    assert_same(run(chunked, prompts), whole)


def test_preemption_gives_identical_outputs(llama):
    prompts = random_prompts(16, seed=3, lo=20, hi=40)
    roomy = run(LLM(str(llama), max_model_len=64, block_size=4), prompts)
    # 24 blocks of 4 tokens hold under two full sequences at once: decoding must preempt.
    tight_llm = LLM(str(llama), max_model_len=64, block_size=4, num_kv_blocks=24)
    tight = run(tight_llm, prompts)
    assert tight_llm.engine.core.scheduler.num_preemptions > 0
    assert_same(tight, roomy)
    assert tight_llm.engine.core.pool.num_free == 24  # every block came back


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_block_sizes_give_identical_outputs(kind, make_ckpt):
    path = make_ckpt(kind)
    prompts = random_prompts(6, seed=4, lo=10, hi=50)
    results = [run(LLM(str(path), max_model_len=128, block_size=bs), prompts) for bs in (1, 16, 32)]
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


@pytest.mark.parametrize("policy", ["fair", "priority"])
def test_scheduling_policies_give_identical_outputs(llama, policy):
    """fair and priority reorder admissions and preempt running samples to admit others; the tokens (greedy and
    seeded) and logprobs must be those of fcfs. A request of 8 samples runs alone first and holds every slot, then
    the others arrive, as on a server: under fair they take slots from it, under priority the more urgent ones do."""
    prompts = random_prompts(6, seed=5, lo=5, hi=30)
    params = [SamplingParams(n=8, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)]
    params += [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=100 + i, n=1 + i % 3, max_tokens=12,
                              ignore_eos=True, logprobs=2) for i in range(1, len(prompts))]
    priorities = [5, 4, 3, 5, 0, 1]

    def serve(policy: str) -> tuple[dict, int]:
        llm = LLM(str(llama), max_model_len=128, max_num_seqs=8, scheduling_policy=policy)
        engine = llm.engine
        tokens: dict[tuple[str, int], list] = {}

        def step():
            for delta in engine.step():
                for c in delta.outputs:
                    tokens.setdefault((delta.request_id, c.index), []).extend(
                        (lp.token_id, lp.logprob) for lp in c.logprobs)

        engine.add_prepared(engine.prepare_request("0", prompts[0], params[0],
                                                   priority=priorities[0] if policy == "priority" else 0))
        for _ in range(4):
            step()
        for i in range(1, len(prompts)):
            engine.add_prepared(engine.prepare_request(str(i), prompts[i], params[i],
                                                       priority=priorities[i] if policy == "priority" else 0))
        while engine.has_unfinished_requests():
            step()
        assert engine.core.pool.num_free == engine.core.pool.num_blocks
        return tokens, engine.core.scheduler.num_preemptions

    reference, fcfs_preemptions = serve("fcfs")
    reordered, preemptions = serve(policy)
    assert fcfs_preemptions == 0 and preemptions > 0  # the policy did take slots from running samples
    assert reordered.keys() == reference.keys()
    for key, expected in reference.items():
        assert [t for t, _ in reordered[key]] == [t for t, _ in expected], key
        # Logprobs as in assert_same: the batch a token was computed in may move the last digits.
        assert max(abs(a - b) for (_, a), (_, b) in zip(reordered[key], expected)) < 1e-4, key
        assert len(expected) == (24 if key[0] == "0" else 12)
