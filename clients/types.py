"""Typed responses. Lenient on purpose, unlike the server's own schemas (server/protocol.py): unknown fields are
kept (as attributes and in `model_extra`) and enumerations are plain strings, so the SDK reads vLLM's or a newer
server's responses without breaking."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class PromptTokensDetails(_Model):
    cached_tokens: int | None = None


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Model):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class PromptTokenLogprob(_Model):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else {token id (as a string): its logprob entry}.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(_Model):
    index: int
    text: str = ""
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(_Model):
    """A /v1/completions response; also each chunk of its stream (`object` tells which)."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        """The first choice's text (the common n=1 case)."""
        return self.choices[0].text if self.choices else ""


CompletionChunk = Completion  # the stream's chunks have the same shape, with text deltas


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Model):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(_Model):
    name: str | None = None  # None in a streamed call's later pieces
    arguments: str = ""  # JSON text; streamed in fragments


class ToolCall(_Model):
    """A call in a message; in a stream, a piece of one: `index` says which, id and name come with its first piece."""

    index: int | None = None
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall = FunctionCall()


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Model):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(_Model):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = []
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def text(self) -> str:
        """The first choice's message content."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta = ChatDelta()
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = []
    usage: Usage | None = None


class Model(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str | None = None
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[Model] = []

    def __iter__(self):  # type: ignore[override] - iterate the models, not pydantic's fields
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class TokenizeResult(_Model):
    count: int
    tokens: list[int]
    max_model_len: int | None = None
    token_strs: list[str] | None = None


class DetokenizeResult(_Model):
    prompt: str


class TokenizerInfo(_Model):
    """vLLM's /tokenizer_info: the served tokenizer's special tokens, chat template and limits."""

    tokenizer_class: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int | None = None
    vocab_size: int | None = None


def text_of(chunk: Completion | ChatCompletionChunk) -> str:
    """The text a chunk adds (all choices' deltas, in order); '' for role-only and usage-only chunks."""
    parts: list[str] = []
    for choice in chunk.choices:
        if isinstance(choice, CompletionChoice):
            parts.append(choice.text)
        elif choice.delta.content:
            parts.append(choice.delta.content)
    return "".join(parts)

