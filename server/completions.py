"""POST /v1/completions: one engine request per prompt; choice index = prompt index * n + sample index."""

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
from server.logprobs import completion_logprobs, prompt_logprobs_json, with_top
from server.protocol import CompletionRequest
from server.structured import blame, constraint


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


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    ctx.check_serving()
    check_stream_options(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of must equal n ({req.n}): ranking extra samples is not supported", "best_of")
    prompts = _prompts(req.prompt)
    # echo with logprobs reports the prompt's tokens too, with as many alternatives as the completion's.
    echo_logprobs = req.logprobs if req.echo else None
    scored = [k for k in (echo_logprobs, req.prompt_logprobs) if k is not None]
    found = constraint(req)
    params = sampling_params(req, ctx.engine.info.generation_defaults, max_tokens=req.max_tokens,
                             logprobs=req.logprobs, prompt_logprobs=max(scored) if scored else None,
                             structured_outputs=found and found.params)
    request_id = new_request_id("cmpl")
    tokenizer = ctx.tokenizer

    def prepare():
        out = []
        for i, prompt in enumerate(prompts):
            ids = prompt
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens,
                                       max_tokens=ctx.engine.info.max_model_len,
                                       what="the prompt" if len(prompts) == 1 else f"prompt[{i}]")
            # One group: the fair policy shares the engine between client requests, not between their prompts.
            try:
                out.append(ctx.engine.prepare(ids, params, f"{request_id}-{i}", cache_salt=req.cache_salt,
                                              priority=req.priority, group=request_id))
            except ValidationError as exc:
                raise blame(exc, found) from None
        return out

    prepared = await ctx.off_loop(prepare)
    check_request_size(ctx, req, prepared, prompt_logprobs_per_choice=True)
    prompt_ids = [r.prompt_token_ids for r in prepared]
    echoes = [""] * len(prompts)
    if req.echo:
        echoes = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    as_ids = req.return_tokens_as_token_ids
    log = admit(ctx, request_id, prepared)
    if req.stream:
        writer = ChunkWriter({"id": request_id, "object": "text_completion", "created": now(),
                              "model": ctx.model_name}, req, log)
        return sse_response(ctx, _events(ctx, req, writer, log.streams, echoes, prompt_ids), log)

    async def collect() -> Response:
        n = req.n
        choices = [[ChoiceState() for _ in range(n)] for _ in prompts]
        prompt_logprobs: list[list | None] = [None] * len(prompts)
        async for i, out in merge(log.streams):
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs
            for delta in out.outputs:
                choices[i][delta.index].add(delta)
        body_choices, completion_tokens = [], 0
        for i, per_prompt in enumerate(choices):
            shown = None if req.prompt_logprobs is None else prompt_logprobs_json(
                tokenizer, with_top(prompt_logprobs[i], req.prompt_logprobs), as_ids)
            for j, state in enumerate(per_prompt):
                completion_tokens += len(state.token_ids)
                logprobs = None
                if req.logprobs is not None:
                    ids, lps = state.token_ids, state.logprobs
                    if req.echo:
                        ids, lps = prompt_ids[i] + ids, with_top(prompt_logprobs[i], req.logprobs) + lps
                    logprobs, _ = completion_logprobs(tokenizer, ids, lps, 0, as_ids)
                body_choices.append({
                    "index": i * n + j, "text": echoes[i] + "".join(state.text), "logprobs": logprobs,
                    "finish_reason": state.finish_reason, "stop_reason": state.stop_reason,
                    "prompt_logprobs": shown,
                })
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": now(), "model": ctx.model_name,
            "choices": body_choices, "usage": usage_dict(log, completion_tokens),
            "system_fingerprint": None,
        })

    return await json_response(ctx, raw, log, collect)


async def _events(ctx: ServingContext, req: CompletionRequest, writer: ChunkWriter, streams,
                  echoes: list[str], prompt_ids: list[list[int]]) -> AsyncIterator[str]:
    n = req.n
    offsets = [0] * (len(echoes) * n)  # text_offset of each choice's next token
    echoed = [not req.echo] * len(offsets)
    prompt_logprobs: list[list | None] = [None] * len(echoes)
    as_ids = req.return_tokens_as_token_ids
    async for i, out in merge(streams):
        if out.prompt_logprobs is not None:
            prompt_logprobs[i] = out.prompt_logprobs
        for delta in out.outputs:
            index = i * n + delta.index
            if not echoed[index]:
                # The prompt comes first, in its own chunk, once its logprobs are known: the request's first
                # output carries them, and it comes no later than this choice's first output.
                echoed[index] = True
                logprobs = None
                if req.logprobs is not None:
                    logprobs, offsets[index] = completion_logprobs(
                        ctx.tokenizer, prompt_ids[i], with_top(prompt_logprobs[i], req.logprobs), 0, as_ids)
                yield writer.event([{"index": index, "text": echoes[i], "logprobs": logprobs,
                                     "finish_reason": None, "stop_reason": None}])
            writer.completion_tokens += len(delta.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[index] = completion_logprobs(ctx.tokenizer, delta.token_ids, delta.logprobs or [],
                                                               offsets[index], as_ids)
            if not delta.text and logprobs is None and delta.finish_reason is None:
                continue  # text held back (a possible stop string or a partial character)
            yield writer.event([{"index": index, "text": delta.text, "logprobs": logprobs,
                                 "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}])
    usage = writer.usage_event()
    if usage is not None:
        yield usage
