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
from server import __version__
from server.chat import create_chat_completion
from server.completions import create_completion
from server.config import ServerConfig
from server.errors import error_response, install_error_handlers
from server.generation import ServingContext
from server.metrics import Metrics
from server.middleware import ApiKeyAuth, BodyGuard, HeaderLimit, RequestGate, ServerState
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 503)}
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
# request_failure_total{reason} for a generation request answered with an error status.
_FAILURE_REASONS = {400: "validation", 401: "unauthorized", 404: "not_found", 408: "timeout", 413: "too_large",
                    429: "overloaded", 431: "headers_too_large", 500: "internal", 503: "unavailable"}
_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "`data: {json}` chunks, then "
                                                                              "`data: [DONE]`"}}}


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    state = ServerState()
    model_config = engine.engine.config
    metrics = Metrics(engine, config.served_model_names[0], max_model_len=engine.engine.max_model_len, info={
        "version": __version__, "dtype": str(model_config.dtype).removeprefix("torch."),
        "device": str(model_config.device), "block_size": str(model_config.cache.block_size),
        "num_kv_blocks": str(engine.engine.pool.num_blocks), "max_model_len": str(engine.engine.max_model_len),
        "architecture": model_config.model.architecture,
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
        if route in GENERATION_ROUTES and status >= 400:
            metrics.count_failure(_FAILURE_REASONS.get(status, "bad_request"))

    # add_middleware wraps: the last added runs first.
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(HeaderLimit, max_bytes=config.max_header_bytes)
    app.add_middleware(RequestGate, state=state, on_response=on_response)
    if config.allowed_origins:
        # Outermost, so a browser's preflight (which carries no API key) is answered before auth runs.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        root = str(engine.engine.config.model.path)
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=engine.engine.max_model_len)
                               for name in config.served_model_names])

    @app.get("/health", responses={200: {"description": "the engine is alive"}, 503: {"model": ErrorResponse}})
    async def health() -> Response:
        if state.draining:
            return error_response(503, "the server is shutting down")
        if not engine.is_healthy:
            return error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ValidationError("give exactly one of prompt or messages", "prompt")
        tokenizer = ctx.tokenizer

        def run() -> list[int]:
            if body.prompt is not None:
                return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            return tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)

        ids = await ctx.off_loop(run)
        strs = [s or "" for s in tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.engine.max_model_len, tokens=ids,
                                token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        vocab = engine.engine.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValidationError(f"tokens has id {bad}, but the vocabulary has ids 0..{vocab - 1}", "tokens")
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
    return app
