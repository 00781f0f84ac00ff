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
