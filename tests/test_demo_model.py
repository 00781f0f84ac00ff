"""The committed demo model (models/demo, made by tools/train_demo_model.py): its files are all there and within the
size budget, it loads in attnserve, and greedy completion of a code prompt matches transformers token for token."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
MAX_TOTAL_BYTES = 40_000_000
PROMPT = "def fibonacci(n):\n"
NEW_TOKENS = 24
# Python the model never saw (written for this test). A model that learned nothing scores ln(8192) ~ 9 nats/token.
HELD_OUT_CODE = '''\
def count_words(path, encoding="utf-8"):
    """Return a dict that maps each word in the file at *path* to the number of times it occurs."""
    counts = {}
    with open(path, encoding=encoding) as f:
        for line in f:
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts
'''
MAX_HELD_OUT_LOSS = 4.5  # nats/token; the committed model scores ~3.0 on it, a 30-step smoke run ~7.2


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(MODEL_DIR))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_files_present_and_within_budget():
    missing = [name for name in FILES if not (MODEL_DIR / name).is_file()]
    assert not missing, f"models/demo lacks {missing}"
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= MAX_TOTAL_BYTES, f"models/demo holds {total:,} bytes, over {MAX_TOTAL_BYTES:,}"


def test_tokenizer_and_chat_template_match_transformers(llm):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(MODEL_DIR)
    tok = llm.get_tokenizer()
    assert tok.encode(PROMPT) == ref(PROMPT).input_ids
    assert tok.encode(PROMPT)[0] == tok.bos_token_id == tok.eos_token_id  # <|endoftext|> opens every training file
    messages = [{"role": "user", "content": "Write a function."}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)


def test_greedy_completion_matches_transformers(llm, hf_model):
    prompt = llm.get_tokenizer().encode(PROMPT)
    # min_tokens (min_new_tokens) masks eos on both sides, so both run the full length.
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    ref = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )[0, len(prompt):].tolist()
    assert got == ref


def test_weights_are_trained(llm, hf_model):
    # Guards against shipping an untrained or mis-saved checkpoint (a wrong tensor layout would also score ~9).
    ids = torch.tensor([llm.get_tokenizer().encode(HELD_OUT_CODE)])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert loss < MAX_HELD_OUT_LOSS, f"{loss:.2f} nats/token (perplexity {math.exp(loss):.0f}) on held-out code"


def test_json_schema_gives_valid_output(llm):
    """The demo model (trained on Python, not JSON) writes schema-valid JSON when constrained, sampled or greedy."""
    import json

    import jsonschema

    from engine.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "args": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "returns": {"enum": ["int", "str", "None"]}},
              "required": ["name", "args", "returns"], "additionalProperties": False}
    params = SamplingParams(temperature=0.8, seed=0, n=4, max_tokens=80,
                            structured_outputs=StructuredOutputsParams(json=schema))
    outputs = llm.generate([PROMPT, "# describe the function as JSON\n"], params, use_tqdm=False)
    for completion in (c for o in outputs for c in o.outputs):
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
