"""Server options (the engine's live in engine.engine_args)."""

from __future__ import annotations

from dataclasses import dataclass

# What the built-in demo model is called in requests when --served-model-name does not say.
DEFAULT_MODEL_NAME = "attnserve-demo"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# Above the default waiting queue (1024) plus a full batch (256), so the queue's 429 comes first under normal
# overload; this bound is for what the queue does not count (tokenize calls, bodies still arriving, slow readers).
DEFAULT_LIMIT_CONCURRENCY = 2048
# Tokens one request may ask the engine to generate: prompts x n x max_tokens (256 x 16 x 256 fits).
DEFAULT_MAX_REQUEST_TOKENS = 2**20
# Logprob entries one response may carry: (tokens x (top logprobs + 1)) over its choices, prompt logprobs included,
# generated tokens' only when not streamed. About 25-100 bytes of JSON each: 50-200 MB.
DEFAULT_MAX_RESPONSE_LOGPROBS = 2**21


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_queued_requests: int = 1024  # 0 refuses every request (429): a fault switch for testing clients
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # request line + headers; more gets 431
    body_timeout_s: float = 30.0  # a request body must arrive within this (slow uploads hold a handler)
    shutdown_timeout_s: float = 10.0
    retry_after_s: int = 1  # Retry-After on 429
    log_requests: bool = True  # one log line per finished request
    log_prompts: bool = False  # include the prompt in that line (off: prompts may hold private data)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS; empty: CORS off (no headers)
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY  # HTTP requests in flight; more get 503. None: no limit
    request_head_timeout_s: float = 30.0  # a connection must send a whole request head within this; else closed
    max_connections: int | None = None  # open connections; more are closed at once. None: no limit
    # A connection whose client reads nothing of a response (writing paused) for this long is aborted (499).
    stream_write_timeout_s: float = 60.0
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS  # more is a 400 that says to split the request
    max_response_logprobs: int = DEFAULT_MAX_RESPONSE_LOGPROBS  # more is a 400 that says to stream or split
    # The parser that reads tool calls out of a model's text for tool_choice "auto" (server/tool_parsers.py); None:
    # auto tool choice is off (--enable-auto-tool-choice), and such requests get 400.
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
        if self.max_request_tokens < 1 or self.max_response_logprobs < 1:
            raise ValueError("max_request_tokens and max_response_logprobs must be >= 1")
        if self.request_head_timeout_s <= 0:
            raise ValueError(f"request_head_timeout_s must be > 0, got {self.request_head_timeout_s}")
        if self.stream_write_timeout_s <= 0:
            raise ValueError(f"stream_write_timeout_s must be > 0, got {self.stream_write_timeout_s}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout_s}")
