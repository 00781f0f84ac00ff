"""Structured outputs and tool calls over HTTP, driven by the official `openai` package and raw httpx.

The model has random weights, so a valid output can only come from the constraint; an auto tool call is made
deterministic by forcing the model's text with a regex (the hermes format), which the parser then reads back.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.cli import TOOL_CALL_PARSERS
from server.tool_parsers import TOOL_PARSERS
from server_process import InProcessServer, ServerProcess

MODEL = "test-model"
CHAT = [{"role": "user", "content": "Give me a record."}]
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "y": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "tag": {"enum": ["a", "b", "c"]},
                                          "name": {"type": "string", "maxLength": 6}},
         "required": ["x", "y", "tag", "name"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
# A template that writes tool calls with `| tojson`, as Qwen's and Llama's do: it needs arguments as objects.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    "{% if tools %}TOOLS: {% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def server(make_ckpt, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    with InProcessServer(make_ckpt("llama"), served_model_name=MODEL, server_kwargs={"tool_call_parser": "hermes"},
                         max_model_len=512, chat_template=str(template)) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def post(server, path: str, body: dict) -> httpx.Response:
    with server.client() as http:
        return http.post(path, json={"model": MODEL, **body})


def streamed(server, path: str, body: dict) -> list[dict]:
    with server.client() as http, http.stream("POST", path, json={"model": MODEL, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_response_format_json_schema_streamed_equals_whole(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=fmt, temperature=0,
                                           max_tokens=120, n=2, seed=1)
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), POINT)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, response_format=fmt, temperature=0,
                                                 max_tokens=120, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)
    tag: Literal["a", "b", "c"]


def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model=MODEL, messages=CHAT, response_format=Point,
                                                   temperature=1.0, seed=seed, max_tokens=100)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Point) and -9 <= parsed.x <= 9


def test_json_object_on_both_routes(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_object"},
                                          temperature=1.0, seed=2, max_tokens=300, n=3)
    for choice in chat.choices:  # any object: a random model may write keys until max_tokens cuts it
        text = choice.message.content
        assert isinstance(json.loads(text), dict) if choice.finish_reason == "stop" else text.startswith("{")
    completion = client.completions.create(model=MODEL, prompt="Hi", temperature=0, max_tokens=120,
                                           extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                               "name": "p", "schema": POINT}}})
    jsonschema.validate(json.loads(completion.choices[0].text), POINT)


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"guided_regex": r"(ab|cd){2}!"}, lambda t: re.fullmatch(r"(ab|cd){2}!", t)),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"guided_json": POINT}, lambda t: jsonschema.validate(json.loads(t), POINT) is None),
    ({"structured_outputs": {"json": json.dumps(POINT), "disable_any_whitespace": True}},
     lambda t: " " not in t.replace('"name":"', "").split('"name"')[0] and json.loads(t)),
    ({"structured_outputs": {"grammar": 'root ::= "<" [a-c]+ ">"'}}, lambda t: re.fullmatch(r"<[a-c]+>", t)),
])
def test_constraint_kinds_on_completions_streamed_and_not(client, server, body, check):
    params = {"prompt": "Say something", "max_tokens": 60, "temperature": 1.0, "seed": 5, "n": 2, **body}
    whole = post(server, "/v1/completions", params)
    assert whole.status_code == 200, whole.text
    texts = [c["text"] for c in whole.json()["choices"]]
    assert all(check(t) for t in texts), texts
    chunks = streamed(server, "/v1/completions", params)
    per_choice = ["", ""]
    for chunk in chunks:
        for c in chunk["choices"]:
            per_choice[c["index"]] += c["text"]
    assert per_choice == texts


def tool_call_fragments(chunks: list[dict]) -> list[dict]:
    return [tc for chunk in chunks for c in chunk["choices"] for tc in (c["delta"].get("tool_calls") or [])]


def test_named_tool_choice_gives_valid_arguments_streamed_as_deltas(client, server):
    body = {"messages": CHAT, "tools": [WEATHER, TIME], "temperature": 1.0, "seed": 3, "max_tokens": 80,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.chat.completions.create(model=MODEL, **body)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # as OpenAI, for a named function
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    fragments = tool_call_fragments(streamed(server, "/v1/chat/completions", body))
    assert fragments[0]["id"].startswith("call_") and fragments[0]["function"]["name"] == "get_weather"
    assert all("id" not in f and "name" not in f["function"] for f in fragments[1:]) and len(fragments) > 2
    assert "".join(f["function"]["arguments"] for f in fragments) == call.function.arguments
    # The openai package assembles the same call from the stream.
    pieces = [tc for chunk in client.chat.completions.create(model=MODEL, stream=True, **body)
              for c in chunk.choices for tc in (c.delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert {p.index for p in pieces} == {0}
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice(client, server, parallel):
    body = {"messages": CHAT, "tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": parallel,
            "temperature": 1.0, "seed": 4, "max_tokens": 200, "n": 3}
    whole = client.chat.completions.create(model=MODEL, **body)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    body["n"] = 1
    first = client.chat.completions.create(model=MODEL, **body).choices[0].message.tool_calls
    chunks = streamed(server, "/v1/chat/completions", body)
    by_index: dict[int, dict] = {}
    for f in tool_call_fragments(chunks):
        entry = by_index.setdefault(f["index"], {"name": f["function"].get("name"), "arguments": ""})
        entry["arguments"] += f["function"]["arguments"]
    assert [(e["name"], e["arguments"]) for _, e in sorted(by_index.items())] == \
        [(c.function.name, c.function.arguments) for c in first]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_tool_choice_reads_hermes_calls(client, server):
    """The model's text is forced into hermes' format; the server reads the call back, whole and streamed."""
    forced = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Oslo|Rome)", "unit": "celsius"\}\}</tool_call>'
    body = {"messages": CHAT, "tools": [WEATHER], "temperature": 1.0, "seed": 6, "max_tokens": 120,
            "structured_outputs": {"regex": forced}}
    whole = client.chat.completions.create(model=MODEL, extra_body={"structured_outputs": body["structured_outputs"]},
                                           **{k: v for k, v in body.items() if k != "structured_outputs"})
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    chunks = streamed(server, "/v1/chat/completions", body)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    fragments = tool_call_fragments(chunks)
    assert content == "Sure. " and fragments[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(f["function"]["arguments"] for f in fragments))["unit"] == "celsius"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # With tool_choice "none" the same text is content.
    plain = post(server, "/v1/chat/completions", {**body, "tool_choice": "none"}).json()["choices"][0]
    assert plain["finish_reason"] == "stop" and "<tool_call>" in plain["message"]["content"]


def test_tool_calls_and_tool_results_round_trip_through_the_template(server):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
    ]
    rendered = post(server, "/tokenize", {"messages": messages, "return_token_strs": False}).json()
    with server.client() as http:
        text = http.post("/detokenize", json={"model": MODEL, "tokens": rendered["tokens"]}).json()["prompt"]
    assert '<call>get_weather {"city": "Oslo", "unit": "celsius"}</call>' in text  # an object, not a quoted string
    assert "<|tool|>12 degrees (call_1)" in text
    reply = post(server, "/v1/chat/completions", {"messages": messages, "tools": [WEATHER], "tool_choice": "none",
                                                  "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    for arguments in ("{not json", "[" * 100000 + "]" * 100000):  # broken, and nested past the JSON parser's depth
        bad = [messages[0], {**messages[1], "tool_calls": [{**messages[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": arguments}}]}]
        refused = post(server, "/v1/chat/completions", {"messages": bad, "max_tokens": 4})
        assert refused.status_code == 400 and "arguments must be JSON text" in refused.json()["error"]["message"]


@pytest.mark.parametrize("body, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "invalid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"structured_outputs": {"json": {"type": "string", "if": {}}}}, "structured_outputs", "invalid"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "invalid"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
    ({"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                                       for i in range(10000)}}}, "guided_json", "characters"),
    ({"guided_json": '{"type": "array", "items": ' * 5000 + '{"type": "string"}' + "}" * 5000}, "guided_json",
     "nests too deeply"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools",
     "only one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "invalid"),
])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(server, body, param, says):
    response = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}).status_code == 200
    server.wait_idle()  # and no KV block is left behind


def test_auto_tool_choice_needs_the_flags(make_ckpt):
    with ServerProcess(make_ckpt("llama"), "--served-model-name", MODEL) as proc, proc.client() as http:
        body = {"model": MODEL, "messages": CHAT, "tools": [WEATHER], "max_tokens": 4}
        for choice in ({}, {"tool_choice": "auto"}):
            response = http.post("/v1/chat/completions", json={**body, **choice})
            assert response.status_code == 400
            assert "--enable-auto-tool-choice and --tool-call-parser" in response.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200


def test_cli_lists_the_parsers_the_server_has():
    assert set(TOOL_CALL_PARSERS) == set(TOOL_PARSERS)


def test_sdk_reads_tool_calls_typed(server):
    from clients import Client

    body = {"messages": CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0, "max_tokens": 80}
    with Client(server.url) as sdk:
        whole = sdk.chat.completions.create(**body)
        (call,) = whole.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        with sdk.chat.completions.create(**body, stream=True) as stream:
            pieces = [tc for chunk in stream for c in chunk.choices for tc in (c.delta.tool_calls or [])]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
