"""The server's own view of a run: /metrics scraped before and after, compared with what the client measured.

When the server is attnserve (it exports attnserve_* series), the deltas over the run give server-side TTFT p50
(histogram_quantile over the bucket deltas, as Prometheus computes it) and token totals, a cross-check of the
client's numbers. Any other server (or none at /metrics) just gets no server section.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from clients.prometheus import parse_metrics

PREFIX = "attnserve_"
TTFT_HISTOGRAM = PREFIX + "time_to_first_token_seconds"
PROMPT_TOKENS = PREFIX + "prompt_tokens_total"
GENERATION_TOKENS = PREFIX + "generation_tokens_total"

# sample name -> {labels except `le`, as a sorted tuple -> value}; `le` is kept in the labels of _bucket samples.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels)."""
    return {(name, tuple(sorted(sample.labels.items()))): sample.value
            for name, samples in parse_metrics(text).items() for sample in samples}


def is_attnserve(samples: Samples) -> bool:
    return any(name.startswith(PREFIX) for name, _ in samples)


def delta(before: Samples, after: Samples) -> Samples:
    """after - before for every sample of `after` (a series absent before counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Samples, name: str) -> float:
    """The sum of one sample name over all its label sets (e.g. every model_name)."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def histogram_buckets(samples: Samples, histogram: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one histogram, summed over its label sets, sorted by bound."""
    counts: dict[float, float] = {}
    for (name, labels), value in samples.items():
        if name != histogram + "_bucket":
            continue
        le = dict(labels).get("le")
        if le is not None:
            bound = float(le)
            counts[bound] = counts.get(bound, 0.0) + value
    return sorted(counts.items())


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets, the last one +Inf.

    The rank q * total falls in some bucket; the result interpolates linearly between that bucket's lower and upper
    bounds (the lowest bucket starts at 0 when its bound is positive). A rank in the +Inf bucket answers the highest
    finite bound. None when there are no observations (Prometheus answers NaN).
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return None  # Prometheus needs the +Inf bucket and one more
    observations = buckets[-1][1]
    if observations <= 0:
        return None
    rank = q * observations
    index = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if index == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[index]
    if index == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = buckets[index - 1]
    if count == below:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


def server_summary(before: Samples | None, after: Samples | None) -> dict | None:
    """attnserve's deltas over the run, or None when the scrapes failed or the server is not attnserve."""
    if before is None or after is None or not is_attnserve(after):
        return None
    change = delta(before, after)
    buckets = histogram_buckets(change, TTFT_HISTOGRAM)
    p50 = histogram_quantile(0.5, buckets) if buckets else None
    return {
        "prompt_tokens": int(round(total(change, PROMPT_TOKENS))),
        "generation_tokens": int(round(total(change, GENERATION_TOKENS))),
        "ttft_observations": int(round(buckets[-1][1])) if buckets else 0,
        "ttft_p50_ms": None if p50 is None else p50 * 1000,
    }

