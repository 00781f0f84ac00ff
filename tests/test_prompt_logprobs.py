"""Prompt logprobs in the engine: right under preemption, prefix caching and sliced scoring, free for requests that do
not ask, and max_tokens=0 scoring without sampling. The reference is transformers' log-softmax over each prompt
(tests/test_hf_parity.py checks every architecture the same way)."""

from __future__ import annotations

import random

import pytest
import torch

import engine.model_runner
from engine import LLM, SamplingParams
from engine.errors import ValidationError
from test_hf_parity import assert_prompt_logprobs

TOP = 3


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def reference(llama):
    """prompt ids -> transformers' [len, vocab] log-softmax over them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()

    def log_softmax(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)

    return log_softmax


def random_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def scoring(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": TOP, **kw})


def test_preemption_mid_prompt_and_mid_output_keeps_prompt_logprobs_right(llama, reference):
    # 24 blocks of 4 tokens hold under two full sequences, and a 16-token budget chunks every prompt: sequences are
    # preempted both before their prompt logprobs are complete and after, and recompute.
    llm = LLM(str(llama), max_model_len=64, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)
    scheduler = llm.engine.core.scheduler
    preempted = []
    preempt = scheduler.preempt

    def recording_preempt(seq):
        preempted.append("prompt" if seq.needs_prompt_logprobs else "output")
        preempt(seq)

    scheduler.preempt = recording_preempt
    prompts = random_prompts(12, seed=3, lo=20, hi=40)
    outs = llm.generate(prompts, scoring(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert {"prompt", "output"} <= set(preempted), preempted
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(out.prompt_logprobs, prompt, reference(prompt), TOP, f"{len(prompt)} tokens")
        assert len(out.outputs[0].token_ids) == 20
    assert llm.engine.core.pool.num_free == 24


def test_the_prefix_cache_is_not_read_for_prompt_logprobs_but_is_filled(llama, reference):
    llm = LLM(str(llama), max_model_len=128, block_size=4, enable_prefix_caching=True)
    prompt = random_prompts(1, seed=5, lo=30, hi=30)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    assert llm.generate([prompt], plain, use_tqdm=False)[0].num_cached_tokens == 0
    # The whole prompt is cached now (but its last token), yet scoring it recomputes it all.
    scored = llm.generate([prompt], scoring(), use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    assert_prompt_logprobs(scored.prompt_logprobs, prompt, reference(prompt), TOP, "after a cached run")
    # A scoring request still registers its blocks for the requests after it.
    other = random_prompts(1, seed=6, lo=30, hi=30)[0]
    llm.generate([other], scoring(), use_tqdm=False)
    assert llm.generate([other], plain, use_tqdm=False)[0].num_cached_tokens == 28


def test_requests_without_prompt_logprobs_run_the_lm_head_only_for_sampled_rows(llama, reference):
    llm = LLM(str(llama), max_model_len=128, max_num_batched_tokens=32)
    model = llm.engine.core.runner.model
    rows = []
    compute_logits = model.compute_logits

    def counting(hidden):
        rows.append(hidden.shape[0])
        return compute_logits(hidden)

    model.compute_logits = counting
    prompts = random_prompts(6, seed=7, lo=10, hi=60)
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts, plain, use_tqdm=False)
    assert sum(rows) == 6 * 4  # one row per sampled token
    rows.clear()
    # One request of six scores its prompt (k differs from the others' logprobs); the rest still pay nothing.
    params = [plain.clone(logprobs=1)] * 5 + [plain.clone(prompt_logprobs=TOP)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sum(rows) == 6 * 4 + len(prompts[5]) - 1
    assert all(out.prompt_logprobs is None for out in outs[:5])
    assert_prompt_logprobs(outs[5].prompt_logprobs, prompts[5], reference(prompts[5]), TOP, "in a mixed batch")


def test_scoring_in_slices_equals_scoring_at_once(llama, monkeypatch):
    prompts = random_prompts(4, seed=8, lo=40, hi=60)
    llm = LLM(str(llama), max_model_len=128)
    at_once = llm.generate(prompts, scoring(), use_tqdm=False)
    # Three rows per LM-head call: a 60-token prompt is scored in 20 slices.
    monkeypatch.setattr(engine.model_runner, "_SCORING_LOGITS", 3 * llm.engine.core.runner.config.model.vocab_size)
    sliced = llm.generate(prompts, scoring(), use_tqdm=False)
    for a, b in zip(at_once, sliced):
        assert [lp.token_id for lp in a.prompt_logprobs[1:]] == [lp.token_id for lp in b.prompt_logprobs[1:]]
        assert [lp.logprob for lp in a.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in b.prompt_logprobs[1:]], abs=1e-5)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]  # (the LM head's rounding depends on its rows)
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)


def test_max_tokens_0_scores_the_prompt_without_sampling(llama, reference):
    llm = LLM(str(llama), max_model_len=64, max_num_batched_tokens=16)
    runner = llm.engine.core.runner
    sampled = []
    sampler = runner.sampler
    runner.sampler = lambda logits, seqs: sampled.append(len(seqs)) or sampler(logits, seqs)
    prompts = random_prompts(3, seed=9, lo=20, hi=50) + [random_prompts(1, seed=10, lo=64, hi=64)[0]]
    outs = llm.generate(prompts, scoring(max_tokens=0, n=2), use_tqdm=False)
    assert sampled == []
    for prompt, out in zip(prompts, outs):
        assert [(c.text, c.token_ids, c.finish_reason) for c in out.outputs] == [("", [], "length")] * 2
        assert_prompt_logprobs(out.prompt_logprobs, prompt, reference(prompt), TOP, f"{len(prompt)} tokens")
    assert llm.engine.core.pool.num_free == llm.engine.core.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()
    # A prompt as long as the context fits only when nothing is generated.
    with pytest.raises(ValidationError, match="64 with max_tokens 0") as e:
        llm.generate([prompts[-1]], scoring(max_tokens=1), use_tqdm=False)
    assert e.value.param == "prompt"
