"""POST /v1/chat/completions: messages rendered with the model's chat template, then one engine request."""

from __future__ import annotations

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
from server.protocol import ChatCompletionRequest

# Names the renderer sets itself; chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "chat_template", "documents"})


def render_prompt_ids(tokenizer, req: ChatCompletionRequest, max_model_len: int) -> list[int]:
    """Render the conversation with the model's template and tokenize it (the template writes BOS itself). A
    conversation that certainly exceeds max_model_len tokens is refused before it is tokenized."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ValidationError(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        tools=req.tools, **kwargs,
    )
    if req.continue_final_message:
        text = _cut_after_final_message(text, messages[-1])
    return tokenizer.encode(text, add_special_tokens=False, max_tokens=max_model_len,
                            what="the conversation rendered by the chat template")


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
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported; only 'text' is",
                       "response_format")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt set to false",
                       "continue_final_message")
    defaults = ctx.engine.info.generation_defaults
    max_tokens = req.max_completion_tokens or req.max_tokens or defaults.get("max_tokens")
    params = sampling_params(req, defaults, max_tokens=max_tokens,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             prompt_logprobs=req.prompt_logprobs)
    request_id = new_request_id("chatcmpl")

    def prepare():
        ids = render_prompt_ids(ctx.tokenizer, req, ctx.engine.info.max_model_len)
        return [ctx.engine.prepare(ids, params, request_id, cache_salt=req.cache_salt, priority=req.priority)]

    prepared = await ctx.off_loop(prepare)
    check_request_size(ctx, req, prepared, prompt_logprobs_per_choice=False)
    as_ids = req.return_tokens_as_token_ids
    log = admit(ctx, request_id, prepared)
    if req.stream:
        writer = ChunkWriter({"id": request_id, "object": "chat.completion.chunk", "created": now(),
                              "model": ctx.model_name}, req, log)
        return sse_response(ctx, _events(ctx, req, writer, log.streams), log)

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
                "message": {"role": "assistant", "content": "".join(state.text)},
                "logprobs": {"content": chat_logprobs(ctx.tokenizer, state.logprobs, as_ids)} if req.logprobs
                else None,
                "finish_reason": state.finish_reason,
                "stop_reason": state.stop_reason,
            } for j, state in enumerate(choices)],
            "usage": usage_dict(log, sum(len(s.token_ids) for s in choices)),
            "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(ctx.tokenizer, prompt_logprobs, as_ids),
        })

    return await json_response(ctx, raw, log, collect)


async def _events(ctx: ServingContext, req: ChatCompletionRequest, writer: ChunkWriter,
                  streams) -> AsyncIterator[str]:
    # The role comes first, in its own delta, as OpenAI sends it.
    for j in range(req.n):
        yield writer.event([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    async for _, out in merge(streams):
        for delta in out.outputs:
            writer.completion_tokens += len(delta.token_ids)
            logprobs = {"content": chat_logprobs(ctx.tokenizer, delta.logprobs or [], req.return_tokens_as_token_ids)} \
                if req.logprobs else None
            if not delta.text and logprobs is None and delta.finish_reason is None:
                continue  # text held back (a possible stop string or a partial character)
            choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": logprobs, "finish_reason": delta.finish_reason}
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            yield writer.event([choice])
    usage = writer.usage_event()
    if usage is not None:
        yield usage
