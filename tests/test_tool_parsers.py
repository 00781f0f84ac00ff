"""Tool-call parsers (server/tool_parsers.py): hand-computed expectations for each format, then the streaming contract
(any split of the output, fed in order, gives extract()'s content and calls) over every case and random texts."""

from __future__ import annotations

import ast
import random
import re
import sys
from pathlib import Path

import pytest

from server.tool_parsers import (
    REQUIRED_PARSER,
    TOOL_PARSERS,
    ToolCallDelta,
    get_tool_parser,
    make_tool_call_id,
)

ID = re.compile(r"call_[A-Za-z0-9]{24}")
NESTED_ARGS = (r'{"code": "if (x) { y(\"}\"); }", "tag": "</tool_call>", "q": "say \"hi\" [TOOL_CALLS] ;",'
               r' "nested": {"list": [1, {"k": [true, null]}], "e": "\u00e9 caf' "\u00e9 \U0001f680" r'"}}')
# NESTED_ARGS as json.dumps(ensure_ascii=False) writes it: the \u00e9 escape becomes the character itself.
NESTED_OUT = (r'{"code": "if (x) { y(\"}\"); }", "tag": "</tool_call>", "q": "say \"hi\" [TOOL_CALLS] ;",'
              ' "nested": {"list": [1, {"k": [true, null]}], "e": "\u00e9 caf\u00e9 \U0001f680"}}')

# (parser, output, expected content, expected [(name, arguments)])
CASES = [
    # hermes
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris"}')]),
    ("hermes", 'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\nand\n'
               '<tool_call>{"name":"b","parameters":{"x":1}}</tool_call>\nDone.',
     "Let me check.\n\nand\n\nDone.", [("a", "{}"), ("b", '{"x": 1}')]),
    ("hermes", "<tool_call>\n" + '{"name": "run", "arguments": ' + NESTED_ARGS + "}\n</tool_call>",
     None, [("run", NESTED_OUT)]),
    ("hermes", '<tool_call>{"name": "now"}</tool_call>', None, [("now", "{}")]),
    ("hermes", r'<tool_call>{"name": "f", "arguments": "{\"a\":1}"}</tool_call>', None, [("f", '{"a":1}')]),
    ("hermes", 'Hi <tool_call>{"name": "f", "arguments": {oops}}</tool_call> bye',
     'Hi <tool_call>{"name": "f", "arguments": {oops}}</tool_call> bye', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("hermes", '<tool_call>not json</tool_call>\n<tool_call>{"name": "g", "arguments": {"y": [1, 2]}}</tool_call>',
     "<tool_call>not json</tool_call>\n", [("g", '{"y": [1, 2]}')]),
    ("hermes", '<tool_call>{"name": "f"} extra</tool_call>after', '<tool_call>{"name": "f"} extra</tool_call>after', []),
    # An unterminated string swallows the first </tool_call>: the span ends at that tag; the next call still counts.
    ("hermes", '<tool_call>{"name": "f</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "f</tool_call>\n', [("g", "{}")]),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": "b"}}\n', "Sure.\n", [("f", '{"a": "b"}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": ', '<tool_call>{"name": "f", "arguments": {"a": ', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}} and then', '<tool_call>{"name": "f", "arguments": {}} and then',
     []),
    ("hermes", "<tool_call>\n", "<tool_call>\n", []),
    ("hermes", "a < b, <tool> and <tool_call", "a < b, <tool> and <tool_call", []),
    ("hermes", "Just an answer.", "Just an answer.", []),
    ("hermes", " \n ", None, []),
    ("hermes", "", None, []),
    # llama3_json
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": "z;{}"}}',
     None, [("a", '{"x": 1}'), ("b", '{"y": "z;{}"}')]),
    ("llama3_json", '\n  {"name": "f", "parameters": {}}\n', None, [("f", "{}")]),
    ("llama3_json", '{"name":"a"};{"name":"b","parameters":{"n":[1,2]}} ;\n{"name":"c","parameters":' + NESTED_ARGS + "}",
     None, [("a", "{}"), ("b", '{"n": [1, 2]}'), ("c", NESTED_OUT)]),
    ("llama3_json", "The weather is nice.", "The weather is nice.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '{"name": "f", "parameters": {}} Hope that helps', '{"name": "f", "parameters": {}} Hope that helps',
     []),
    ("llama3_json", '{"name": "f", "parameters": {}};', '{"name": "f", "parameters": {}};', []),
    ("llama3_json", '{"name": "a", "parameters": {}}; {"nome": "b"}', '{"name": "a", "parameters": {}}; {"nome": "b"}',
     []),
    ("llama3_json", '{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
    ("llama3_json", 'Here: {"name": "f", "parameters": {}}', 'Here: {"name": "f", "parameters": {}}', []),
    ("llama3_json", '<|python_tag|>print("hi")', '<|python_tag|>print("hi")', []),
    ("llama3_json", "<|python_tag|>", "<|python_tag|>", []),
    # mistral
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("mistral", 'Checking.[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}},\n {"name": "b", "parameters": '
                '{"s": "[TOOL_CALLS] ]"}}] ok',
     "Checking. ok", [("a", '{"x": 1}'), ("b", '{"s": "[TOOL_CALLS] ]"}')]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz":"Europe/Paris"}', None,
     [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')]),
    ("mistral", "Sure. [TOOL_CALLS]run[ARGS] " + NESTED_ARGS + "\nThat's all.", "Sure. \nThat's all.",
     [("run", NESTED_OUT)]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {]', '[TOOL_CALLS][{"name": "f", "arguments": {]', []),
    ("mistral", '[TOOL_CALLS][{"name": "f"}, {"arguments": {}}] tail', '[TOOL_CALLS][{"name": "f"}, {"arguments": {}}] tail',
     []),
    ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("mistral", "[TOOL_CALLS] sorry, no.", "[TOOL_CALLS] sorry, no.", []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": }', '[TOOL_CALLS]f[ARGS]{"a": }', []),
    ("mistral", '[TOOL_CALLS]f[ARGS]"x" [TOOL_CALLS]g[ARGS]{}', '[TOOL_CALLS]f[ARGS]"x" ', [("g", "{}")]),
    ("mistral", "see [TOOL] and [TOOL_CALLS", "see [TOOL] and [TOOL_CALLS", []),
    ("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", []),
    # required
    ("required", '[{"name": "f", "parameters": {"a": 1}}]', None, [("f", '{"a": 1}')]),
    ("required", '\n[ {"name": "a", "parameters": {}},\n  {"name": "b", "arguments": ' + NESTED_ARGS + "} ]\n", None,
     [("a", "{}"), ("b", NESTED_OUT)]),
    ("required", "[]", "[]", []),
    ("required", '[{"name": "f", "parameters": {"a": ', '[{"name": "f", "parameters": {"a": ', []),
    ("required", '[{"name": "f", "parameters": {}}] and more', '[{"name": "f", "parameters": {}}] and more', []),
    ("required", '{"name": "f", "parameters": {}}', '{"name": "f", "parameters": {}}', []),
    ("required", '[{"name": "f", "parameters": {}}, {"name": 3}]', '[{"name": "f", "parameters": {}}, {"name": 3}]', []),
]


def parser_for(name):
    return REQUIRED_PARSER if name == "required" else get_tool_parser(name)


def run_stream(parser, pieces):
    """Feed the pieces, then finish: (concatenated content, all deltas)."""
    streamer = parser.streamer()
    content, deltas = "", []
    for piece in pieces:
        text, new = streamer.feed(piece)
        content += text
        deltas += new
    text, new = streamer.finish()
    return content + text, deltas + new


def calls_from_deltas(deltas):
    """[(name, arguments)] from OpenAI-shaped deltas, checking the shape: a call's first delta alone has its id and name
    (and empty arguments), and indices count up from 0."""
    calls = []
    for delta in deltas:
        if delta.id is not None:
            assert ID.fullmatch(delta.id) and delta.name is not None and delta.arguments == ""
            assert delta.index == len(calls)
            calls.append((delta.name, ""))
        else:
            assert delta.name is None and delta.index == len(calls) - 1
            calls[-1] = (calls[-1][0], calls[-1][1] + delta.arguments)
    return calls


def check_stream(parser, text, pieces):
    expected = parser.extract(text)
    content, deltas = run_stream(parser, pieces)
    assert (content if content.strip() else None) == expected.content, pieces
    assert calls_from_deltas(deltas) == [(call.name, call.arguments) for call in expected.calls], pieces


def random_pieces(text, rng, longest=8):
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, longest)
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


CASE_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=CASE_IDS)
def test_extract(name, text, content, calls):
    result = parser_for(name).extract(text)
    assert result.content == content
    assert [(call.name, call.arguments) for call in result.calls] == calls
    assert all(ID.fullmatch(call.id) for call in result.calls)
    assert len({call.id for call in result.calls}) == len(calls)


@pytest.mark.parametrize(("name", "text"), [case[:2] for case in CASES], ids=CASE_IDS)
def test_stream_any_split(name, text):
    parser = parser_for(name)
    check_stream(parser, text, [text])
    check_stream(parser, text, list(text))
    for cut in range(len(text) + 1):
        check_stream(parser, text, [text[:cut], text[cut:]])
    for seed in range(5):
        check_stream(parser, text, random_pieces(text, random.Random(seed)))


FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool", "<", "\n", " ", "text", '{"name": "f", "arguments": {"a": 1}}',
               "{", "}", '"', "\\", '{"name": "g"}', '"x}"', "</tool_call>x"],
    "llama3_json": ["<|python_tag|>", "<|py", " ", "\n", ";", '{"name": "f", "parameters": {"a": 1}}', "{", "}", '"',
                    "\\", '{"name": "g"}', "word", '"a;b"'],
    "mistral": ["[TOOL_CALLS]", "[TOOL", "[ARGS]", "[AR", "f", "get_x", " ", "[", "]", ",", "{", "}", '"', "\\",
                '{"name": "f", "arguments": {"a": 1}}', '{"a": "]"}', "text"],
    "required": ["[", "]", ",", " ", '{"name": "f", "parameters": {"a": 1}}', "{", "}", '"', "\\", "x"],
}


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_stream_random_texts(name):
    """Texts glued from markers, JSON and broken JSON: extract never raises, streaming agrees with it for random
    splits, and a text with no call is all content."""
    parser = parser_for(name)
    rng = random.Random(1234)
    fragments = FRAGMENTS[name]
    valid = [text for parser_name, text, _, calls in CASES if parser_name == name and calls]
    found_calls = 0
    for _ in range(300):
        if rng.random() < 0.5:
            text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 12)))
        else:  # a case with calls, maybe cut short or with a fragment put in somewhere
            text, cut = rng.choice(valid), rng.randint(0, 100)
            if rng.random() < 0.5:
                text = text[:cut] + rng.choice(fragments) + text[cut:]
            elif rng.random() < 0.5:
                text = text[:cut]
        result = parser.extract(text)
        found_calls += len(result.calls)
        if not result.calls:
            assert result.content == (text if text.strip() else None)
        check_stream(parser, text, random_pieces(text, rng, longest=5))
        check_stream(parser, text, list(text))
    assert found_calls > 50  # the texts do reach valid calls


def test_hermes_streams_content_and_calls_early():
    streamer = get_tool_parser("hermes").streamer()
    assert streamer.feed("") == ("", [])
    assert streamer.feed("Hello, a < b ") == ("Hello, a < b ", [])
    assert streamer.feed("and <to") == ("and ", [])  # "<to" may begin <tool_call>
    assert streamer.feed("ol_call>\n") == ("", [])
    assert streamer.feed('{"name": "f", "arguments": {"a": "</tool_call>"}}\n</tool_call') == ("", [])
    content, deltas = streamer.feed(">\n")
    assert content == "\n" and [d.to_json() for d in deltas] == [
        {"index": 0, "id": deltas[0].id, "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a": "</tool_call>"}'}},
    ]
    assert streamer.feed("Bye") == ("Bye", [])
    assert streamer.feed("") == ("", [])
    content, deltas = streamer.feed('<tool_call>{"name": "g"}')
    assert (content, deltas) == ("", [])
    content, deltas = streamer.finish()  # closed by the end of the output
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(1, "g", ""), (1, None, "{}")]


def test_hermes_malformed_call_streams_as_content_before_its_close_tag():
    streamer = get_tool_parser("hermes").streamer()
    assert streamer.feed("<tool_call> I ") == ("<tool_call> I ", [])
    assert streamer.feed("changed my mind </tool") == ("changed my mind ", [])
    assert streamer.feed("_call> <tool_call>") == ("</tool_call> ", [])
    assert streamer.finish() == ("<tool_call>", [])


def test_mistral_streams_each_call_when_its_json_ends():
    streamer = get_tool_parser("mistral").streamer()
    assert streamer.feed("Ok [TOOL") == ("Ok ", [])
    assert streamer.feed('_CALLS]f[ARGS]{"a": "}"') == ("", [])
    content, deltas = streamer.feed("}[TOOL_CALLS][")
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", ""), (0, None, '{"a": "}"}')]
    content, deltas = streamer.feed('{"name": "g", "arguments": {}}] done')
    assert content == " done" and [(d.index, d.name, d.arguments) for d in deltas] == [(1, "g", ""), (1, None, "{}")]
    assert streamer.finish() == ("", [])


def test_llama3_json_holds_calls_to_the_end_and_content_only_while_it_may_be_calls():
    parser = get_tool_parser("llama3_json")
    streamer = parser.streamer()
    assert streamer.feed(" <|python_tag|>") == ("", [])
    assert streamer.feed('{"name": "f", "parameters": {}}') == ("", [])  # a `; text` could still follow
    content, deltas = streamer.finish()
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", ""), (0, None, "{}")]

    streamer = parser.streamer()
    assert streamer.feed(" The") == (" The", [])  # cannot be calls: content at once
    assert streamer.feed(" answer {") == (" answer {", [])
    streamer = parser.streamer()
    assert streamer.feed('{"name": "f"} ') == ("", [])
    assert streamer.feed("is it") == ('{"name": "f"} is it', [])


def test_required_holds_calls_to_the_end():
    streamer = REQUIRED_PARSER.streamer()
    assert streamer.feed('[{"name": "f", "parameters": {"a": 1}}]') == ("", [])
    content, deltas = streamer.finish()
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", ""), (0, None, '{"a": 1}')]
    streamer = REQUIRED_PARSER.streamer()
    assert streamer.feed("no") == ("no", [])


def test_streamers_are_independent():
    parser = get_tool_parser("hermes")
    first, second = parser.streamer(), parser.streamer()
    assert first.feed("<tool_call>") == ("", [])
    assert second.feed("plain") == ("plain", [])
    assert first.feed('{"name": "f"}</tool_call>')[1][0].index == 0


def test_delta_to_json():
    assert ToolCallDelta(2, "call_x", "f").to_json() == {
        "index": 2, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCallDelta(2, arguments='{"a": 1}').to_json() == {"index": 2, "function": {"arguments": '{"a": 1}'}}


def test_tool_call_ids():
    ids = {make_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(ID.fullmatch(i) for i in ids)


def test_registry_and_unknown_parser():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral"}
    for name, cls in TOOL_PARSERS.items():
        assert isinstance(get_tool_parser(name), cls) and cls.name == name
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'.*hermes, llama3_json, mistral"):
        get_tool_parser("nope")


def test_module_uses_the_standard_library_only():
    source = Path(__file__).resolve().parents[1] / "server" / "tool_parsers.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
