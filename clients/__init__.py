"""attnserve clients: the Python SDK (`Client`, `AsyncClient`) and the load-testing tools (`clients.bench`). They
talk to the server over HTTP only, so they work against any OpenAI-compatible server."""

from clients.async_client import AsyncClient, AsyncStream
from clients.client import Client, Stream
from clients.errors import (
    APIConnectionError,
    APIStatusError,
    AttnServeError,
    BadRequest,
    InternalServerError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RequestTooLarge,
    ServerUnavailable,
    StreamError,
    Timeout,
    Unauthorized,
    UnprocessableEntity,
)
from clients.prometheus import Metrics, Sample

__all__ = [
    "APIConnectionError", "APIStatusError", "AsyncClient", "AsyncStream", "AttnServeError", "BadRequest", "Client",
    "InternalServerError", "Metrics", "NotFound", "Overloaded", "PermissionDenied", "RequestTooLarge", "Sample",
    "ServerUnavailable", "Stream", "StreamError", "Timeout", "Unauthorized", "UnprocessableEntity",
]
