"""`attnserve bench serve|sweep`: load tests against any OpenAI-compatible server, over HTTP only (the in-process
`bench offline` is benchmarks/offline.py).

Importing this package is cheap on purpose (the `attnserve` command imports it for its flags): httpx, tqdm,
tokenizers, jinja2, prometheus_client and matplotlib are imported only by the modules that run a benchmark.
"""


class BenchError(Exception):
    """A problem the user can fix (bad flag combination, unreachable server, bad dataset record): reported as one
    line, without a traceback."""
