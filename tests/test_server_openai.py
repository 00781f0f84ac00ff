"""The live server driven by the official `openai` package and by raw httpx: the OpenAI schema, SSE framing, and
text identical to the offline engine's for the same prompts (greedy).

One real `python -m server` subprocess on a loopback port serves the whole module.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from checkpoints import PARITY_PROMPTS
from engine import LLM, SamplingParams
from server_process import ServerProcess

MODEL = "test-model"
MAX_MODEL_LEN = 256
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def server(llama):
    with ServerProcess(llama, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN)) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(llama):
    return LLM(str(llama), max_model_len=MAX_MODEL_LEN)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 16, **kw})


def sse_events(response: httpx.Response) -> list[str]:
    """The payloads of a complete SSE body, checking the framing: every event is exactly `data: <payload>\\n\\n`."""
    body = response.read().decode("utf-8")
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body[:500]
    return [e[len("data: "):] for e in events]


def post_stream(server: ServerProcess, path: str, body: dict) -> list[dict]:
    """JSON chunks of a streamed response (checks the status, content type, framing, and the final [DONE])."""
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


# ---- text equals the offline engine's ------------------------------------------------------------


def test_completions_greedy_equal_offline_engine(client, offline):
    expected = offline.generate(PARITY_PROMPTS, greedy(), use_tqdm=False)
    response = client.completions.create(model=MODEL, prompt=PARITY_PROMPTS, max_tokens=16, temperature=0)
    assert [c.index for c in response.choices] == list(range(len(PARITY_PROMPTS)))
    assert [c.text for c in response.choices] == [e.outputs[0].text for e in expected]
    assert [c.finish_reason for c in response.choices] == [e.outputs[0].finish_reason for e in expected]
    assert response.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert response.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_completion_equals_offline_engine(client, offline):
    for prompt in PARITY_PROMPTS[:4]:
        expected = offline.generate(prompt, greedy(max_tokens=24), use_tqdm=False)[0].outputs[0]
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert [c.choices[0].finish_reason for c in chunks][-1] == expected.finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_token_id_prompts_equal_string_prompts(client, offline):
    ids = offline.get_tokenizer().encode(PARITY_PROMPTS[1])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PARITY_PROMPTS[1], max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=[ids[:3], ids], max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == by_ids.choices[0].text


def test_chat_greedy_equals_offline_chat(client, offline):
    expected = offline.chat(CHAT, greedy(max_tokens=20), use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=20, temperature=0)
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == expected.outputs[0].finish_reason


def test_chat_content_parts_render_like_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}]
    joined = [{"role": "user", "content": "Name a\ncolour."}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=joined, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


# ---- sampling fields ----------------------------------------------------------------------------


def test_n_choices_are_distinct_and_seeded(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the seed fixes every sample
    assert len({c.text for c in first.choices}) > 1  # n samples, not one sample three times
    assert first.usage.completion_tokens == 3 * 12


def test_streamed_n_interleaves_choices_each_ending_once(server):
    chunks = post_stream(server, "/v1/chat/completions", {
        "model": MODEL, "messages": CHAT, "max_tokens": 10, "n": 3, "temperature": 1.0, "ignore_eos": True,
        "stream": True})
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert set(indexes) == {0, 1, 2}
    # Each choice opens with its role and ends with exactly one finish_reason, in its own last chunk.
    for j in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == j]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
    # Interleaved: the choices' chunks alternate instead of arriving one choice after another.
    assert indexes != sorted(indexes)


def test_stop_string_ends_text_and_never_reaches_a_delta(client, offline):
    full = offline.generate(PARITY_PROMPTS[0], greedy(max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), text
    before = text[: text.index(stop)]
    stream = client.completions.create(model=MODEL, prompt=PARITY_PROMPTS[0], max_tokens=40, temperature=0,
                                       stop=[stop], stream=True, extra_body={"ignore_eos": True})
    deltas = [c.choices[0].text for c in stream]
    assert "".join(deltas) == before
    assert all(stop not in d for d in deltas)
    response = client.completions.create(model=MODEL, prompt=PARITY_PROMPTS[0], max_tokens=40, temperature=0,
                                         stop=stop, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == before and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop


def test_completion_logprobs_match_offline_engine(client, offline):
    expected = offline.generate(PARITY_PROMPTS[2], greedy(max_tokens=8, logprobs=3), use_tqdm=False)[0].outputs[0]
    tok = offline.get_tokenizer()
    response = client.completions.create(model=MODEL, prompt=PARITY_PROMPTS[2], max_tokens=8, temperature=0,
                                         logprobs=3)
    lp = response.choices[0].logprobs
    assert lp.tokens == [tok.token_text(t) for t in expected.token_ids]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in expected.logprobs], abs=1e-5)
    for top, want in zip(lp.top_logprobs, expected.logprobs):
        assert 3 <= len(top) <= 4  # the top 3, plus the sampled token when it is not among them
        assert top[tok.token_text(want.top[0][0])] == pytest.approx(want.top[0][1], abs=1e-5)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_streamed_and_not(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(whole) == 6
    for entry in whole:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy takes the top one
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [e for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)


def test_include_usage_adds_a_final_usage_chunk(client):
    stream = client.completions.create(model=MODEL, prompt=["a b c", "d e"], max_tokens=5, n=2, temperature=0.8,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert all(c.usage is None for c in content)
    assert {c.choices[0].index for c in content} == {0, 1, 2, 3}
    no_usage = list(client.completions.create(model=MODEL, prompt="a b c", max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in no_usage)


def test_echo_prepends_the_prompt(client):
    response = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0,
                                         echo=True)
    plain = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0)
    assert response.choices[0].text == "The quick brown fox" + plain.choices[0].text


# ---- scoring: echo with logprobs, max_tokens 0, prompt_logprobs ----------------------------------------------------


def test_echo_logprobs_with_max_tokens_0_scores_the_prompt_as_the_engine_does(client, offline):
    prompt = PARITY_PROMPTS[4]
    expected = offline.generate(prompt, greedy(max_tokens=0, prompt_logprobs=5), use_tqdm=False)[0]
    tok = offline.get_tokenizer()
    response = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=5, max_tokens=0)
    choice = response.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(expected.prompt_token_ids)
    lp = choice.logprobs
    assert lp.tokens == [tok.token_text(t) for t in expected.prompt_token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in expected.prompt_logprobs[1:]], abs=1e-5)
    for top, want in zip(lp.top_logprobs[1:], expected.prompt_logprobs[1:]):
        assert {tok.token_text(t): v for t, v in want.top}.items() <= top.items()
        assert len(top) in (5, 6)  # the top 5, plus the prompt token when it is not among them
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_logprobs_report_the_prompt_then_the_completion_streamed_or_not(client, offline):
    prompt = PARITY_PROMPTS[0]
    expected = offline.generate(prompt, greedy(max_tokens=4, logprobs=2, prompt_logprobs=2), use_tqdm=False)[0]
    kw = dict(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=4, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    want = [x.logprob for x in expected.prompt_logprobs[1:] + expected.outputs[0].logprobs]
    assert whole.logprobs.token_logprobs[0] is None
    assert whole.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert whole.text == prompt + expected.outputs[0].text
    # Streamed: the prompt comes first, in a chunk of its own with its logprobs, then the completion's tokens.
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)]
    assert chunks[0].text == prompt and len(chunks[0].logprobs.tokens) == len(expected.prompt_token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, field)] == getattr(whole.logprobs, field)


def test_prompt_logprobs_in_vllm_shape_on_completions_and_chat(client, offline, server):
    expected = offline.generate([[5, 6, 7, 8, 9]], greedy(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    response = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8, 9], max_tokens=1, temperature=0, n=2,
                                         extra_body={"prompt_logprobs": 2, "return_tokens_as_token_ids": True})
    for choice in response.choices:
        got = choice.model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == 5
        for entry, want in zip(got[1:], expected.prompt_logprobs[1:]):
            first = next(iter(entry))  # the prompt token itself comes first, then its top 2
            assert int(first) == want.token_id and entry[first]["rank"] == want.rank
            assert entry[first]["decoded_token"] == f"token_id:{want.token_id}"
            assert entry[first]["logprob"] == pytest.approx(want.logprob, abs=1e-5)
            for rank, (token, value) in enumerate(want.top, start=1):
                assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-5)
                assert str(token) == first or entry[str(token)]["rank"] == rank
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                        "prompt_logprobs": 0}).json()
        ids = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()["tokens"]
    chat = offline.generate([ids], greedy(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0].prompt_logprobs
    assert len(body["prompt_logprobs"]) == len(ids) and body["prompt_logprobs"][0] is None
    for entry, want in zip(body["prompt_logprobs"][1:], chat[1:]):
        assert list(entry) == [str(want.token_id)]
        assert entry[str(want.token_id)]["logprob"] == pytest.approx(want.logprob, abs=1e-5)


def test_tokenizer_info_describes_the_served_tokenizer(server, offline):
    tok = offline.get_tokenizer()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.special_tokens["eos_token"]
    assert info["bos_token"] == tok.special_tokens.get("bos_token")
    assert info["chat_template"] == tok.chat_template and info["vocab_size"] == tok.vocab_size
    assert info["tokenizer_class"]


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_openai_errors_map_to_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=MAX_MODEL_LEN)
    assert e.value.status_code == 400
    assert f"maximum context length is {MAX_MODEL_LEN}" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)


# ---- raw SSE framing ------------------------------------------------------------------------------


def test_sse_framing_of_a_completion_stream(server):
    chunks = post_stream(server, "/v1/completions", {
        "model": MODEL, "prompt": "Hello there", "max_tokens": 8, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    *content, usage = chunks
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 8
    # Streamed token by token: several content events, the last one carrying the finish reason.
    assert len(content) > 1
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]


def test_sse_framing_of_a_chat_stream(server):
    chunks = post_stream(server, "/v1/chat/completions", {
        "model": MODEL, "messages": CHAT, "max_tokens": 6, "ignore_eos": True, "stream": True})
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_streamed_deltas_are_valid_utf8_json(server, offline):
    """A prompt full of multi-byte characters makes the model emit partial characters; every delta is still valid
    UTF-8 inside valid JSON, and the deltas join to exactly the offline engine's text for the same seed (bytes that
    can never form a character become U+FFFD there as here, as in transformers)."""
    body = {"prompt": PARITY_PROMPTS[5], "max_tokens": 40, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            "stream": True}
    chunks = post_stream(server, "/v1/completions", body)  # 200, event-stream, framing, [DONE] last
    assert 1 <= len(chunks) <= 40 and all("error" not in c for c in chunks), chunks[-3:]
    texts = [c["choices"][0]["text"] for c in chunks]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    expected = offline.generate(PARITY_PROMPTS[5], params, use_tqdm=False)[0].outputs[0]
    assert "".join(texts) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
