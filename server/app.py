"""The FastAPI application: routes, middleware and error handlers over one AsyncEngine.

`build_app` has no global state, so tests can run several apps in one process.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.async_engine import AsyncEngine
from engine.errors import ValidationError
from engine.sampling_params import check_token_ids
from server import __version__
from server.chat import create_chat_completion, template_messages, template_tools
from server.completions import create_completion
from server.config import ServerConfig
from server.errors import error_response, install_error_handlers
from server.generation import ServingContext
from server.metrics import Metrics
from server.openapi import install_precise_openapi
from server.middleware import ApiKeyAuth, BodyGuard, HeaderLimit, RequestGate, ServerState
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
# request_failure_total{reason} for a generation request answered with an error status.
_FAILURE_REASONS = {400: "validation", 401: "unauthorized", 404: "not_found", 408: "timeout", 413: "too_large",
                    415: "unsupported_media_type", 429: "overloaded", 431: "headers_too_large", 500: "internal",
                    503: "unavailable"}
# With stream: true the 200 is Server-Sent Events; OpenAPI 3.1's `schema` for text/event-stream describes one event.
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {
        "type": "string", "anyOf": [{"const": "[DONE]"}, {"pattern": "^\\{"}],
        "description": "One JSON chunk per event (the response object with deltas; an error after the 200 comes as "
                       "{\"error\": {...}}), then the literal [DONE] as the last event",
    }},
}}}


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    state = ServerState()
    info = engine.info
    metrics = Metrics(engine, config.served_model_names[0], max_model_len=info.max_model_len, info={
        "version": __version__, "dtype": str(info.dtype).removeprefix("torch."), "device": str(info.device),
        "block_size": str(info.block_size), "num_kv_blocks": str(info.num_kv_blocks),
        "max_model_len": str(info.max_model_len), "architecture": info.architecture,
        "tensor_parallel_size": str(info.tensor_parallel_size), "parallel_layout": info.parallel_layout,
    })
    ctx = ServingContext(engine, config, state, metrics)
    app = FastAPI(title="attnserve", version=__version__,
                  description="OpenAI-compatible completions and chat over the attnserve engine.")
    app.state.ctx = ctx
    install_error_handlers(app)
    known_paths: set[str] = set()

    def on_response(scope, status: int) -> None:
        path = scope["path"]
        route = path if path in known_paths else "other"  # unmatched paths must not grow the label set
        metrics.count_http(route, status)
        # 499 (the client hung up before a non-streamed answer) is not a failure: the engine counts that request as
        # finished with reason "abort", as it does a dropped stream.
        if route in GENERATION_ROUTES and status >= 400 and status != 499:
            metrics.count_failure(_FAILURE_REASONS.get(status, "bad_request"))

    # add_middleware wraps: the last added runs first.
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(HeaderLimit, max_bytes=config.max_header_bytes)
    app.add_middleware(RequestGate, state=state, on_response=on_response, limit_concurrency=config.limit_concurrency,
                       retry_after_s=config.retry_after_s)
    if config.allowed_origins:
        # Outermost, so a browser's preflight (which carries no API key) is answered before auth runs.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    # Error responses are documented by server/openapi.py, which knows which middleware answers on which route.
    @app.post("/v1/completions", response_model=CompletionResponse, responses={200: {"content": _STREAM}})
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: {"content": _STREAM}})
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        root = str(info.model_path)
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=info.max_model_len)
                               for name in config.served_model_names])

    @app.get("/health", response_class=Response, responses={200: {"description": "the engine is alive (no body)"}})
    async def health() -> Response:
        if state.draining:
            return error_response(503, "the server is shutting down")
        if not engine.is_healthy:
            return error_response(503, f"the engine is not running: {engine.dead_reason}")
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ValidationError("give exactly one of prompt or messages", "prompt")
        tokenizer = ctx.tokenizer

        def run() -> list[int]:
            if body.prompt is not None:
                return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            return tokenizer.encode_chat(template_messages(body.messages), tools=template_tools(body.tools),
                                         add_generation_prompt=body.add_generation_prompt)

        ids = await ctx.off_loop(run)
        strs = [s or "" for s in tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids,
                                token_strs=strs)

    @app.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def tokenizer_info() -> TokenizerInfoResponse:
        tokenizer = ctx.tokenizer
        special = tokenizer.special_tokens
        return TokenizerInfoResponse(
            tokenizer_class=tokenizer.tokenizer_class, bos_token=special.get("bos_token"),
            eos_token=special.get("eos_token"), pad_token=special.get("pad_token"),
            unk_token=special.get("unk_token"), chat_template=tokenizer.chat_template,
            model_max_length=tokenizer.model_max_length or info.max_model_len, vocab_size=tokenizer.vocab_size)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        check_token_ids("tokens", body.tokens, info.vocab_size)
        text = await ctx.off_loop(ctx.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return DetokenizeResponse(prompt=text)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition of the attnserve_* series."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"name": "attnserve", "version": __version__, "models": list(config.served_model_names)})

    known_paths.update(route.path for route in app.routes)
    install_precise_openapi(app, served_model_names=config.served_model_names, vocab_size=info.vocab_size,
                            max_model_len=info.max_model_len, api_key=config.api_key is not None)
    return app
