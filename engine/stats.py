"""Per-step measurements for metrics: what happened since the last time someone collected them.

The engine only records timestamps and counts (monotonic clock); turning them into Prometheus series is the
server's job. Intervals follow vLLM's definitions: queue = arrival -> first scheduled, prefill = first scheduled ->
first token, decode = first token -> last token, TTFT = arrival -> first token, e2e = arrival -> finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTimes:
    """Monotonic timestamps of one request; a finished request's RequestOutput carries a copy (`metrics`)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class FinishedRequestStats:
    finish_reason: str  # of the request's first sample: "stop", "length" or "abort"
    prompt_tokens: int
    generation_tokens: int  # over all samples
    e2e_s: float
    queue_s: float | None  # None: never scheduled (aborted while waiting)
    prefill_s: float | None  # None: no token was sampled
    decode_s: float | None


@dataclass
class IterationStats:
    step_tokens: list[int] = field(default_factory=list)  # tokens computed in each engine step
    ttfts_s: list[float] = field(default_factory=list)
    itls_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.step_tokens or self.ttfts_s or self.itls_s or self.finished)
