"""What completions and chat share: request fields -> SamplingParams, admission, running prompts on the engine,
merging several requests' streams, and aborting on client disconnect.

Every check that can fail runs before the HTTP status is sent, so a bad request is a 4xx and never a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from engine.async_engine import AsyncEngine, RequestStream
from engine.errors import EngineDeadError, ValidationError
from engine.core import PreparedRequest
from engine.outputs import CompletionOutput, TokenLogprob
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from server.config import ServerConfig
from server.errors import APIError, as_api_error, sse_error
from server.http_protocol import client_gone
from server.logs import RequestLog
from server.metrics import Metrics
from server.middleware import ServerState
from server.protocol import SamplingFields

logger = logging.getLogger(__name__)


@dataclass
class ServingContext:
    """What the handlers need, held on app.state."""

    engine: AsyncEngine
    config: ServerConfig
    state: ServerState
    metrics: Metrics

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    @property
    def tokenizer(self):
        return self.engine.info.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            shown = name if len(name) <= 200 else name[:200] + "..."  # an error need not echo a huge name back
            raise APIError(404, f"The model `{shown}` does not exist; this server serves "
                                f"{', '.join(self.config.served_model_names)}", "model")

    def check_serving(self) -> None:
        if self.state.draining:
            raise APIError(503, "the server is shutting down")
        if not self.engine.is_healthy:
            raise APIError(503, f"the engine is not running: {self.engine.dead_reason}")

    async def off_loop(self, fn: Callable, *args, **kwargs) -> Any:
        """Tokenizing a long prompt or rendering a chat template takes milliseconds to seconds of CPU: keep it off
        the event loop so other requests' streams keep flowing meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req: SamplingFields, defaults: Mapping[str, Any], *, max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Map API fields onto SamplingParams. Fields the client left out take the model's generation_config.json
    values (as vLLM does), then the library defaults."""

    def pick(name: str) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name)

    chosen = {name: pick(name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    return SamplingParams(
        n=req.n,
        **{k: v for k, v in chosen.items() if v is not None},
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        structured_outputs=structured_outputs,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ValidationError(f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                                  "logit_bias") from None
        out[token] = value
    return out


def check_stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true", "stream_options")
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs is not available when stream is true (as in vLLM); a streamed "
                            "completion with echo and logprobs carries the prompt's logprobs in its first chunk",
                       "prompt_logprobs")


def check_request_size(ctx: ServingContext, req: SamplingFields, prepared: list[PreparedRequest], *,
                       prompt_logprobs_per_choice: bool) -> None:
    """Refuse, with a 400 that says how to ask instead, a request whose generation would exceed
    --max-request-tokens, or whose response would carry more than --max-response-logprobs logprob entries: prompt
    logprobs (in every choice of a completion, once in a chat), and, unless streamed, the generated tokens'."""
    config, stream = ctx.config, req.stream
    # The field an oversized response is blamed on (a completion's echo asks for prompt logprobs through logprobs).
    logprobs_param = "prompt_logprobs" if req.prompt_logprobs is not None else "logprobs"
    work = sum(r.max_tokens * r.params.n for r in prepared)
    if work > config.max_request_tokens:
        raise APIError(400, f"the request may generate {work} tokens (prompts x n x max_tokens), more than the "
                            f"{config.max_request_tokens} one request may ask for; split it into smaller requests or "
                            "lower max_tokens", "max_tokens")
    prompt_entries = generated_entries = 0
    for r in prepared:
        if r.params.prompt_logprobs is not None:
            choices = r.params.n if prompt_logprobs_per_choice else 1
            prompt_entries += len(r.prompt_token_ids) * (r.params.prompt_logprobs + 1) * choices
        if r.params.logprobs is not None and not stream:
            generated_entries += r.max_tokens * r.params.n * (r.params.logprobs + 1)
    entries = prompt_entries + generated_entries
    if entries > config.max_response_logprobs:
        # Streaming helps only with the generated tokens' share: prompt logprobs come in one piece either way.
        stream_it = "stream it (stream: true), " if prompt_entries <= config.max_response_logprobs else ""
        raise APIError(400, f"the logprobs asked for ({logprobs_param}) come to {entries} entries (tokens x (top "
                            f"logprobs + 1), over prompts and choices), more than the {config.max_response_logprobs} "
                            f"one response may hold; {stream_it}split the request, shorten it, or ask for fewer top "
                            "logprobs", logprobs_param)


def admit(ctx: ServingContext, request_id: str, prepared: list[PreparedRequest]) -> RequestLog:
    """Queue the requests, or refuse them all with 429 if the waiting queue cannot take them. No await between the
    check and the adds, so concurrent handlers cannot both squeeze into the last slot. The streams come back in
    the RequestLog that writes the request's log line when its response ends."""
    ctx.check_serving()
    waiting = ctx.engine.num_waiting_requests()
    limit = ctx.config.max_queued_requests
    if waiting + len(prepared) > limit:
        raise APIError(
            429, f"the server is overloaded: {waiting} requests are waiting (limit {limit}); retry later",
            headers={"Retry-After": str(ctx.config.retry_after_s)},
        )
    streams: list[RequestStream] = []
    try:
        for req in prepared:
            streams.append(ctx.engine.add_request(req))
    except BaseException:
        for stream in streams:
            ctx.engine.abort(stream.request_id)
        raise
    return RequestLog(request_id, prepared, streams, log_prompts=ctx.config.log_prompts)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, delta output) from several requests as they arrive. The streams stay the caller's to close
    (sse_response and json_response do, which aborts whatever is unfinished)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    # NOTE: bounded, so that a consumer that stops (a client that does not read) stops the pumps too, and the
    # engine's backpressure sees each request's outputs pile up where it counts them (engine/async_engine.py).
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        # NOTE: no await in a finally: a pump cancelled while the queue is full must end, not wait for room.
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, work: Callable[[], Any]) -> Any:
    """Run a non-streaming handler's work, cancelling it if the client hangs up: the cancellation closes the
    request streams, which aborts them in the engine and frees their KV blocks at once."""
    task = asyncio.ensure_future(work())

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation run its cleanup (closing the streams aborts them) before answering.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; the status only shows in the access log
    return task.result()


@dataclass
class ChoiceState:
    """A choice's accumulated output (non-streaming) and its counters (streaming)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def usage_dict(log: RequestLog, completion_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens counts the prompt tokens whose KV came from the prefix cache."""
    prompt_tokens = log.prompt_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": log.cached_tokens}}


def now() -> int:
    return int(time.time())


# ---- responses -------------------------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = "data: [DONE]\n\n"


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChunkWriter:
    """Formats the `data: {json}` events of one streamed response, with the usage OpenAI's stream_options ask for:
    `usage: null` on every chunk and a final usage chunk (include_usage), or usage on every chunk (vLLM's
    continuous_usage_stats)."""

    def __init__(self, base: dict[str, Any], req: SamplingFields, log: RequestLog):
        self.base = base
        self.log = log
        self.completion_tokens = 0
        self.usage_each = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        self.usage_last = bool(req.stream_options and req.stream_options.include_usage)

    def event(self, choices: list[dict[str, Any]]) -> str:
        chunk = {**self.base, "choices": choices}
        if self.usage_each:
            chunk["usage"] = usage_dict(self.log, self.completion_tokens)
        elif self.usage_last:
            chunk["usage"] = None
        return f"data: {_compact(chunk)}\n\n"

    def usage_event(self) -> str | None:
        if not (self.usage_last or self.usage_each):
            return None
        chunk = {**self.base, "choices": [], "usage": usage_dict(self.log, self.completion_tokens)}
        return f"data: {_compact(chunk)}\n\n"


def sse_response(ctx: ServingContext, events: AsyncIterator[str], log: RequestLog) -> StreamingResponse:
    """Stream events as SSE, each flushed as soon as it is yielded. An error after the 200 went out becomes an error
    event; `[DONE]` always ends the stream; a client that hangs up cancels the body, which aborts the requests.

    The cancellation only lands where the body waits. Events already queued (generation ended while the client read
    slowly) are taken and written without waiting, so the body also asks `client_gone()` after each event: it stops
    at once, and logs 499 however far it got, rather than formatting the rest for nobody and logging 200."""

    async def body() -> AsyncIterator[str]:
        status = 499  # unless the stream runs to its end: the client hung up
        try:
            try:
                async for event in events:
                    yield event
                    if client_gone():
                        return
                status = 200
            except Exception as exc:  # noqa: BLE001 - the status is sent; the error travels as an event
                ctx.metrics.count_failure("engine_error" if isinstance(exc, EngineDeadError) else "internal")
                err = as_api_error(exc)
                status = err.status
                if status == 500:
                    logger.error("internal error while streaming a response", exc_info=exc)
                yield sse_error(err)
            yield DONE_EVENT
            if client_gone():  # [DONE] never reached the transport: the client did not get the whole stream
                status = 499
        finally:
            await _finish(ctx, log, status)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def json_response(ctx: ServingContext, raw: Request, log: RequestLog, collect: Callable[[], Any]) -> Response:
    """Run a non-streaming handler's collection, aborting the requests if the client hangs up first."""
    status = 500
    try:
        response = await until_disconnected(raw, collect)
        status = response.status_code
        return response
    except BaseException as exc:
        status = as_api_error(exc).status if isinstance(exc, Exception) else 499
        raise
    finally:
        await _finish(ctx, log, status)


async def _finish(ctx: ServingContext, log: RequestLog, status: int) -> None:
    for stream in log.streams:
        await stream.aclose()  # a no-op for a finished request; aborts one still running
    if ctx.config.log_requests:
        log.write(status, ctx.tokenizer)
