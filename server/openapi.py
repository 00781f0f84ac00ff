"""The served /openapi.json, made exact: every status a route can answer, and the bounds this server enforces.

FastAPI's generated document is close but not true: it lists a 422 the API never sends (validation errors are 400s),
leaves out the statuses middleware answers (401, 408, 413, 415, 431, 503) and the 405 routing answers to a method a
path does not take, and cannot know the bounds that depend on the loaded model (token ids below the vocabulary size,
max_tokens up to max_model_len, the served model names). Clients and fuzzers read the document to learn what is
valid, so those are filled in here, once per app.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.protocol import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range",
    401: "Missing or wrong API key",
    404: "Unknown model",
    405: "This path does not take the request's method; the Allow header lists the methods it does take",
    408: "The request body did not arrive in time",
    413: "The request body is larger than the server allows",
    415: "The Content-Type is not application/json",
    429: "The waiting queue is full; retry after Retry-After seconds",
    431: "The request head (path and headers) is larger than the server allows",
    503: "The engine is not running, the server is shutting down, or too many requests are in flight",
}
# Routes anyone may call: no API key, never refused by the concurrency limit or the drain (load balancers use them).
_PROBES = frozenset({"/health", "/version"})
_MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
_GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest")


def install_precise_openapi(app: FastAPI, *, served_model_names: tuple[str, ...], vocab_size: int,
                            max_model_len: int, api_key: bool) -> None:
    """Replace app.openapi with one that returns the generated document corrected as the module docstring says."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            _document_statuses(doc, api_key)
            _declare_bounds(doc["components"]["schemas"], served_model_names, vocab_size, max_model_len)
            if api_key:
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operation in _operations(doc):
                    if path not in _PROBES:
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(doc: dict[str, Any]):
    for path, methods in doc["paths"].items():
        for operation in methods.values():
            yield path, operation


def _statuses(path: str, method: str, api_key: bool) -> set[int]:
    # HeaderLimit runs before everything else. Every path answers 405 to the methods it lacks; OpenAPI has no place
    # for a method a path does not have, so the 405 is listed under each operation the path does have.
    statuses = {405, 431}
    if path == "/health":
        statuses.add(503)
    if path in _PROBES:
        return statuses
    if path != "/metrics":
        statuses.add(503)  # concurrency limit and drain
    if api_key:
        statuses.add(401)
    if method == "post":
        statuses |= {400, 408, 413, 415}
    if path in _MODEL_ROUTES:
        statuses.add(404)
    if path in _GENERATION_ROUTES:
        statuses |= {429, 503}
    return statuses


def _document_statuses(doc: dict[str, Any], api_key: bool) -> None:
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in list(responses):
                if status.isdigit() and int(status) >= 400:
                    del responses[status]
            for status in sorted(_statuses(path, method, api_key)):
                responses[str(status)] = {"description": _DESCRIPTIONS[status],
                                          "content": {"application/json": {"schema": _ERROR_REF}}}
            responses["405"]["headers"] = {"Allow": {"description": "The methods this path takes",
                                                     "schema": {"type": "string"}}}
    schemas = doc["components"]["schemas"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorResponse"] = error


def _declare_bounds(schemas: dict[str, Any], names: tuple[str, ...], vocab_size: int, max_model_len: int) -> None:
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    max_prompt = max_model_len - 1  # at least one token must be left to generate
    for name in _REQUEST_SCHEMAS:
        props = schemas[name]["properties"]
        props["model"]["anyOf"] = [{"type": "string", "enum": list(names)}, {"type": "null"}]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in props:
                _set_in_alternatives(props[field], maximum=max_model_len)
        if "stop_token_ids" in props:
            _set_in_alternatives(props["stop_token_ids"], items=token_id)
        if "logit_bias" in props:
            _set_in_alternatives(props["logit_bias"], propertyNames={"pattern": "^[0-9]+$"})
    for alternative in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        items = alternative.get("items", {})
        if items.get("type") == "integer":
            alternative["items"] = token_id
            alternative["minItems"] = 1
            alternative["maxItems"] = max_prompt
        elif items.get("type") == "array":
            items["items"] = token_id
            items["minItems"] = 1
            items["maxItems"] = max_prompt
            alternative["minItems"] = 1
        elif items.get("type") == "string":
            alternative["minItems"] = 1
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = token_id
    _declare_cross_field_rules(schemas)


def _declare_cross_field_rules(schemas: dict[str, Any]) -> None:
    """What the handlers check across fields, in JSON Schema terms (OpenAPI 3.1 is JSON Schema 2020-12)."""
    completion = schemas["CompletionRequest"]["properties"]
    # An empty prompt is refused (there is nothing to condition on); suffix (insertion) is not supported.
    for alternative in completion["prompt"]["anyOf"]:
        if alternative.get("type") == "string":
            alternative["minLength"] = 1
        elif alternative.get("items", {}).get("type") == "string":
            alternative["items"]["minLength"] = 1
    completion["suffix"] = {"type": "null", "description": "Not supported: omit it or send null."}
    # stream_options only with stream: true.
    stream_rule = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                   "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
    schemas["CompletionRequest"].setdefault("allOf", []).append(stream_rule)
    chat = schemas["ChatCompletionRequest"]
    chat.setdefault("allOf", []).append(stream_rule)
    # continue_final_message extends the last message instead of opening a new one, so not with a generation prompt.
    chat["allOf"].append({
        "if": {"required": ["continue_final_message"], "properties": {"continue_final_message": {"const": True}}},
        "then": {"required": ["add_generation_prompt"], "properties": {"add_generation_prompt": {"const": False}}},
    })
    # A message needs content, except an assistant message that makes tool calls.
    schemas["ChatMessage"]["anyOf"] = [
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        {"required": ["role", "tool_calls"],
         "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}},
    ]
    # /tokenize takes exactly one of prompt (text) and messages (a chat, rendered with the template).
    schemas["TokenizeRequest"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]


def _set_in_alternatives(prop: dict[str, Any], **keywords: Any) -> None:
    """Add keywords to the non-null alternative of an optional field (or to the field itself)."""
    for alternative in prop.get("anyOf", [prop]):
        if alternative.get("type") != "null":
            alternative.update(keywords)
