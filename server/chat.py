"""POST /v1/chat/completions: messages rendered with the model's chat template, then one engine request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.errors import ValidationError
from server.errors import APIError
from server.generation import (
    ChoiceState,
    ChunkWriter,
    ServingContext,
    admit,
    check_request_size,
    check_stream_options,
    json_response,
    merge,
    new_request_id,
    now,
    sampling_params,
    sse_response,
    usage_dict,
)
from server.logprobs import chat_logprobs, prompt_logprobs_json
from server.protocol import ChatCompletionRequest, ChatMessage, ChatTool
from server.structured import ToolPlan, blame, constraint, tool_plan
from server.tool_parsers import ToolCall, ToolCallDelta, make_tool_call_id

# Names the renderer sets itself; chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "chat_template", "documents"})


def render_prompt_ids(tokenizer, req: ChatCompletionRequest, max_model_len: int) -> list[int]:
    """Render the conversation with the model's template and tokenize it (the template writes BOS itself). A
    conversation that certainly exceeds max_model_len tokens is refused before it is tokenized."""
    messages = template_messages(req.messages)
    tools = template_tools(req.tools)
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ValidationError(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        tools=tools, **kwargs,
    )
    if req.continue_final_message:
        text = _cut_after_final_message(text, messages[-1])
    return tokenizer.encode(text, add_special_tokens=False, max_tokens=max_model_len,
                            what="the conversation rendered by the chat template")


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    return [_for_template(m.model_dump(exclude_none=True)) for m in messages]


def template_tools(tools: list[ChatTool] | None) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def _for_template(message: dict) -> dict:
    """Chat templates (Qwen's, Llama's, ...) write a tool call's arguments with `| tojson`, so they expect an object,
    while the API carries them as JSON text: parse them, as transformers' and vLLM's callers do."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                function = {**function, "arguments": json.loads(arguments)}
            except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
                raise ValidationError(f"messages: tool_calls[{i}].function.arguments must be JSON text, got "
                                      f"{arguments[:100]!r}", "messages") from None
            call = {**call, "function": function}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


def _cut_after_final_message(text: str, final: dict) -> str:
    """Continue the last message instead of starting a new turn: drop what the template writes after its content
    (the end-of-turn marker), as transformers does."""
    content = final.get("content")
    if isinstance(content, list):
        content = "\n".join(part.get("text", "") for part in content)
    content = (content or "").strip()
    at = text.rfind(content) if content else -1
    if at < 0:
        raise ValidationError("continue_final_message: the chat template does not write the final message's "
                              "content verbatim, so it cannot be continued", "continue_final_message")
    return text[: at + len(content)]


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    ctx.check_serving()
    check_stream_options(req)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt set to false",
                       "continue_final_message")
    plan = tool_plan(req, ctx.config.tool_call_parser)
    found = constraint(req, plan)
    defaults = ctx.engine.info.generation_defaults
    max_tokens = req.max_completion_tokens or req.max_tokens or defaults.get("max_tokens")
    params = sampling_params(req, defaults, max_tokens=max_tokens,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             prompt_logprobs=req.prompt_logprobs, structured_outputs=found and found.params)
    if plan.mode == "auto":
        # Models mark their calls with tokens that are special in some tokenizers (Mistral's [TOOL_CALLS], Llama's
        # <|python_tag|>): the parser must see them, so they stay in the text, as vLLM's parsers arrange.
        params = params.clone(skip_special_tokens=False)
    request_id = new_request_id("chatcmpl")

    def prepare():
        ids = render_prompt_ids(ctx.tokenizer, req, ctx.engine.info.max_model_len)
        try:
            return [ctx.engine.prepare(ids, params, request_id, cache_salt=req.cache_salt, priority=req.priority)]
        except ValidationError as exc:
            raise blame(exc, found) from None

    prepared = await ctx.off_loop(prepare)
    check_request_size(ctx, req, prepared, prompt_logprobs_per_choice=False)
    as_ids = req.return_tokens_as_token_ids
    log = admit(ctx, request_id, prepared)
    if req.stream:
        writer = ChunkWriter({"id": request_id, "object": "chat.completion.chunk", "created": now(),
                              "model": ctx.model_name}, req, log)
        return sse_response(ctx, _events(ctx, req, plan, writer, log.streams), log)

    async def collect() -> Response:
        choices = [ChoiceState() for _ in range(req.n)]
        prompt_logprobs = None
        async for _, out in merge(log.streams):
            if out.prompt_logprobs is not None:
                prompt_logprobs = out.prompt_logprobs
            for delta in out.outputs:
                choices[delta.index].add(delta)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": now(), "model": ctx.model_name,
            "choices": [{
                "index": j,
                **_message(plan, "".join(state.text), state.finish_reason),
                "logprobs": {"content": chat_logprobs(ctx.tokenizer, state.logprobs, as_ids)} if req.logprobs
                else None,
                "stop_reason": state.stop_reason,
            } for j, state in enumerate(choices)],
            "usage": usage_dict(log, sum(len(s.token_ids) for s in choices)),
            "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(ctx.tokenizer, prompt_logprobs, as_ids),
        })

    return await json_response(ctx, raw, log, collect)


def _message(plan: ToolPlan, text: str, finish_reason: str | None) -> dict:
    """A choice's message and finish_reason: its text, or the tool calls read from it. As in OpenAI and vLLM, a turn
    that ends in calls the model chose (auto, required) finishes with "tool_calls"; a named function's with "stop"."""
    if plan.mode == "none":
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    if plan.mode == "named":
        calls = [ToolCall(make_tool_call_id(), plan.name, text)]
        return {"message": {"role": "assistant", "content": None, "tool_calls": [_call_json(c) for c in calls]},
                "finish_reason": finish_reason}
    found = plan.parser.extract(text)
    message = {"role": "assistant", "content": found.content}
    if found.calls:
        message["tool_calls"] = [_call_json(c) for c in found.calls]
    return {"message": message, "finish_reason": _tool_finish(finish_reason, bool(found.calls))}


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_finish(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


class _ChoiceStream:
    """One streamed choice's text turned into OpenAI deltas: content, or tool-call pieces (server/tool_parsers.py)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.streamer = plan.parser.streamer() if plan.parser is not None else None
        self.called = False
        self.named_id: str | None = None

    def delta(self, text: str, final: bool) -> dict:
        if self.plan.mode == "none":
            return {"content": text} if text else {}
        if self.plan.mode == "named":
            if not text and self.named_id is not None:
                return {}
            first = self.named_id is None
            self.named_id = self.named_id or make_tool_call_id()
            self.called = True
            call = ToolCallDelta(0, self.named_id if first else None, self.plan.name if first else None, text)
            return {"tool_calls": [call.to_json()]}
        content, calls = self.streamer.feed(text)
        if final:
            more_content, more_calls = self.streamer.finish()
            content, calls = content + more_content, calls + more_calls
        self.called = self.called or bool(calls)
        out: dict = {"content": content} if content else {}
        if calls:
            out["tool_calls"] = [c.to_json() for c in calls]
        return out


async def _events(ctx: ServingContext, req: ChatCompletionRequest, plan: ToolPlan, writer: ChunkWriter,
                  streams) -> AsyncIterator[str]:
    # The role comes first, in its own delta, as OpenAI sends it.
    for j in range(req.n):
        yield writer.event([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    choices = [_ChoiceStream(plan) for _ in range(req.n)]
    async for _, out in merge(streams):
        for delta in out.outputs:
            writer.completion_tokens += len(delta.token_ids)
            logprobs = {"content": chat_logprobs(ctx.tokenizer, delta.logprobs or [], req.return_tokens_as_token_ids)} \
                if req.logprobs else None
            state = choices[delta.index]
            body = state.delta(delta.text, final=delta.finish_reason is not None)
            if not body and logprobs is None and delta.finish_reason is None:
                continue  # text held back (a possible stop string, a partial character, a tool call in the making)
            choice = {"index": delta.index, "delta": body, "logprobs": logprobs,
                      "finish_reason": _tool_finish(delta.finish_reason, state.called and plan.mode != "named")}
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            yield writer.event([choice])
    usage = writer.usage_event()
    if usage is not None:
        yield usage
