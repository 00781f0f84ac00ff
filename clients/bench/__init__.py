"""`attnserve bench`: load tests against any OpenAI-compatible server (`serve`, `sweep`) and the in-process
offline throughput benchmark (`offline`).

Importing this package is cheap on purpose (the `attnserve` command imports it for its flags): httpx, tqdm,
tokenizers, prometheus_client, matplotlib and the engine are imported only by the modules that run a benchmark.
"""


class BenchError(Exception):
    """A problem the user can fix (bad flag combination, unreachable server, bad dataset record): reported as one
    line, without a traceback."""
