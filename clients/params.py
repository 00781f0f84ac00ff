"""The request fields `create()` accepts: the server's (OpenAI's, then vLLM's extras), declared once for the sync and
async clients. Anything not listed can go in `extra_body`, which is merged into the JSON body as is."""

from __future__ import annotations

import sys
from typing import Any, Literal, TypedDict, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired, Required, Unpack
else:  # pydantic (a dependency through fastapi) brings typing_extensions
    from typing_extensions import NotRequired, Required, Unpack

__all__ = ["ChatCompletionParams", "CompletionParams", "Message", "Unpack", "request_body"]

Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(TypedDict, total=False):
    include_usage: bool
    continuous_usage_stats: bool


class Message(TypedDict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: NotRequired[str | list[dict[str, Any]] | None]
    name: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]  # an assistant's calls, as the server returned them
    tool_call_id: NotRequired[str]  # a tool message: the call it answers


class _SamplingParams(TypedDict, total=False):
    model: str
    n: int
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[str, float]
    seed: int
    stop: str | list[str]
    stream: bool
    stream_options: StreamOptions
    user: str
    # vLLM's extras
    top_k: int
    min_p: float
    repetition_penalty: float
    min_tokens: int
    stop_token_ids: list[int]
    ignore_eos: bool
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    prompt_logprobs: int
    return_tokens_as_token_ids: bool
    cache_salt: str
    priority: int  # only with a server started with --scheduling-policy priority
    # structured outputs: one of json, regex, choice, grammar, json_object (and whitespace_pattern)
    structured_outputs: dict[str, Any]
    response_format: dict[str, Any]  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    # client-side: merged into the body / the request's timeout in seconds
    extra_body: dict[str, Any]
    timeout: float


class CompletionParams(_SamplingParams, total=False):
    prompt: Required[Prompt]
    max_tokens: int
    logprobs: int
    echo: bool
    suffix: str
    best_of: int
    add_special_tokens: bool


class ChatCompletionParams(_SamplingParams, total=False):
    messages: Required[list[Message]]
    max_tokens: int
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    tools: list[dict[str, Any]]
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any]
    parallel_tool_calls: bool
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any]


def request_body(params: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """(JSON body, per-request timeout) from create()'s keyword arguments."""
    body = dict(params)
    timeout = body.pop("timeout", None)
    body.update(body.pop("extra_body", None) or {})
    return body, timeout
