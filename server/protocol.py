"""Request and response bodies of the OpenAI-compatible API (pydantic), with the limits we enforce.

Requests are strict: a known field with the wrong JSON type is a 400, never coerced ("5" is not 5), and NaN or
Infinity is refused. Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep working. Ranges are
declared on the fields so that /openapi.json tells clients (and fuzzers) the bounds.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from engine.sampling_params import MAX_LOGPROBS

# Sane caps on what one request may ask for (see the README's API section).
MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
MAX_PROMPTS = 256  # prompts in one batched completions request
MAX_CACHE_SALT_CHARS = 1024
MAX_TOOLS = 128



def _whole_number(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 to JSON Schema (and to JavaScript clients), so an integer
    field takes it. Any other float, or a string, still fails the strict int check after this."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field: strict (no "5", no true), but 5.0 counts as 5.
Int = Annotated[int, BeforeValidator(_whole_number)]
# Token ids as JSON may be up to 64-bit; the engine reports the vocabulary range for anything outside it.
TokenIds = list[Int]
StopStrings = Union[
    Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)],
    Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]],
        Field(max_length=MAX_STOP_STRINGS),
    ],
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Strict):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extras. None means "the model's default"."""

    model: str | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: Int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0**31)
    min_tokens: Int = Field(0, ge=0)
    stop_token_ids: Annotated[list[Annotated[Int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "vLLM: the logprob of each prompt token given the tokens before it, with this many most likely "
        "alternatives (0: the prompt token's own only). Not with stream: true."))
    return_tokens_as_token_ids: bool = Field(False, description=(
        "vLLM: name tokens in logprobs as 'token_id:N' rather than by their text."))
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS,
                                   description="Requests share prefix-cache blocks only with requests of the same salt.")
    priority: Int = Field(0, ge=-(2**63), lt=2**63, description=(
        "vLLM: the request's scheduling priority, lower first (ties in arrival order). Only with "
        "--scheduling-policy priority; any other value than 0 is refused under the other policies."))


class StructuredOutputsField(_Strict):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (object or text)")
    regex: str | None = Field(None, description="Rust regex syntax; the whole output matches it")
    choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    grammar: str | None = Field(None, description="llguidance's Lark syntax, or GBNF (llama.cpp's)")
    json_object: bool | None = Field(None, description="any JSON object")
    whitespace_pattern: str | None = Field(None, description=(
        "regex for the whitespace JSON may put between tokens (default: at most one space)"))
    disable_any_whitespace: bool = Field(False, description="JSON with no whitespace between tokens")


class ConstrainedFields(SamplingFields):
    """Structured outputs, on both routes: vLLM's structured_outputs, and its older guided_* fields."""

    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(ConstrainedFields):
    prompt: Union[
        str,
        Annotated[list[str], Field(max_length=MAX_PROMPTS)],
        TokenIds,
        Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)],
    ]
    max_tokens: Int | None = Field(16, ge=0, description="0 generates nothing: with echo and logprobs (or "
                                                           "prompt_logprobs) it scores the prompt")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1, le=MAX_N)
    add_special_tokens: bool = True
    response_format: ResponseFormat | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # Extra keys on a message (tool_calls, tool_call_id, reasoning_content, ...) are kept for the template.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema for the arguments object")
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(ConstrainedFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(None, description=(
        "none, auto (needs --enable-auto-tool-choice and --tool-call-parser), required, or a named function; "
        "default: auto when tools are given"))
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: TokenIds


# ---- responses ---------------------------------------------------------------------------------


class _Out(BaseModel):
    # NOTE: every response carries all of its model's fields, defaults and nulls included (FastAPI serializes the
    # whole model; the handlers that build JSON themselves write every key), so the document marks them required.
    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Out):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenLogprob(_Out):
    logprob: float
    rank: int = Field(description="1 for the most likely token")
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, null for the first, else {token id: ...} for the prompt token itself
# and then its most likely alternatives.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "attnserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out):
    """vLLM's /tokenize answer."""

    count: int = Field(description="The number of tokens.")
    max_model_len: int = Field(description="The longest sequence (prompt plus output) the server accepts.")
    tokens: list[int]
    token_strs: list[str] | None = Field(
        None, description="Each token as the vocabulary spells it (e.g. 'Ġthe' in a byte-level BPE), with "
                          "return_token_strs: true; null otherwise.")


class TokenizerInfoResponse(_Out):
    """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (lm-evaluation-harness's remote
    tokenizer reads it)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int = Field(description="The tokenizer's own limit, else the server's max_model_len.")
    vocab_size: int


class DetokenizeResponse(_Out):
    prompt: str = Field(description="The decoded text, special tokens included.")


class VersionResponse(_Out):
    version: str
