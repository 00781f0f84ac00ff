"""What the engine hands back to callers: one RequestOutput per request, holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.stats import RequestTimes


@dataclass
class TokenLogprob:
    """Logprob of a sampled token, with the top-N alternatives (raw model distribution, before sampling knobs)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (only when logprobs were requested)."""
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass
class RequestOutput:
    """In streaming (delta) mode, text/token_ids/logprobs hold only what is new since the previous output."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestTimes | None = None  # set on the finished output: when it arrived, was scheduled, ...
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # With SamplingParams.prompt_logprobs: token j's logprob given tokens 0..j-1 (entry 0 is None), on the first
    # output that has them (in delta mode only there).
    prompt_logprobs: list[TokenLogprob | None] | None = None
