"""attnserve HTTP server: the OpenAI-compatible API over the engine (`attnserve serve`, `python -m server`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
