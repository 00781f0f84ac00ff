"""Structured outputs in the engine (engine/structured_output.py): on random weights, which know no JSON, every
output is valid by the constraint alone, however it is sampled and whatever the engine does to the sequence.

Validity is checked against references: jsonschema for schemas, Python's re for regexes, the choice list, and a
hand-written regex equivalent of each grammar.
"""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams, structured_output
from engine.errors import ValidationError
from engine.sampling_params import MAX_GRAMMAR_CHARS, StructuredOutputsParams

# Strings are bounded, so that a random model, which closes a string only by chance, still finishes in max_tokens.
# (Numbers have no length bound in JSON schema: test_number_bounds allows for cut-offs.)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    },
    "required": ["name", "age", "role", "tags", "code"],
    "additionalProperties": False,
}
NESTED = {
    "$defs": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                  "required": ["x", "y"], "additionalProperties": False},
    },
    "type": "object",
    "properties": {
        "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2, "maxItems": 3},
        "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}, {"type": "boolean"}]},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                 "additionalProperties": False},
    },
    "required": ["path", "label", "meta"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "nested": NESTED}
PROMPTS = ["Hello", "The quick brown fox", "def add(a, b):", "Numbers: 3, 14, 159"]


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(str(llama), max_model_len=512, num_kv_blocks=256)


def constrained(max_tokens: int = 200, **kwargs) -> dict:
    """SamplingParams kwargs, constrained by StructuredOutputsParams(**kwargs)."""
    return {"max_tokens": max_tokens, "structured_outputs": StructuredOutputsParams(**kwargs)}


def texts(llm: LLM, prompts, **params) -> list[tuple[str, str]]:
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def assert_valid_json(results, schema) -> None:
    for text, reason in results:
        assert reason == "stop", (text, reason)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=7),
                                      dict(temperature=1.3, top_p=0.95, seed=11, n=3)])
def test_json_schema_outputs_are_valid(llm, name, sampling):
    schema = SCHEMAS[name]
    results = texts(llm, PROMPTS, **sampling, **constrained(json=schema))
    assert len(results) == len(PROMPTS) * sampling.get("n", 1)
    assert_valid_json(results, schema)
    if sampling.get("n", 1) > 1 or sampling["temperature"] > 0:
        assert len({t for t, _ in results}) > 1  # the constraint leaves the model its choices


def test_number_bounds(llm):
    schema = {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                               "n": {"type": "integer", "exclusiveMinimum": 3, "maximum": 40}},
              "required": ["x", "n"], "additionalProperties": False}
    results = texts(llm, PROMPTS, temperature=1.0, seed=4, n=4, **constrained(max_tokens=64, json=schema))
    finished = [r for r in results if r[1] == "stop"]
    assert len(finished) >= len(results) // 2  # a random model may write digits until max_tokens
    assert_valid_json(finished, schema)


def test_json_schema_as_text_and_json_object(llm):
    assert texts(llm, PROMPTS[:2], temperature=0.0, **constrained(json=json.dumps(PERSON))) == \
        texts(llm, PROMPTS[:2], temperature=0.0, **constrained(json=PERSON))
    for text, reason in texts(llm, PROMPTS, temperature=1.0, seed=3, **constrained(max_tokens=400, json_object=True)):
        if reason == "stop":  # any JSON object: a random model may nest past max_tokens
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length"


def test_default_whitespace_is_at_most_one_space(llm):
    # Outside strings, only single spaces may separate JSON tokens (a weak model cannot loop on whitespace).
    for text, _ in texts(llm, PROMPTS, temperature=1.5, seed=5, n=2, **constrained(json=NESTED)):
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert not re.search(r"\s\s|[\t\n\r]", outside_strings), text
    wide = texts(llm, PROMPTS, temperature=1.5, seed=5, n=2,
                 **constrained(json=NESTED, whitespace_pattern=r"[\x20\x0A]{0,3}"))
    assert_valid_json(wide, NESTED)


def test_regex_choice_and_grammars(llm):
    pattern = r"(yes|no): [0-9]{2,4}-[a-z]{3}"
    for text, reason in texts(llm, PROMPTS, temperature=1.0, seed=1, n=2, **constrained(regex=pattern)):
        assert reason == "stop" and re.fullmatch(pattern, text), text
    choices = ["red", "green", "blue jeans", "café"]
    got = texts(llm, PROMPTS, temperature=1.0, seed=2, n=4, **constrained(choice=choices))
    assert {t for t, _ in got} <= set(choices) and len({t for t, _ in got}) > 1
    lark = 'start: expr\nexpr: NUMBER | "(" expr OP expr ")"\nOP: "+" | "*"\nNUMBER: /[0-9]{1,2}/'
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] [0-9]?'
    for grammar, equivalent in ((lark, None), (gbnf, r"\([0-9]{1,2}(,[0-9]{1,2})*\)")):
        for text, reason in texts(llm, PROMPTS, temperature=1.0, seed=3, **constrained(max_tokens=300, grammar=grammar)):
            if equivalent is None:
                assert _is_expr(text), text
            else:
                assert reason == "stop" and re.fullmatch(equivalent, text), text


def _is_expr(text: str) -> bool:
    """The lark grammar above, recognized by hand: NUMBER | ( expr OP expr )."""
    while re.search(r"\([0-9]{1,2}[+*][0-9]{1,2}\)", text):
        text = re.sub(r"\([0-9]{1,2}[+*][0-9]{1,2}\)", "0", text)
    return re.fullmatch(r"[0-9]{1,2}", text) is not None


def test_constrained_and_free_requests_share_a_batch(llm):
    """Masking one row leaves the others untouched: greedy free outputs equal their outputs alone."""
    free = SamplingParams(temperature=0.0, max_tokens=24)
    alone = [o.outputs[0].text for o in llm.generate(PROMPTS, free, use_tqdm=False)]
    mixed_params = [free, SamplingParams(temperature=0.0, **constrained(json=PERSON))] * 2
    mixed = llm.generate(PROMPTS, mixed_params, use_tqdm=False)
    assert [mixed[i].outputs[0].text for i in (0, 2)] == [alone[0], alone[2]]
    assert_valid_json([(mixed[i].outputs[0].text, mixed[i].outputs[0].finish_reason) for i in (1, 3)], PERSON)


def test_grammar_survives_preemption_chunked_prefill_and_prefix_caching(llama, llm):
    """A tiny pool preempts (recompute) mid-output; the matcher follows the kept tokens, so greedy outputs equal the
    roomy engine's. A second round reads the prompts from the prefix cache and gives the same again."""
    params = dict(temperature=0.0, n=2, **constrained(max_tokens=100, json=NESTED))
    prompts = [p * 3 for p in PROMPTS]
    roomy = texts(llm, prompts, **params)
    # A token budget of 8 also splits every prompt into chunks.
    tight = LLM(str(llama), max_model_len=160, block_size=4, num_kv_blocks=48, max_num_batched_tokens=8)
    first = texts(tight, prompts, **params)
    assert tight.engine.core.scheduler.num_preemptions > 0
    again = texts(tight, prompts, **params)
    assert tight.engine.core.scheduler.prefix_cache_hits > 0
    assert first == again == roomy
    assert_valid_json(first, NESTED)
    assert tight.engine.core.pool.num_free == 48


def test_length_cut_and_stop_strings(llm):
    cut = texts(llm, PROMPTS, temperature=0.0, **constrained(max_tokens=3, json=NESTED))
    assert all(reason == "length" for _, reason in cut)  # incomplete: max_tokens ended it first
    # A stop string still ends the output where it appears (the text may then be incomplete JSON).
    for text, reason in texts(llm, PROMPTS, temperature=0.0, stop=['"y"'], **constrained(json=NESTED)):
        assert reason == "stop" and '"y"' not in text


def test_logprobs_are_those_of_the_masked_distribution(llm):
    choices = ["alpha", "beta"]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, logprobs=5, **constrained(choice=choices)),
                       use_tqdm=False)[0].outputs[0]
    first = out.logprobs[0]
    tok = llm.get_tokenizer()
    starts = {t for t in range(tok.vocab_size) if tok.decode([t]) and any(c.startswith(tok.decode([t])) for c in choices)}
    # Only tokens the grammar allows are alternatives, and the allowed tokens' probabilities sum to 1.
    assert {t for t, _ in first.top} <= starts
    assert first.rank == 1 and first.token_id in starts
    if len(starts) <= 5:
        assert sum(math.exp(lp) for _, lp in first.top) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "invalid"),
    (dict(json={"type": "string", "if": {"type": "string"}}), "invalid"),  # a keyword the engine does not implement
    (dict(regex="a(b"), "invalid"),
    (dict(grammar="start: ( unclosed"), "invalid"),
    (dict(choice=[]), "non-empty list"),
    (dict(json={"type": "object"}, regex="a"), "exactly one"),
    (dict(), "exactly one"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="a" * (MAX_GRAMMAR_CHARS + 1)), "characters"),
])
def test_bad_constraints_are_refused_with_the_reason(llm, kwargs, message):
    with pytest.raises(ValidationError, match=message) as err:
        llm.generate("Hello", SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)), use_tqdm=False)
    assert err.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


def test_compiled_grammars_are_cached(llm):
    grammars = llm.engine.processor.grammars
    spec = StructuredOutputsParams(json=PERSON)
    assert grammars.compile(spec) is grammars.compile(StructuredOutputsParams(json=json.dumps(PERSON)))
    assert grammars.compile(spec) is not grammars.compile(StructuredOutputsParams(json=NESTED))


def test_a_compile_over_the_time_limit_is_refused(llm, monkeypatch):
    monkeypatch.setattr(structured_output, "COMPILE_TIMEOUT_S", 0.0)
    with pytest.raises(ValidationError, match="took longer than 0 s; simplify it") as err:
        llm.engine.processor.grammars.compile(StructuredOutputsParams(regex="[a-z]{1,40}x{3}"))  # not cached
    assert err.value.param == "structured_outputs"


def _rule_chain(max_chars: int) -> str:
    """A Lark grammar that chains as many rules as fit in max_chars: r0 -> "x" r1 -> ... -> "y"."""
    lines, n = ["start: r0"], 0
    while sum(map(len, lines)) + len(lines) < max_chars - 40:
        lines.append(f'r{n}: "x" r{n + 1}')
        n += 1
    return "\n".join([*lines, f'r{n}: "y"'])


def test_hostile_constraints_are_refused_or_served_never_fatal(llm):
    """The deepest grammar that fits the size limit recurses ~4,500 levels in llguidance's compiler, past what the
    default 8 MiB thread stack holds (a SIGSEGV of the whole process); deeply nested JSON recurses in Python."""
    chain = _rule_chain(MAX_GRAMMAR_CHARS)
    out = llm.generate("Hi", SamplingParams(temperature=0.0, **constrained(max_tokens=8, grammar=chain)),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "x" * 8 and out.finish_reason == "length"
    nested: dict = {"type": "string"}
    for _ in range(5000):
        nested = {"type": "array", "items": nested}
    with pytest.raises(ValidationError, match="nests too deeply"):
        StructuredOutputsParams(json=nested)
    with pytest.raises(ValidationError, match="nests too deeply"):
        StructuredOutputsParams(json="[" * 5000 + "]" * 5000)
    with pytest.raises(ValidationError, match="invalid"):
        llm.engine.processor.grammars.compile(StructuredOutputsParams(regex="(" * 20000 + "a" + ")" * 20000))
    with pytest.raises(ValidationError, match="invalid"):
        llm.engine.processor.grammars.compile(StructuredOutputsParams(grammar="root ::= " + "(" * 20000 + '"x"' + ")" * 20000))
