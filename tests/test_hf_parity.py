"""HF parity: greedy tokens and top-5 logprobs against transformers, for every supported architecture.

All prompts run together through the engine (one continuous batch); transformers runs each prompt
alone. Token ids must be identical over 32 new tokens and the top-5 logprobs within 1e-4 (fp32).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from checkpoints import KINDS, PARITY_PROMPTS

NEW_TOKENS = 32
TOP = 5


@pytest.fixture
def hf_model():
    from transformers import AutoModelForCausalLM

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return load


def hf_greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy ids and the per-step log-softmax of the raw logits."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # keeps eos from ending the reference early
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    ids = out.sequences[0, len(prompt_ids):].tolist()
    return ids, [torch.log_softmax(step[0].float(), -1) for step in out.logits]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_logprobs_match_transformers(kind, make_ckpt, hf_model):
    path = make_ckpt(kind)
    llm = LLM(str(path), block_size=16, max_model_len=256)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PARITY_PROMPTS]
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) >= 6  # different lengths
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    model = hf_model(path)
    for prompt, out in zip(prompts, outputs):
        ref_ids, ref_logprobs = hf_greedy(model, prompt)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"{kind}: greedy ids diverge for a {len(prompt)}-token prompt"
        assert got.finish_reason == "length"
        for step, (lp, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            ref_top = torch.topk(ref, TOP)
            got_ids = [t for t, _ in lp.top]
            got_vals = torch.tensor([v for _, v in lp.top])
            assert got_ids == ref_top.indices.tolist(), f"{kind}: top-{TOP} ids differ at step {step}"
            torch.testing.assert_close(got_vals, ref_top.values, atol=1e-4, rtol=0)
            assert lp.token_id == ref_ids[step]
            assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4


# The five architectures (the other kinds differ only in how their files are stored).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def assert_prompt_logprobs(got, prompt: list[int], ref: torch.Tensor, top: int, where: str) -> None:
    """got: an engine's prompt logprobs; ref: transformers' [len(prompt), vocab] log-softmax over the prompt."""
    assert len(got) == len(prompt) and got[0] is None, where
    for j in range(1, len(prompt)):
        lp, row = got[j], ref[j - 1]
        value = row[prompt[j]].item()
        assert lp.token_id == prompt[j], where
        assert abs(lp.logprob - value) < 1e-4, f"{where}: token {j}: {lp.logprob} vs {value}"
        # The rank counts the tokens more likely than it; tokens within fp32 noise of it may fall either way.
        assert 1 + (row > value + 1e-4).sum() <= lp.rank <= 1 + (row > value - 1e-4).sum(), f"{where}: rank, {j}"
        # Each alternative's logprob is transformers' for that id, and together they are a top-k (ties again
        # within noise may be ordered either way).
        assert len(lp.top) == top and len({t for t, _ in lp.top}) == top, where
        kth = torch.topk(row, top).values[-1].item()
        for token, logprob in lp.top:
            assert abs(logprob - row[token].item()) < 1e-4 and logprob > kth - 1e-4, f"{where}: top at {j}"


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_prompt_logprobs_match_transformers(kind, make_ckpt, hf_model):
    path = make_ckpt(kind)
    # A 24-token budget splits the longer prompts over up to three steps, next to other prompts' chunks, and 20
    # blocks of 4 tokens hold one long sample, or a few short ones: later chunks preempt the newest sequences.
    llm = LLM(str(path), block_size=4, max_model_len=80, max_num_batched_tokens=24, num_kv_blocks=20)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PARITY_PROMPTS]
    # The longest prompt's first blocks are in the prefix cache now; prompt logprobs must not use them.
    llm.generate(prompts[-1:], SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=TOP, n=2)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    model = hf_model(path)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        assert out.num_cached_tokens == 0
        assert [len(c.token_ids) for c in out.outputs] == [6, 6]
        assert_prompt_logprobs(out.prompt_logprobs, prompt, ref, TOP, f"{kind}, a {len(prompt)}-token prompt")
    assert llm.engine.core.scheduler.num_preemptions > 0
