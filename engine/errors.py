"""Typed errors. The server maps these onto HTTP status codes, so each says what was wrong and what is allowed."""

from __future__ import annotations


class AttnServeError(Exception):
    """Base class of every error the engine raises on purpose."""


class ValidationError(AttnServeError, ValueError):
    """A request value is outside its allowed range. `param` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(AttnServeError):
    """A model directory is missing a file, holds a corrupt one, or describes something we cannot run."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture this engine does not implement."""


class EngineDeadError(AttnServeError):
    """The engine loop stopped; no further request can be served."""
