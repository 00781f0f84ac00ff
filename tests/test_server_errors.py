"""Every error the HTTP server promises, with its exact status code and OpenAI-shaped body.

Each error response must be `{"error": {"message", "type", "param", "code"}}` with `code` equal to the HTTP status;
a 400 about a request field names that field in `param` and in the message (with the allowed range where there is
one). FastAPI's 422 is never used: validation errors come back as 400 in the same shape.

One in-process server (no API key, default body limit) serves most of the module; a second one has an API key and a
small body limit; a third serves a copy of the checkpoint without a chat template. The command-line cases run
`python -m server` / `attnserve` in subprocesses. The last in-process test checks that after all the bad requests the
server still answers and the engine is idle with every KV block free.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema_rs  # schemathesis validates with it; here it checks answers against /openapi.json
import pytest
from tokenizers import Tokenizer

from checkpoints import copy_with_chat_template
from server_process import REPO, InProcessServer, ServerProcess

MODEL = "test-model"
MAX_MODEL_LEN = 128
API_KEY = "sk-test-key"
BODY_LIMIT = 4096  # bytes, on the server with the API key

# error `type` per status, as server/errors.py documents (vLLM's names)
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    431: "RequestHeaderFieldsTooLargeError",
    503: "ServiceUnavailableError",
}

OPENAPI_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")  # a Path Item's operations
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
# Valid bodies that generate very little; the cases below add or replace one field.
BASE = {
    COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 2},
    CHAT: {"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(make_ckpt) -> Path:
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def server(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def last_token_id(server) -> int:
    return server.engine.engine.info.vocab_size - 1


@pytest.fixture(scope="module")
def auth_server(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32,
                         server_kwargs={"api_key": API_KEY, "max_body_bytes": BODY_LIMIT}) as srv:
        yield srv


@pytest.fixture(scope="module")
def auth_http(auth_server):
    with auth_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def no_template_server(llama, tmp_path_factory):
    model = copy_with_chat_template(llama, tmp_path_factory.mktemp("no-chat-template") / "model", None)
    with InProcessServer(model, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32) as srv:
        yield srv


# ---- helpers -------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None, *, contains=(),
                 check_param: bool = True) -> str:
    """Check the status and the exact error shape; return the message. `contains`: substrings of the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status, error
    assert error["type"] == ERROR_TYPES[status], error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    if check_param:
        assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], f"{text!r} not in {error['message']!r}"
    return error["message"]


def resolve(doc: dict, schema: dict) -> dict:
    """The schema a `{"$ref": "#/components/..."}` of the served document points at."""
    node = doc
    for part in schema["$ref"].removeprefix("#/").split("/"):
        node = node[part]
    return node


def schema_validator(doc: dict, schema: dict) -> jsonschema_rs.Draft202012Validator:
    """A validator for a schema taken from the served document, its $refs resolved within that document (OpenAPI
    3.1 schemas are JSON Schema 2020-12)."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})


def documented_200(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]


def assert_documented_shape(doc: dict, path: str, answer: dict) -> None:
    """`answer` is valid against the documented 200 schema of POST `path`, and has exactly its keys, all required."""
    documented = documented_200(doc, path)
    schema_validator(doc, documented).validate(answer)
    schema = resolve(doc, documented)
    assert set(answer) == set(schema["properties"]) == set(schema["required"]), (answer, schema)


def names_number(message: str, number: str) -> bool:
    """`number` appears in `message` as a whole number (so "2" does not match inside "256" or "-0.2")."""
    return re.search(rf"(?<![\d.\-]){re.escape(number)}(?![\d.])", message) is not None


def route_id(route: str) -> str:
    return {COMPLETIONS: "completions", CHAT: "chat"}[route]


def post_raw(client: httpx.Client, path: str, content: bytes, content_type: str | None = "application/json"):
    headers = {} if content_type is None else {"content-type": content_type}
    return client.post(path, content=content, headers=headers)


# ---- 400: out-of-range sampling parameters -------------------------------------------------------

# (route, field, bad value, the violated bound the message must give)
RANGE_CASES = [
    *[(route, field, value, bound) for route in (COMPLETIONS, CHAT) for field, value, bound in [
        ("temperature", -0.1, "0"),
        ("temperature", 2.5, "2"),
        ("top_p", 0, "0"),
        ("top_p", 1.5, "1"),
        ("top_k", -2, "-1"),
        ("n", 0, "1"),
        ("n", 17, "16"),
        ("presence_penalty", -2.5, "-2"),
        ("presence_penalty", 2.5, "2"),
        ("frequency_penalty", -3, "-2"),
        ("frequency_penalty", 3, "2"),
        ("min_p", 1.5, "1"),
        ("repetition_penalty", 0, "0"),
        ("logit_bias", {"5": 101}, "100"),
        ("logit_bias", {"5": -101}, "-100"),
    ]],
    (COMPLETIONS, "logprobs", 21, "20"),
    (COMPLETIONS, "max_tokens", -5, "0"),  # 0 scores the prompt without generating (test_prompt_logprobs.py)
    (CHAT, "max_tokens", 0, "1"),
    (CHAT, "max_tokens", -5, "1"),
    (CHAT, "max_completion_tokens", 0, "1"),
]


@pytest.mark.parametrize(("route", "field", "value", "bound"), RANGE_CASES,
                         ids=[f"{route_id(r)}-{f}={json.dumps(v)}" for r, f, v, _ in RANGE_CASES])
def test_out_of_range_parameter_is_400_naming_field_and_bound(http, route, field, value, bound):
    message = assert_error(http.post(route, json={**BASE[route], field: value}), 400, field, contains=[field])
    assert names_number(message, bound), f"bound {bound} not in {message!r}"


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("temperature", 2.5, "in [0, 2]"), ("top_p", 0, "in (0, 1]"), ("n", 17, "in [1, 16]"),
    ("presence_penalty", -3, "in [-2, 2]"), ("max_tokens", -1, ">= 0"), ("top_k", -2, ">= -1"),
])
def test_range_error_states_the_whole_allowed_range(http, field, value, allowed):
    message = assert_error(http.post(COMPLETIONS, json={**BASE[COMPLETIONS], field: value}), 400, field)
    assert message == f"'{field}' must be {allowed}, got {value}"


def test_chat_top_logprobs_over_20_is_400(http):
    body = {**BASE[CHAT], "logprobs": True, "top_logprobs": 21}
    message = assert_error(http.post(CHAT, json=body), 400, "top_logprobs", contains=["top_logprobs"])
    assert names_number(message, "20"), message


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_min_tokens_over_max_tokens_is_400(http, route):
    body = {**BASE[route], "max_tokens": 3, "min_tokens": 5}
    message = assert_error(http.post(route, json=body), 400, "min_tokens", contains=["min_tokens", "max_tokens"])
    assert names_number(message, "5") and names_number(message, "3"), message


# ---- 400: other invalid requests -----------------------------------------------------------------

# (id, route, fields replacing BASE's, param, substrings of the message)
INVALID_CASES = [
    ("prompt-empty-string", COMPLETIONS, {"prompt": ""}, "prompt", ["prompt", "empty"]),
    ("prompt-empty-list", COMPLETIONS, {"prompt": []}, "prompt", ["prompt", "empty"]),
    ("prompt-list-with-empty-string", COMPLETIONS, {"prompt": ["Hello", ""]}, "prompt", ["prompt", "empty"]),
    ("prompt-only-empty-string", COMPLETIONS, {"prompt": [""]}, "prompt", ["prompt", "empty"]),
    ("prompt-empty-token-list", COMPLETIONS, {"prompt": [[1, 2], []]}, "prompt", ["prompt", "empty"]),
    ("prompt-mixed-strings-and-ids", COMPLETIONS, {"prompt": ["Hello", [1, 2]]}, "prompt", ["prompt"]),
    ("messages-empty", CHAT, {"messages": []}, "messages", ["messages", "non-empty"]),
    ("stop-17-strings", COMPLETIONS, {"stop": [f"s{i}" for i in range(17)]}, "stop", ["stop", "16"]),
    ("stop-string-257-chars", COMPLETIONS, {"stop": "x" * 257}, "stop", ["stop", "256"]),
    ("stop-list-string-257-chars", CHAT, {"stop": ["ok", "x" * 257]}, "stop", ["stop", "256"]),
    ("stop-empty-string", COMPLETIONS, {"stop": ""}, "stop", ["stop"]),
    ("stop-list-with-empty-string", CHAT, {"stop": ["ok", ""]}, "stop", ["stop"]),
    ("logit-bias-1025-entries", COMPLETIONS, {"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias",
     ["logit_bias", "1024"]),
    ("logit-bias-non-integer-key", COMPLETIONS, {"logit_bias": {"hello": 1.0}}, "logit_bias",
     ["logit_bias", "hello"]),
    ("logit-bias-non-integer-key-chat", CHAT, {"logit_bias": {"1.5": 1.0}}, "logit_bias", ["logit_bias", "1.5"]),
    ("stream-options-without-stream", COMPLETIONS, {"stream_options": {"include_usage": True}}, "stream_options",
     ["stream_options", "stream"]),
    ("stream-options-stream-false-chat", CHAT, {"stream": False, "stream_options": {"include_usage": True}},
     "stream_options", ["stream_options", "stream"]),
    ("top-logprobs-without-logprobs", CHAT, {"top_logprobs": 3}, "top_logprobs", ["top_logprobs", "logprobs"]),
    ("top-logprobs-with-logprobs-false", CHAT, {"logprobs": False, "top_logprobs": 3}, "top_logprobs",
     ["top_logprobs", "logprobs"]),
    ("suffix", COMPLETIONS, {"suffix": " the end"}, "suffix", ["suffix"]),
    ("response-format-json-schema-without-schema", CHAT,
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     ["response_format", "json_schema.schema"]),
    ("message-role-not-allowed", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages",
     ["messages", "role", "system", "developer", "user", "assistant", "tool"]),
    ("user-message-without-content", CHAT, {"messages": [{"role": "user"}]}, "messages",
     ["messages", "content"]),
    ("user-message-null-content", CHAT, {"messages": [{"role": "system", "content": "s"},
                                                      {"role": "user", "content": None}]}, "messages",
     ["messages[1]", "content"]),
    ("content-part-image-url", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages",
     ["messages", "content", "text"]),
    # more refusals server/completions.py and server/chat.py promise
    ("best-of-not-n", COMPLETIONS, {"best_of": 3}, "best_of", ["best_of"]),
    ("prompt-logprobs-streamed", COMPLETIONS, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs",
     ["prompt_logprobs", "stream"]),
    ("chat-prompt-logprobs-streamed", CHAT, {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs",
     ["prompt_logprobs", "stream"]),
    ("prompt-logprobs-over-21", COMPLETIONS, {"prompt_logprobs": 21}, "prompt_logprobs", ["prompt_logprobs", "20"]),
    # 128 prompts x 100 tokens x (20 + 1) entries x 16 choices = 4,300,800 > 2**21
    ("prompt-logprobs-response-too-large", COMPLETIONS, {"prompt": [[5] * 100] * 128, "n": 16, "prompt_logprobs": 20},
     "prompt_logprobs", ["prompt_logprobs", "4300800", str(2**21)]),
    ("continue-final-message-with-generation-prompt", CHAT, {"continue_final_message": True}, "continue_final_message",
     ["continue_final_message", "add_generation_prompt"]),
    ("chat-template-kwargs-reserved", CHAT, {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs",
     ["chat_template_kwargs", "messages"]),
]


@pytest.mark.parametrize(("route", "fields", "param", "contains"), [c[1:] for c in INVALID_CASES],
                         ids=[c[0] for c in INVALID_CASES])
def test_invalid_request_is_400_naming_field(http, route, fields, param, contains):
    assert_error(http.post(route, json={**BASE[route], **fields}), 400, param, contains=contains)


@pytest.mark.parametrize("prompt", [[[999999]], [-1], [1, 2, 4096], [[1, 2], [3, 2**40]]],
                         ids=["ids-999999", "ids-minus-1", "ids-vocab-size", "second-prompt-2**40"])
def test_token_id_outside_vocabulary_is_400_with_vocab_range(http, last_token_id, prompt):
    body = {**BASE[COMPLETIONS], "prompt": prompt}
    bad = next(t for ids in (prompt if isinstance(prompt[0], list) else [prompt]) for t in ids
               if not 0 <= t <= last_token_id)
    message = assert_error(http.post(COMPLETIONS, json=body), 400, "prompt", contains=["prompt"])
    assert names_number(message, str(bad)), message
    assert f"0..{last_token_id}" in message, message  # the vocabulary range


def test_prompt_plus_max_tokens_over_max_model_len_is_400(http):
    body = {**BASE[COMPLETIONS], "prompt": [5] * 100, "max_tokens": 50}
    message = assert_error(http.post(COMPLETIONS, json=body), 400, "max_tokens", contains=["max_tokens"])
    for number in (str(MAX_MODEL_LEN), "150", "100", "50"):  # the limit, the requested total and its two parts
        assert names_number(message, number), f"{number} not in {message!r}"


def test_prompt_over_max_model_len_is_400(http):
    body = {**BASE[COMPLETIONS], "prompt": [5] * 200}
    message = assert_error(http.post(COMPLETIONS, json=body), 400, "prompt", contains=["prompt"])
    assert names_number(message, str(MAX_MODEL_LEN)) and names_number(message, "200"), message


def test_chat_max_tokens_over_max_model_len_is_400(http):
    body = {**BASE[CHAT], "max_tokens": 1000}
    message = assert_error(http.post(CHAT, json=body), 400, "max_tokens", contains=["max_tokens"])
    assert names_number(message, str(MAX_MODEL_LEN)) and names_number(message, "1000"), message


# ---- 400, never 422: mistyped fields and bad bodies ----------------------------------------------

# (route, field, value of the wrong JSON type)
MISTYPED_CASES = [
    (COMPLETIONS, "max_tokens", "5"),
    (COMPLETIONS, "temperature", "hot"),
    (COMPLETIONS, "stream", "yes"),
    (COMPLETIONS, "n", 1.5),
    (COMPLETIONS, "prompt", 5),
    (COMPLETIONS, "prompt", {"text": "hi"}),
    (COMPLETIONS, "top_k", True),
    (COMPLETIONS, "echo", 1),
    (COMPLETIONS, "stop", 7),
    (COMPLETIONS, "logit_bias", ["5", 1]),
    (CHAT, "messages", "hi"),
    (CHAT, "messages", [{"role": "user", "content": 5}]),
    (CHAT, "temperature", "hot"),
    (CHAT, "logprobs", "true"),
    (CHAT, "max_completion_tokens", "5"),
    (CHAT, "stream_options", True),
]


@pytest.mark.parametrize(("route", "field", "value"), MISTYPED_CASES,
                         ids=[f"{route_id(r)}-{f}={json.dumps(v)}" for r, f, v in MISTYPED_CASES])
def test_mistyped_field_is_400_not_422(http, route, field, value):
    assert_error(http.post(route, json={**BASE[route], field: value}), 400, field, contains=[field])


@pytest.mark.parametrize(("route", "raw", "field"), [
    (COMPLETIONS, b'{"prompt":"x","temperature":NaN}', "temperature"),
    (COMPLETIONS, b'{"prompt":"x","top_p":Infinity}', "top_p"),
    (CHAT, b'{"messages":[{"role":"user","content":"x"}],"presence_penalty":-Infinity}', "presence_penalty"),
    (CHAT, b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}', "temperature"),
], ids=["completions-temperature-NaN", "completions-top_p-Infinity", "chat-presence_penalty--Infinity",
        "chat-temperature-NaN"])
def test_non_finite_number_is_400(http, route, raw, field):
    assert_error(post_raw(http, route, raw), 400, field, contains=[field])


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT, "/tokenize", "/detokenize"])
@pytest.mark.parametrize(("raw", "content_type"), [
    (b'{"prompt": "x",', "application/json"),
    (b"not json at all", "application/json"),
    (b"", "application/json"),
    (b"", None),
    (b'[{"prompt": "x"}]', "application/json"),
    (b'"a string"', "application/json"),
    (b"null", "application/json"),
], ids=["truncated-json", "not-json", "empty", "empty-no-content-type", "json-array", "json-string", "json-null"])
def test_bad_body_is_400(http, route, raw, content_type):
    message = assert_error(post_raw(http, route, raw, content_type), 400, None)
    assert "JSON" in message, message


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_unknown_fields_are_ignored(http, route):
    response = http.post(route, json={**BASE[route], "foo": 1, "bar": {"nested": [1, 2]}})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


# ---- 404, 405, 415, 413 --------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    (COMPLETIONS, {**BASE[COMPLETIONS], "model": "gpt-4"}),
    (CHAT, {**BASE[CHAT], "model": "gpt-4"}),
    ("/tokenize", {"model": "gpt-4", "prompt": "Hello"}),
    ("/detokenize", {"model": "gpt-4", "tokens": [1, 2]}),
], ids=["completions", "chat", "tokenize", "detokenize"])
def test_unknown_model_is_404(http, path, body):
    assert_error(http.post(path, json=body), 404, "model", contains=["gpt-4", MODEL])


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/v1/nope"), ("GET", "/v2/models"),
                                              ("POST", "/v1/completions/extra")])
def test_unknown_route_is_404(http, method, path):
    kwargs = {"json": {"prompt": "x"}} if method == "POST" else {}
    assert_error(http.request(method, path, **kwargs), 404, None, contains=[path])


@pytest.mark.parametrize("client", ["http", "auth_http"])
def test_every_method_a_path_lacks_is_a_documented_405(request, client):
    """For every path in /openapi.json and every OpenAPI method it does not take: the answer is a 405 in the OpenAI
    shape with an Allow header naming the methods the path does take, and the document lists that 405, with the
    Allow header and the error schema, under each operation of the path (OpenAPI has no place for a missing one)."""
    http = request.getfixturevalue(client)
    headers = {"Authorization": f"Bearer {API_KEY}"} if client == "auth_http" else {}
    doc = http.get("/openapi.json", headers=headers).json()
    error_schema = schema_validator(doc, ERROR_REF)
    assert set(doc["paths"]) >= {COMPLETIONS, CHAT, "/v1/models", "/tokenize", "/detokenize", "/health"}
    for path, item in doc["paths"].items():
        taken = [method for method in OPENAPI_METHODS if method in item]
        for method in taken:
            documented = item[method]["responses"].get("405")
            assert documented is not None, f"{method.upper()} {path} does not document 405"
            assert documented["content"] == {"application/json": {"schema": ERROR_REF}}, documented
            assert "Allow" in documented["headers"], documented
        for method in sorted(set(OPENAPI_METHODS) - set(taken)):
            response = http.request(method.upper(), path, headers=headers)
            assert response.status_code == 405, (method, path, response.text)
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            assert allowed == {m.upper() for m in taken}, (method, path, allowed)
            if method != "head":  # an answer to HEAD has no body
                assert_error(response, 405, None, contains=[method.upper(), path])
                error_schema.validate(response.json())


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "text/plain; charset=utf-8"])
@pytest.mark.parametrize("route", [COMPLETIONS, CHAT, "/tokenize"])
def test_non_json_content_type_is_415(http, route, content_type):
    body = {"prompt": "Hello"} if route == "/tokenize" else BASE[route]
    assert_error(post_raw(http, route, json.dumps(body).encode(), content_type), 415, None)


def test_json_content_type_with_charset_is_accepted(http):
    response = post_raw(http, COMPLETIONS, json.dumps(BASE[COMPLETIONS]).encode(), "application/json; charset=utf-8")
    assert response.status_code == 200, response.text


def _padded_body(size: int) -> bytes:
    """A valid completions request of exactly `size` bytes (JSON whitespace as padding)."""
    body = json.dumps(BASE[COMPLETIONS]).encode()
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_default_body_limit_is_4_mib(http):
    response = post_raw(http, COMPLETIONS, _padded_body(5 * 1024 * 1024))
    assert_error(response, 413, None)


def test_body_over_limit_with_content_length_is_413(auth_http):
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = auth_http.post(COMPLETIONS, content=_padded_body(BODY_LIMIT + 1), headers=headers)
    assert "content-length" in {k.lower() for k in response.request.headers}
    assert_error(response, 413, None)


def test_chunked_body_over_limit_is_413(auth_http):
    body = _padded_body(BODY_LIMIT * 3)

    def chunks():
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = auth_http.post(COMPLETIONS, content=chunks(), headers=headers)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, None)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_at_limit_is_accepted(auth_http, chunked):
    body = _padded_body(BODY_LIMIT)
    content = iter([body[:1000], body[1000:]]) if chunked else body
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = auth_http.post(COMPLETIONS, content=content, headers=headers)
    assert response.status_code == 200, response.text


# ---- 401 -----------------------------------------------------------------------------------------

# (method, path, JSON body) of every authenticated route
PROTECTED = [
    ("POST", COMPLETIONS, BASE[COMPLETIONS]),
    ("POST", CHAT, BASE[CHAT]),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "Hello"}),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("GET", "/openapi.json", None),
    ("GET", "/metrics", None),
]
BAD_AUTH = {
    "missing": {},
    "wrong-key": {"authorization": "Bearer not-the-key"},
    "no-bearer-prefix": {"authorization": API_KEY},
    "basic-scheme": {"authorization": f"Basic {API_KEY}"},
    "bearer-without-key": {"authorization": "Bearer"},
    "key-prefix-only": {"authorization": f"Bearer {API_KEY[:-1]}"},
}


@pytest.mark.parametrize("headers", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_missing_or_wrong_api_key_is_401(auth_http, method, path, body, headers):
    assert_error(auth_http.request(method, path, json=body, headers=headers), 401, None)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_correct_api_key_is_200(auth_http, method, path, body):
    response = auth_http.request(method, path, json=body, headers={"authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text


def test_api_key_is_compared_in_constant_time_on_fixed_length_digests(auth_http, monkeypatch):
    """The key check goes through hmac.compare_digest on two SHA-256 digests, whatever the length of the key sent:
    neither the time taken nor an early exit on a length mismatch tells a client how close its guess was."""
    import hmac

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    for key in ("x", API_KEY[:-1], API_KEY + "0" * 100, API_KEY):
        auth_http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert compared == [(32, 32)] * 4, compared


@pytest.mark.parametrize("path", ["/health", "/version"])
def test_probes_need_no_api_key(auth_http, path):
    assert auth_http.get(path).status_code == 200
    assert auth_http.get(path, headers={"authorization": "Bearer wrong"}).status_code == 200


def test_auth_is_checked_before_routing(auth_http):
    """Without the key, an unknown route is a 401 too: nothing about the API leaks to an unauthenticated client."""
    assert_error(auth_http.get("/v1/nope"), 401, None)


# ---- the chat template ---------------------------------------------------------------------------


def test_chat_without_chat_template_is_400(no_template_server):
    with no_template_server.client() as client:
        message = assert_error(client.post(CHAT, json=BASE[CHAT]), 400, "messages")
        assert "chat template" in message, message
        response = client.post(COMPLETIONS, json=BASE[COMPLETIONS])
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
    no_template_server.wait_idle()


# ---- /v1/models, /version, /tokenize, /detokenize ------------------------------------------------


def test_models_lists_served_name_with_max_model_len(http, llama):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in body["data"]] == [(MODEL, MAX_MODEL_LEN)]


def test_version(http):
    response = http.get("/version")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"version"}
    assert isinstance(body["version"], str) and body["version"]


def test_tokenize_detokenize_round_trip(http):
    text = "The quick brown fox jumps over the lazy dog."
    tokenized = http.post("/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["count"] == len(body["tokens"]) > 1
    assert body["max_model_len"] == MAX_MODEL_LEN
    detokenized = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert detokenized.status_code == 200, detokenized.text
    assert detokenized.json() == {"prompt": text}


@pytest.mark.parametrize("body", [
    {"prompt": "The quick brown fox, naïvely."},
    {"prompt": "The quick brown fox, naïvely.", "add_special_tokens": False, "return_token_strs": True},
    {"messages": MESSAGES, "return_token_strs": True},
], ids=["prompt", "prompt-token-strs", "messages-token-strs"])
def test_tokenize_and_detokenize_answer_the_documented_shape(http, llama, body):
    """Real answers against the 200 schemas of /openapi.json: valid, with exactly the documented keys (all of them
    required: the answer always carries each one, token_strs as null unless asked for), and values that agree with
    the checkpoint's own tokenizer."""
    doc = http.get("/openapi.json").json()
    reference = Tokenizer.from_file(str(llama / "tokenizer.json"))
    tokenized = http.post("/tokenize", json=body)
    assert tokenized.status_code == 200, tokenized.text
    answer = tokenized.json()
    assert_documented_shape(doc, "/tokenize", answer)
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == MAX_MODEL_LEN
    if "prompt" in body:
        expected = reference.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        assert answer["tokens"] == expected.ids
    if body.get("return_token_strs"):
        assert answer["token_strs"] == [reference.id_to_token(t) for t in answer["tokens"]]
    else:
        assert answer["token_strs"] is None
        # The document does not let the key go missing, since it never does.
        without = {k: v for k, v in answer.items() if k != "token_strs"}
        assert not schema_validator(doc, documented_200(doc, "/tokenize")).is_valid(without)
    detokenized = http.post("/detokenize", json={"tokens": answer["tokens"]})
    assert detokenized.status_code == 200, detokenized.text
    assert_documented_shape(doc, "/detokenize", detokenized.json())
    assert detokenized.json()["prompt"] == reference.decode(answer["tokens"], skip_special_tokens=False)


@pytest.mark.parametrize("tokens", [[1, 999999], [-1], [4096]])
def test_detokenize_out_of_vocab_is_400(http, last_token_id, tokens):
    message = assert_error(http.post("/detokenize", json={"tokens": tokens}), 400, "tokens", contains=["tokens"])
    bad = next(t for t in tokens if not 0 <= t <= last_token_id)
    assert names_number(message, str(bad)), message
    assert f"0..{last_token_id}" in message, message


@pytest.mark.parametrize("body", [{"model": MODEL}, {"prompt": "x", "messages": MESSAGES}],
                         ids=["neither-prompt-nor-messages", "both-prompt-and-messages"])
def test_tokenize_needs_exactly_one_of_prompt_or_messages(http, body):
    assert_error(http.post("/tokenize", json=body), 400, "prompt", contains=["prompt", "messages"])


# ---- after everything: still serving, nothing leaked ---------------------------------------------


def test_server_still_serves_and_engine_is_idle_after_bad_requests(server, http):
    """Runs after the bad requests above (module order); it also sends a few of its own, including refusals that
    happen after the first prompt of a batch was already prepared."""
    for body in ({**BASE[COMPLETIONS], "prompt": ["Hello", "World", [999999]]},
                 {**BASE[COMPLETIONS], "prompt": [[5] * 10, [5] * 200]},
                 {**BASE[COMPLETIONS], "n": 4, "min_tokens": 9}):
        assert http.post(COMPLETIONS, json=body).status_code == 400
    completion = http.post(COMPLETIONS, json={**BASE[COMPLETIONS], "max_tokens": 4, "n": 2})
    assert completion.status_code == 200, completion.text
    assert [c["index"] for c in completion.json()["choices"]] == [0, 1]
    chat = http.post(CHAT, json={**BASE[CHAT], "max_tokens": 4})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    server.wait_idle()
    pool = server.engine.engine.core.pool
    assert pool.num_free == pool.num_blocks
    assert server.engine.is_healthy


# ---- the API key from the environment ------------------------------------------------------------


def test_api_key_from_environment(llama):
    with ServerProcess(llama, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                       "--num-kv-blocks", "32", "--log-level", "debug", env={"ATTNSERVE_API_KEY": "env-key"}) as proc:
        with proc.client() as client:
            assert_error(client.get("/v1/models"), 401, None)
            assert_error(client.post(COMPLETIONS, json=BASE[COMPLETIONS]), 401, None)
            assert_error(client.get("/v1/models", headers={"authorization": "Bearer other"}), 401, None)
            assert client.get("/health").status_code == 200
            ok = client.get("/v1/models", headers={"authorization": "Bearer env-key"})
            assert ok.status_code == 200, ok.text
            done = client.post(COMPLETIONS, json=BASE[COMPLETIONS], headers={"authorization": "Bearer env-key"})
            assert done.status_code == 200, done.text
        # Neither the key nor a wrong one a client sent may end up in the log (debug level included).
        assert "env-key" not in proc.log() and "Bearer other" not in proc.log()


# ---- the command line ----------------------------------------------------------------------------

SERVE_FLAGS = ["--model", "--host", "--port", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
               "--max-num-batched-tokens", "--block-size", "--num-kv-blocks", "--kv-cache-memory",
               "--gpu-memory-utilization", "--device", "--dtype", "--seed", "--max-queued-requests",
               "--shutdown-timeout", "--log-level", "--log-format", "--log-prompts", "--disable-log-requests",
               "--disable-log-stats", "--allowed-origins", "--load-format", "--enforce-eager",
               "--enable-prefix-caching", "--attention-backend", "--max-header-size", "--timeout-keep-alive",
               "--limit-concurrency", "--request-body-timeout", "--engine-watchdog-timeout"]


def run_cli(*args: str, program: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATTNSERVE_API_KEY"}
    cmd = (program or [sys.executable, "-m", "server"]) + list(args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "named"), [
    (["--bogus-flag"], "--bogus-flag"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--model", "/nonexistent/dir", "--port", "0"], "/nonexistent/dir"),
], ids=["unknown-flag", "max-num-seqs-0", "missing-model-dir"])
def test_cli_error_is_one_line_without_traceback(args, named):
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0], lines[0]


def test_cli_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    missing = [flag for flag in SERVE_FLAGS if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)]
    assert not missing, f"--help does not document {missing}"


def test_attnserve_serve_help_via_console_script():
    script = Path(sys.executable).parent / "attnserve"
    assert script.is_file(), f"console script not installed at {script}"
    result = run_cli("serve", "--help", program=[str(script)])
    assert result.returncode == 0, result.stderr
    missing = [flag for flag in SERVE_FLAGS if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)]
    assert not missing, f"attnserve serve --help does not document {missing}"


# ---- hardening: CORS and exposure warnings --------------------------------------------------------


def test_cors_is_off_by_default(http):
    response = http.options(COMPLETIONS, headers={"Origin": "https://evil.example", "Access-Control-Request-Method":
                                                  "POST"})
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "https://x.example"}).headers


def test_cors_allows_only_the_given_origins(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32,
                         server_kwargs={"allowed_origins": ("https://app.example",), "api_key": "k"}) as srv, \
            srv.client() as c:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = c.options(COMPLETIONS, headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = c.options(COMPLETIONS, headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in bad.headers
        # The real request still needs the key.
        assert c.get("/v1/models", headers={"Origin": "https://app.example"}).status_code == 401


@pytest.mark.parametrize(("host", "key", "warned"), [("127.0.0.1", None, False), ("0.0.0.0", None, True),
                                                      ("0.0.0.0", "k", False), ("::1", None, False)])
def test_warning_when_exposed_without_a_key(host, key, warned, caplog):
    from server.serve import warn_if_exposed

    class FakeSocket:  # no test binds beyond loopback: the check only reads the bound address
        def getsockname(self):
            return (host, 8000)

    with caplog.at_level("WARNING", logger="attnserve"):
        assert warn_if_exposed(FakeSocket(), key) is warned
    assert ("without --api-key" in caplog.text) is warned


def test_oversized_request_head_is_431_and_the_server_keeps_serving(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32,
                         server_kwargs={"max_header_bytes": 8192, "api_key": "k"}) as srv, srv.client() as c:
        auth = {"authorization": "Bearer k"}
        big = c.post(COMPLETIONS, json=BASE[COMPLETIONS], headers={**auth, "x-big": "a" * 12_000})
        assert_error(big, 431, None)
        assert "8192" in big.json()["error"]["message"]
        many = c.get("/v1/models", headers={**auth, **{f"x-h{i}": "v" * 8 for i in range(600)}})
        assert_error(many, 431, None)  # 600 headers of ~20 bytes: over the 8 KiB head
        # Checked before auth: an unauthenticated giant head learns nothing more than an authenticated one.
        assert_error(c.get("/v1/models", headers={"x-big": "a" * 12_000}), 431, None)
        assert c.get("/v1/models", headers={**auth, **{f"x-h{i}": "v" for i in range(100)}}).status_code == 200
        assert c.post(COMPLETIONS, json=BASE[COMPLETIONS], headers=auth).status_code == 200


def test_concurrency_limit_is_503_in_openai_shape_and_spares_probes_and_metrics(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32,
                         server_kwargs={"limit_concurrency": 2}) as srv, srv.client() as c:
        body = {**BASE[COMPLETIONS], "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "stream": True}
        with c.stream("POST", COMPLETIONS, json=body) as first, c.stream("POST", COMPLETIONS, json=body) as second:
            assert first.status_code == second.status_code == 200
            assert srv.app.state.ctx.state.in_flight == 2  # both streams hold their slot until they end
            refused = c.post(COMPLETIONS, json=BASE[COMPLETIONS])
            assert_error(refused, 503, None, contains=["2 concurrent requests"])
            assert refused.headers["retry-after"] == "1"
            assert_error(c.get("/v1/models"), 503, None)
            assert c.get("/health").status_code == 200
            assert c.get("/version").status_code == 200
            assert c.get("/metrics").status_code == 200
        srv.wait_idle()
        assert c.post(COMPLETIONS, json=BASE[COMPLETIONS]).status_code == 200


def _open_connection_after_one_request(url: str) -> socket.socket:
    """A keep-alive connection that has been answered once (the answer read in full)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(f"GET /version HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False


def test_idle_keep_alive_connections_close_after_timeout_keep_alive(llama):
    with ServerProcess(llama, "--max-model-len", str(MAX_MODEL_LEN), "--timeout-keep-alive", "1") as proc:
        sock = _open_connection_after_one_request(proc.url)
        start = time.monotonic()
        assert _closed_within(sock, 5), "the idle connection stayed open past --timeout-keep-alive"
        assert 0.8 <= time.monotonic() - start <= 3
        sock.close()
        # A connection that is in use is not cut: the same socket may send a second request within the timeout.
        sock = _open_connection_after_one_request(proc.url)
        assert not _closed_within(sock, 0.3)
        sock.close()


def test_request_body_timeout_flag_gives_408_to_a_slow_body(llama):
    with ServerProcess(llama, "--max-model-len", str(MAX_MODEL_LEN), "--request-body-timeout", "1") as proc:
        parts = urlsplit(proc.url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{".encode())
        start = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.9 <= time.monotonic() - start <= 5
        sock.close()
        with proc.client() as c:
            assert c.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2}).status_code == 200


# ---- request and response size caps ---------------------------------------------------------------------------


def test_work_and_response_caps_refuse_with_what_to_do_instead(llama):
    caps = {"max_request_tokens": 100, "max_response_logprobs": 60}
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32,
                         server_kwargs=caps) as srv, srv.client() as c:
        # 2 prompts x n=3 x 20 tokens = 120 > 100, streamed or not
        for stream in (False, True):
            body = {**BASE[COMPLETIONS], "prompt": ["a", "b"], "n": 3, "max_tokens": 20, "stream": stream}
            message = assert_error(c.post(COMPLETIONS, json=body), 400, "max_tokens", contains=["split"])
            assert names_number(message, "120") and names_number(message, "100"), message
        chat = {**BASE[CHAT], "n": 6, "max_tokens": 17}  # 102 tokens
        assert_error(c.post(CHAT, json=chat), 400, "max_tokens", contains=["102", "100"])
        assert c.post(CHAT, json={**chat, "max_tokens": 16}).status_code == 200  # 96 tokens
        # 20 tokens x (2 + 1) logprob entries = 60 fits; 21 tokens = 63 does not, unless streamed
        fits = {**BASE[COMPLETIONS], "max_tokens": 20, "logprobs": 2, "ignore_eos": True}
        assert len(c.post(COMPLETIONS, json=fits).json()["choices"][0]["logprobs"]["tokens"]) == 20
        over = {**fits, "max_tokens": 21}
        message = assert_error(c.post(COMPLETIONS, json=over), 400, "logprobs", contains=["63", "60", "stream"])
        with c.stream("POST", COMPLETIONS, json={**over, "stream": True}) as r:
            assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
        chat_over = {**BASE[CHAT], "max_tokens": 21, "logprobs": True, "top_logprobs": 2}
        assert_error(c.post(CHAT, json=chat_over), 400, "logprobs", contains=["63", "stream"])
        # Prompt logprobs come in one piece, streamed or not: no advice to stream.
        scored = {**BASE[COMPLETIONS], "prompt": [5] * 40, "prompt_logprobs": 1, "max_tokens": 1}
        message = assert_error(c.post(COMPLETIONS, json=scored), 400, "prompt_logprobs", contains=["80"])
        assert "stream" not in message
        srv.wait_idle()
