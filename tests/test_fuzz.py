"""Schema fuzzing: schemathesis generates requests from the live server's /openapi.json and checks the answers.

For each operation it draws valid requests (positive mode: within every declared type and bound) and invalid ones
(negative mode: a field of the wrong type, out of range, missing), sends them with the API key, and checks that
- no answer is a 5xx;
- the status is one the document lists for that operation, the Content-Type one it lists, and the body matches the
  schema of that status (server/openapi.py makes the document exact for this);
- an invalid request is refused with a 4xx;
- every error body has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` with `code` the status;
- (once per operation) the request without the key, or with a wrong one, is refused with 401.
After all of it the engine is idle with every KV block free: no fuzzed request leaked one.

CI runs FUZZ_EXAMPLES examples per operation and mode with a fixed seed (>= 300 in total, counted); `make fuzz` sets
ATTNSERVE_FUZZ_EXAMPLES higher and a seed of its own to explore further.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server_process import InProcessServer

API_KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 128
FUZZ_EXAMPLES = int(os.environ.get("ATTNSERVE_FUZZ_EXAMPLES", "40"))
FUZZ_SEED = int(os.environ.get("ATTNSERVE_FUZZ_SEED", "20261121"))
MIN_TOTAL_EXAMPLES = 300
# Operations with a body to vary get both modes. GET /v1/models and GET /health take no parameters at all, so there
# is nothing to make invalid: they get the positive mode only.
CASES = [
    *[(method, path, mode) for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                                  ("POST", "/tokenize"), ("POST", "/detokenize")]
      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)],
    ("GET", "/v1/models", GenerationMode.POSITIVE),
    ("GET", "/health", GenerationMode.POSITIVE),
]
examples_sent: dict[str, int] = {}
statuses_seen: dict[str, dict[int, int]] = {}


def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx/5xx body is {"error": {"message", "type", "param", "code"}} with code == the HTTP status."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error body: {body!r}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"error fields: {sorted(error)}"
    assert error["code"] == response.status_code, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, ignored_auth, openai_error_shape]


@pytest.fixture(scope="module")
def server(make_ckpt):
    with InProcessServer(make_ckpt("llama"), served_model_name="fuzz-model", max_model_len=MAX_MODEL_LEN,
                         num_kv_blocks=64, server_kwargs={"api_key": API_KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_fuzz_operation(server, schema, method, path, mode):
    operation = schema[path][method]
    label = f"{method} {path} {mode.value}"
    examples_sent[label] = 0
    statuses = statuses_seen[label] = {}

    @seed(FUZZ_SEED)
    @settings(max_examples=FUZZ_EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        examples_sent[label] += 1
        response = case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    assert examples_sent[label] >= 1


def test_fuzzing_sent_enough_examples_and_leaked_nothing(server):
    assert len(examples_sent) == len(CASES), "run the whole module: the count covers every operation"
    total = sum(examples_sent.values())
    print(f"fuzzed examples: {total}; statuses per operation: {statuses_seen}")
    assert total >= MIN_TOTAL_EXAMPLES, f"only {total} examples were sent: {examples_sent}"
    server.wait_idle(timeout=30)
    with server.client() as client:
        ok = client.post("/v1/completions", headers=AUTH, json={"prompt": "Hello", "max_tokens": 4})
        assert ok.status_code == 200, ok.text
