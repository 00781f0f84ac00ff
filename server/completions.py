"""POST /v1/completions: one engine request per prompt; choice index = prompt index * n + sample index."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.outputs import TokenLogprob
from server.errors import APIError
from server.generation import (
    ChoiceState,
    ChunkWriter,
    ServingContext,
    admit,
    check_stream_options,
    json_response,
    merge,
    new_request_id,
    now,
    sampling_params,
    sse_response,
    usage_dict,
)
from server.protocol import CompletionRequest


def _prompts(prompt) -> list[str | list[int]]:
    """The request's prompts as a list: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], list):
        prompts = list(prompt)
    elif prompt and isinstance(prompt[0], str):
        prompts = list(prompt)
    else:
        prompts = [prompt]  # token ids (or an empty list, refused below)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise APIError(400, f"{where} is empty; a prompt needs at least one character or token", "prompt")
    return prompts


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for some tokens, whose text starts at character `offset` of the choice."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in logprobs:
        text = tokenizer.token_text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        alternatives = {tokenizer.token_text(t): v for t, v in lp.top}
        alternatives.setdefault(text, lp.logprob)
        top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    ctx.check_serving()
    check_stream_options(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of must equal n ({req.n}): ranking extra samples is not supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo together with logprobs would need prompt logprobs, which are not supported; "
                            "use one or the other", "echo")
    prompts = _prompts(req.prompt)
    params = sampling_params(req, ctx.engine.info.generation_defaults, max_tokens=req.max_tokens,
                             logprobs=req.logprobs)
    request_id = new_request_id("cmpl")
    tokenizer = ctx.tokenizer

    def prepare():
        out = []
        for i, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens) if isinstance(prompt, str) \
                else prompt
            out.append(ctx.engine.prepare(ids, params, f"{request_id}-{i}", cache_salt=req.cache_salt))
        return out

    prepared = await ctx.off_loop(prepare)
    echoes = [""] * len(prompts)
    if req.echo:
        echoes = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    log = admit(ctx, request_id, prepared)
    if req.stream:
        writer = ChunkWriter({"id": request_id, "object": "text_completion", "created": now(),
                              "model": ctx.model_name}, req, log)
        return sse_response(ctx, _events(ctx, req, writer, log.streams, echoes), log)

    async def collect() -> Response:
        n = req.n
        choices = [[ChoiceState() for _ in range(n)] for _ in prompts]
        async for i, out in merge(log.streams):
            for delta in out.outputs:
                choices[i][delta.index].add(delta)
        body_choices, completion_tokens = [], 0
        for i, per_prompt in enumerate(choices):
            for j, state in enumerate(per_prompt):
                completion_tokens += len(state.token_ids)
                logprobs = None
                if req.logprobs is not None:
                    logprobs, _ = completion_logprobs(tokenizer, state.logprobs, len(echoes[i]))
                body_choices.append({
                    "index": i * n + j, "text": echoes[i] + "".join(state.text), "logprobs": logprobs,
                    "finish_reason": state.finish_reason, "stop_reason": state.stop_reason,
                })
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": now(), "model": ctx.model_name,
            "choices": body_choices, "usage": usage_dict(log, completion_tokens),
            "system_fingerprint": None,
        })

    return await json_response(ctx, raw, log, collect)


async def _events(ctx: ServingContext, req: CompletionRequest, writer: ChunkWriter, streams,
                  echoes: list[str]) -> AsyncIterator[str]:
    n = req.n
    offsets = [len(echoes[index // n]) for index in range(len(echoes) * n)]  # text_offset of the next token
    if req.echo:
        for index in range(len(offsets)):
            yield writer.event([{"index": index, "text": echoes[index // n], "logprobs": None,
                                 "finish_reason": None, "stop_reason": None}])
    async for i, out in merge(streams):
        for delta in out.outputs:
            writer.completion_tokens += len(delta.token_ids)
            index = i * n + delta.index
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[index] = completion_logprobs(ctx.tokenizer, delta.logprobs or [], offsets[index])
            if not delta.text and logprobs is None and delta.finish_reason is None:
                continue  # text held back (a possible stop string or a partial character)
            yield writer.event([{"index": index, "text": delta.text, "logprobs": logprobs,
                                 "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}])
    usage = writer.usage_event()
    if usage is not None:
        yield usage
