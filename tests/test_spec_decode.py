"""Speculative decoding with n-gram proposals (engine/spec_decode.py): greedy outputs token for token those of the
engine without it, sampled outputs with the same distribution (tested statistically, with a broken acceptance rule
as the negative control), and nothing it writes outlives a step (KV blocks, prefix-cache entries)."""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import pytest
import torch

from checkpoints import PARITY_PROMPTS
from engine import LLM, SamplingParams
from engine.config import SchedulerConfig, SpeculativeConfig
from engine.errors import ValidationError
from engine.kv_cache import BlockPool
from engine.sampling_params import StructuredOutputsParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec_decode import NgramProposer, accepted, parse_speculative_config, verify_sampled


def ngram(k: int, lo: int = 1, hi: int = 4) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}


# Prompts that repeat themselves, so that prompt lookup finds something to propose.
REPEATING = [p + " " + p for p in PARITY_PROMPTS[:4]] + ["one two three one two three one two"]


# ---- configuration and proposals ----------------------------------------------------------------------------


def test_config_is_vllms_and_refuses_what_it_cannot_do():
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}') == \
        SpeculativeConfig("ngram", 3, 2, 4, disable_by_batch_size=8)
    assert parse_speculative_config(ngram(5, 1, 3)) == SpeculativeConfig("ngram", 5, 1, 3)
    assert parse_speculative_config({**ngram(2), "disable_by_batch_size": None}).disable_by_batch_size is None
    assert parse_speculative_config({"model": "/models/draft", "num_speculative_tokens": 2}) == \
        SpeculativeConfig("draft_model", 2, model="/models/draft")
    for bad, says in [({"method": "ngram"}, "needs num_speculative_tokens"),
                      (ngram(0), "speculative_config.num_speculative_tokens must be in \\[1, 16\\], got 0"),
                      ({**ngram(2), "prompt_lookup_max": 0}, "speculative_config.prompt_lookup_max must be >= 1, got 0"),
                      ({**ngram(2), "typo": 1}, "unknown key\\(s\\) typo"),
                      ({**ngram(2), "disable_by_batch_size": 0},
                       "speculative_config.disable_by_batch_size must be >= 1, got 0"),
                      ({"method": "eagle", "num_speculative_tokens": 2}, 'method must be "ngram"'),
                      ({"method": "draft_model", "num_speculative_tokens": 2}, "must name the draft model's directory"),
                      ("{not json", "must be JSON")]:
        with pytest.raises(ValidationError, match=says):
            parse_speculative_config(bad)


def test_ngram_proposals_follow_the_latest_earlier_match():
    propose = NgramProposer(SpeculativeConfig("ngram", 3, 1, 3)).propose
    #               0  1  2  3  4  5  6  7  8  9
    assert propose([1, 2, 3, 4, 9, 1, 2, 3, 7, 1, 2, 3], 10) == [7, 1, 2]  # the latest "1 2 3" is followed by 7
    assert propose([5, 6, 7, 8, 5, 6], 10) == [7, 8, 5]  # "5 6" (n=2) is longer than any match of n=3
    assert propose([5, 6, 7, 8, 5, 6], 2) == [7, 8]  # no more than the limit
    assert propose([5, 6, 7, 5], 10) == [6, 7, 5]  # n=1 when nothing longer matches
    assert propose([1, 2, 3, 4], 10) == []  # no earlier occurrence
    assert propose([4, 4], 10) == [4]  # the match must have a token after it
    assert NgramProposer(SpeculativeConfig("ngram", 3, 2, 3)).propose([5, 6, 7, 5], 10) == []  # n >= 2 only


def test_acceptance_is_the_common_prefix():
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted([4], [3, 4]) == 0


def test_the_speculative_sampling_rule_gives_the_target_distribution():
    """Drafts drawn from q, verified against p: the first kept token follows p, whatever q (20,000 trials)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts: collections.Counter = collections.Counter()
    for _ in range(20000):
        draft = int(torch.multinomial(q, 1, generator=generator))
        counts[verify_sampled([draft], [q], p, generator)[0]] += 1
    assert max(abs(counts[t] / 20000 - float(p[0, t])) for t in range(4)) < 0.015, counts
    # After a draft that completes a grammar the next row allows nothing (NaN): the output ends with the draft.
    done = torch.tensor([[1.0, 0.0, 0.0, 0.0], [float("nan")] * 4])
    assert verify_sampled([0], [torch.tensor([1.0, 0.0, 0.0, 0.0])], done, generator) == [0]


def test_a_stop_inside_an_accepted_run_ends_the_output_there():
    """update_from_output takes a speculating sequence's tokens one at a time: a token that finishes it drops the rest,
    and its blocks go back to the pool."""
    pool = BlockPool(16)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), 4, pool,
                  proposer=NgramProposer(SpeculativeConfig("ngram", 3, 1, 2)))
    seq = Sequence(0, "r", 0, [1, 2, 3, 1, 2], SamplingParams(max_tokens=10, stop_token_ids=[9]), 10)
    s.add(seq)
    s.update_from_output(s.schedule(), [[3]])
    out = s.schedule()
    assert out.spec_tokens == {0: [1, 2, 3]} and out.scheduled == [(seq, 4)]
    taken = s.update_from_output(out, [[1, 9, 3]])
    assert taken == [(seq, [1, 9])] and seq.output_token_ids == [3, 1, 9]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", 9) and pool.num_free == 16


def test_drafts_never_take_the_output_past_max_tokens():
    pool = BlockPool(16)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), 4, pool,
                  proposer=NgramProposer(SpeculativeConfig("ngram", 5, 1, 2)))
    seq = Sequence(0, "r", 0, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=3), 3)
    s.add(seq)
    s.update_from_output(s.schedule(), [[3]])
    out = s.schedule()
    assert out.spec_tokens == {0: [1]}  # 2 tokens left: one draft and the token after it
    s.update_from_output(out, [[1, 2]])
    assert seq.output_token_ids == [3, 1, 2] and seq.finish_reason == "length"


def test_no_drafts_in_a_batch_larger_than_disable_by_batch_size():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), 4, BlockPool(32),
                  proposer=NgramProposer(SpeculativeConfig("ngram", 3, 1, 2, disable_by_batch_size=1)))
    first = Sequence(0, "a", 0, [1, 2, 3, 1, 2], SamplingParams(max_tokens=10), 10)
    s.add(first)
    s.update_from_output(s.schedule(), [[3]])
    assert s.schedule().spec_tokens == {0: [1, 2, 3]}  # alone: it speculates
    s.add(Sequence(1, "b", 0, [1, 2, 3, 1, 2], SamplingParams(max_tokens=10), 10))
    out = s.schedule()
    assert out.spec_tokens == {} and sorted(n for _, n in out.scheduled) == [1, 5]  # two running: plain decoding


# ---- greedy: identical outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_greedy_outputs_equal_the_engine_without_speculation(make_ckpt, kind):
    """For K in 1, 3, 5, with a pool small enough to preempt and a token budget that chunks the prompts."""
    path = str(make_ckpt(kind))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    plain = LLM(path, max_model_len=256).generate(REPEATING, params, use_tqdm=False)
    for k in (1, 3, 5):
        llm = LLM(path, max_model_len=256, block_size=4, num_kv_blocks=48, max_num_batched_tokens=24,
                  max_num_seqs=8, speculative_config=ngram(k))
        spec = llm.generate(REPEATING, params, use_tqdm=False)
        for a, b in zip(plain, spec, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].text == b.outputs[0].text
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert la.token_id == lb.token_id and abs(la.logprob - lb.logprob) < 1e-4
                assert [t for t, _ in la.top] == [t for t, _ in lb.top]
        stats = llm.engine.stats()
        assert stats.spec_num_accepted_tokens > 0 and stats.num_preemptions > 0, stats
        assert llm.engine.core.pool.num_free == 48


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_greedy_with_a_draft_model_equals_the_engine_without(make_ckpt, kind):
    """A draft model (another architecture's checkpoint with the same tokenizer) proposes; K in 1, 3, 5, with
    preemption and chunked prefill. With the target itself as its draft, every greedy draft is accepted."""
    path, draft = str(make_ckpt(kind)), str(make_ckpt("qwen2" if kind == "llama" else "llama"))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    plain = LLM(path, max_model_len=256).generate(REPEATING, params, use_tqdm=False)
    for k in (1, 3, 5):
        llm = LLM(path, max_model_len=256, block_size=4, num_kv_blocks=48, max_num_batched_tokens=24, max_num_seqs=8,
                  speculative_config={"model": draft, "num_speculative_tokens": k})
        spec = llm.generate(REPEATING, params, use_tqdm=False)
        for a, b in zip(plain, spec, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert la.token_id == lb.token_id and abs(la.logprob - lb.logprob) < 1e-4
        stats = llm.engine.stats()
        assert stats.spec_num_draft_tokens > 0 and stats.num_preemptions > 0, stats
        assert llm.engine.core.pool.num_free == 48
    itself = LLM(path, max_model_len=256, speculative_config={"model": path, "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in itself.generate(REPEATING, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in plain]
    stats = itself.engine.stats()
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0


def test_a_draft_that_cannot_serve_the_model_is_a_startup_error(make_ckpt, tiny_vocab):
    with pytest.raises(ValidationError, match="draft must share the model's vocabulary"):
        LLM(str(make_ckpt("llama")), speculative_config={"model": str(tiny_vocab[0]), "num_speculative_tokens": 2})
    # GPT-2's learned positions end at 256: it cannot draft for a longer context.
    with pytest.raises(ValidationError, match="exceeds the draft model's 256 learned positions"):
        LLM(str(make_ckpt("llama")), max_model_len=512,
            speculative_config={"model": str(make_ckpt("gpt2")), "num_speculative_tokens": 2})


def test_greedy_with_stops_and_a_grammar_equals_the_engine_without(make_ckpt):
    path = str(make_ckpt("llama"))
    plain, spec = LLM(path, max_model_len=256), LLM(path, max_model_len=256, speculative_config=ngram(4))
    reference = plain.generate(REPEATING, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                               use_tqdm=False)
    # A stop token id and a stop string taken from the middle of each output: they end it there, drafts or not.
    for out in reference:
        ids, text = out.outputs[0].token_ids, out.outputs[0].text
        for params in (SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[ids[12]]),
                       SamplingParams(temperature=0.0, max_tokens=40, stop=[text[len(text) // 2:][:3]])):
            a = plain.generate(out.prompt, params, use_tqdm=False)[0].outputs[0]
            b = spec.generate(out.prompt, params, use_tqdm=False)[0].outputs[0]
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
                (b.token_ids, b.text, b.finish_reason, b.stop_reason)
    schema = {"type": "object", "properties": {"w": {"type": "array", "items": {"enum": ["one", "two", "three"]},
                                                     "maxItems": 12}}, "required": ["w"],
              "additionalProperties": False}
    constrained = SamplingParams(temperature=0.0, max_tokens=80,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    a = plain.generate(REPEATING, constrained, use_tqdm=False)
    b = spec.generate(REPEATING, constrained, use_tqdm=False)
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]
    assert all(json.loads(o.outputs[0].text) for o in b)
    assert spec.engine.stats().spec_num_accepted_tokens > 0
    # A draft model samples its drafts under the grammar too: sampled outputs stay valid, greedy ones unchanged.
    drafted = LLM(path, max_model_len=256, speculative_config={"model": str(make_ckpt("qwen3")),
                                                               "num_speculative_tokens": 3})
    assert [o.outputs[0].text for o in drafted.generate(REPEATING, constrained, use_tqdm=False)] == \
        [o.outputs[0].text for o in a]
    sampled = constrained.clone(temperature=1.0, seed=5, n=3)
    for out in drafted.generate(REPEATING, sampled, use_tqdm=False):
        for completion in out.outputs:
            assert completion.finish_reason == "length" or isinstance(json.loads(completion.text)["w"], list)
    assert drafted.engine.stats().spec_num_draft_tokens > 0


# ---- sampling: the same distribution --------------------------------------------------------------------------

VOCAB = 12


def build_tiny_vocab_model(path: Path, seed: int = 0) -> Path:
    """A 12-token Llama with peaked, context-dependent next-token distributions (large init), so that a wrong
    acceptance rule shows in a few thousand samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{VOCAB - 1}"}))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=VOCAB - 1, initializer_range=1.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def position_counts(llm: LLM, prompt: list[int], seeds: range, length: int) -> list[collections.Counter]:
    # Sample i of a request seeded s draws from seed s + i: seeds 1,000 apart keep the 100 samples of each apart.
    params = [SamplingParams(temperature=1.0, n=100, seed=1000 * seed, max_tokens=length, ignore_eos=True)
              for seed in seeds]
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    samples = [c.token_ids for o in outs for c in o.outputs]
    return [collections.Counter(s[j] for s in samples) for j in range(length)]


def total_variation(a: collections.Counter, b: collections.Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[t] / na - b[t] / nb) for t in set(a) | set(b))


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    path = build_tiny_vocab_model(tmp_path_factory.mktemp("tiny-vocab"))
    plain = LLM(str(path), max_model_len=64)
    # A prompt of the model's own greedy text, which falls into loops: prompt lookup then proposes what it tends to
    # say next, and a good share of the drafts is accepted.
    start = [1, 2, 3]
    prompt = start + plain.generate([start], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
    reference = position_counts(plain, prompt, range(0, 30), 4)
    return path, prompt, reference


def test_sampled_outputs_have_the_distribution_of_the_engine_without(tiny_vocab, monkeypatch):
    """3,000 seeded samples of the first 4 tokens, with and without speculation (deterministic: every request is
    seeded): the per-position total variation is what sampling noise gives (under 0.06; equal distributions at this
    size give 0.01-0.04). The negative control, a rule that keeps every draft's position even when its sample
    differs from the draft, is far off."""
    path, prompt, reference = tiny_vocab
    always = {**ngram(3), "disable_by_batch_size": None}  # 3,000 samples at once would otherwise turn it off
    spec = LLM(str(path), max_model_len=64, speculative_config=always)
    counts = position_counts(spec, prompt, range(1000, 1030), 4)
    stats = spec.engine.stats()
    assert stats.spec_num_accepted_tokens > 0.1 * stats.spec_num_draft_tokens, stats  # speculation really ran
    distances = [total_variation(a, b) for a, b in zip(reference, counts)]
    assert max(distances) < 0.06, distances

    monkeypatch.setattr("engine.model_runner.accepted", lambda drafts, sampled: len(drafts))
    broken = LLM(str(path), max_model_len=64, speculative_config=always)
    broken_distances = [total_variation(a, b) for a, b in zip(reference, position_counts(broken, prompt,
                                                                                        range(1000, 1030), 4))]
    assert max(broken_distances) > 0.15, broken_distances


def test_sampling_with_a_draft_model_keeps_the_distribution(tiny_vocab, tmp_path_factory, monkeypatch):
    """A draft that disagrees with the target (another random model) proposes; the speculative-sampling rule keeps
    the target's distribution. The negative control accepts every draft: the output then follows the draft."""
    path, prompt, reference = tiny_vocab
    draft = build_tiny_vocab_model(tmp_path_factory.mktemp("tiny-draft"), seed=1)
    config = {"model": str(draft), "num_speculative_tokens": 3, "disable_by_batch_size": None}
    spec = LLM(str(path), max_model_len=64, speculative_config=config)
    distances = [total_variation(a, b) for a, b in zip(reference, position_counts(spec, prompt, range(1000, 1030), 4))]
    stats = spec.engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens, stats  # drafts accepted and rejected
    assert max(distances) < 0.06, distances

    monkeypatch.setattr("engine.model_runner.verify_sampled", lambda drafts, q, p, generator: drafts + [
        int(torch.multinomial(p[len(drafts)].float(), 1, generator=generator))])
    broken = LLM(str(path), max_model_len=64, speculative_config=config)
    broken_distances = [total_variation(a, b) for a, b in zip(reference, position_counts(broken, prompt,
                                                                                        range(1000, 1030), 4))]
    assert max(broken_distances) > 0.15, broken_distances


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_no_block_leaks_after_mixed_requests_with_aborts(make_ckpt, proposer):
    path = str(make_ckpt("llama"))
    config = ngram(3) if proposer == "ngram" else {"model": str(make_ckpt("mistral")), "num_speculative_tokens": 3}
    llm = LLM(path, max_model_len=256, block_size=4, num_kv_blocks=128, max_num_seqs=8, speculative_config=config)
    engine = llm.engine
    params = [SamplingParams(temperature=t, max_tokens=48, ignore_eos=True, seed=i, n=1 + i % 2)
              for i, t in enumerate([0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0])]
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", REPEATING[i % len(REPEATING)], p)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps in (3, 9, 15):
            engine.abort_request(f"r{steps // 3}")
    assert engine.stats().spec_num_drafts > 0
    assert engine.core.pool.num_free == 128
    # Only accepted tokens were registered in the prefix cache: a prompt of a finished request's whole text reads
    # its blocks and still gives the same greedy continuation as an engine with an empty cache.
    ref = llm.generate(REPEATING[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                       use_tqdm=False)[0]
    follow_up = ref.prompt_token_ids + ref.outputs[0].token_ids
    cached = llm.generate([follow_up], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    fresh = LLM(path, max_model_len=256).generate([follow_up], SamplingParams(temperature=0.0, max_tokens=8),
                                                  use_tqdm=False)[0]
    assert cached.num_cached_tokens > 0 and cached.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert math.isclose(engine.core.pool.usage, 0.0)


def test_compiled_decoder_scores_more_rows_than_sequences(make_ckpt):
    """The compiled LM head is sized for one row per sequence; a speculating step samples at up to K + 1 rows per
    sequence, which it takes in slices (engine/compilation.py)."""
    path = str(make_ckpt("llama"))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(path, max_model_len=256).generate(REPEATING[:2], params, use_tqdm=False)
    llm = LLM(path, max_model_len=256, max_num_seqs=2, enforce_eager=False, speculative_config=ngram(4))
    assert llm.engine.core.runner.compiled is not None
    spec = llm.generate(REPEATING[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.stats().spec_num_draft_tokens > 0


def test_served_with_the_flag_streams_and_counts(make_ckpt):
    from server.cli import parse_serve_args
    from server.serve import engine_args_from
    from server_process import InProcessServer

    args = parse_serve_args(["--speculative-config", json.dumps(ngram(3))])
    assert engine_args_from(args).speculative_config == json.dumps(ngram(3))
    path = make_ckpt("llama")
    body = {"model": "test-model", "prompt": REPEATING[4], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    expected = LLM(str(path), max_model_len=256).generate(REPEATING[4], SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    with InProcessServer(path, max_model_len=256, speculative_config=ngram(3)) as server, server.client() as http:
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        metrics = http.get("/metrics").text
    counts = {name: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("attnserve_spec_decode")
              for name in [line.split("{")[0]]}
    assert counts["attnserve_spec_decode_num_accepted_tokens_total"] > 0
    assert counts["attnserve_spec_decode_num_draft_tokens_total"] >= counts["attnserve_spec_decode_num_accepted_tokens_total"]
    assert counts["attnserve_spec_decode_num_drafts_total"] > 0


def test_a_served_soak_of_speculative_constrained_and_dropped_requests_leaks_nothing(make_ckpt):
    """150 concurrent requests over HTTP on a pool small enough to preempt all the time: n-gram speculation on every
    step, a third of them constrained (JSON schema or regex), streamed or not, 30% dropped mid-flight. Every finished
    constrained output is valid, and afterwards every KV block is free."""
    import asyncio
    import random

    import httpx

    from server_process import InProcessServer

    schema = {"type": "object", "properties": {"w": {"type": "array", "items": {"enum": ["one", "two"]},
                                                     "maxItems": 6}}, "required": ["w"], "additionalProperties": False}

    async def one(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
        body = {"model": "test-model", "prompt": rng.choice(REPEATING), "max_tokens": rng.randint(4, 40),
                "temperature": rng.choice([0.0, 0.8]), "n": rng.choice([1, 1, 2]), "seed": rng.choice([None, i])}
        if rng.random() < 0.2:
            body["structured_outputs"] = {"json": schema}
        elif rng.random() < 0.15:
            body["guided_regex"] = "(ab|cd){1,6}"
        drop = rng.random() < 0.3
        if rng.random() < 0.5:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = 0
                async for _ in r.aiter_lines():
                    lines += 1
                    if drop and lines > 3:
                        return "dropped"
            return "ok"
        request = client.post("/v1/completions", json=body)
        if drop:
            try:
                await asyncio.wait_for(request, timeout=rng.uniform(0.01, 0.2))
            except asyncio.TimeoutError:
                return "dropped"
            return "ok"
        response = await request
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            if "structured_outputs" in body and choice["finish_reason"] == "stop":
                assert len(json.loads(choice["text"])["w"]) <= 6
            if "guided_regex" in body and choice["finish_reason"] == "stop":
                assert re.fullmatch("(ab|cd){1,6}", choice["text"]), choice["text"]
        return "ok"

    async def run(url: str) -> collections.Counter:
        rng, gate = random.Random(0), asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def gated(i: int) -> str:
                async with gate:
                    return await one(client, rng, i)
            return collections.Counter(await asyncio.gather(*[gated(i) for i in range(150)]))

    config = {**ngram(3, 1), "disable_by_batch_size": None}
    with InProcessServer(make_ckpt("llama"), max_model_len=160, num_kv_blocks=40, block_size=4, max_num_seqs=16,
                         speculative_config=config) as server:
        outcomes = asyncio.run(run(server.url))
        server.wait_idle(60)  # every request ended and every block is back
        stats = server.engine.stats()
    assert outcomes["ok"] > 90 and outcomes["dropped"] > 20, outcomes
    assert stats.num_preemptions > 0 and stats.spec_num_accepted_tokens > 0, stats
