"""Per-request records and the summary computed from them: latency percentiles, throughput, goodput, failures.

Every latency comes from client timestamps (time.perf_counter) around the streamed response, so it includes the
network and the server's HTTP layer, which the server's own histograms do not see. Pure arithmetic, no numpy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
STAT_KEYS = ("mean", "median", "p90", "p99", "max")


@dataclass
class RequestRecord:
    """One measured request. Times are milliseconds, except start_s (seconds since the run started)."""

    index: int
    start_s: float = 0.0
    expected_prompt_len: int | None = None  # what the dataset built (random: exact); None when unknown
    max_tokens: int = 0
    prompt_len: int | None = None  # from the usage chunk: what the server counted
    output_len: int | None = None  # from the usage chunk, not from counting chunks (a chunk may hold several)
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    e2el_ms: float | None = None
    success: bool = False
    error: str | None = None  # the failure kind: http_429, connection_error, timeout, stream_error, ...
    error_detail: str | None = None

    @property
    def tpot_ms(self) -> float | None:
        return tpot_ms(self.e2el_ms, self.ttft_ms, self.output_len)

    def to_json(self) -> dict:
        return {**asdict(self), "tpot_ms": self.tpot_ms}


def tpot_ms(e2el_ms: float | None, ttft_ms: float | None, output_len: int | None) -> float | None:
    """Time per output token after the first: (E2EL - TTFT) / (output tokens - 1); undefined for one token."""
    if e2el_ms is None or ttft_ms is None or output_len is None or output_len < 2:
        return None
    return (e2el_ms - ttft_ms) / (output_len - 1)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between the closest ranks (numpy's default method), so the
    numbers match vLLM's benchmark, which uses np.percentile."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"p must be in [0, 100], got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 and max; all None when there are no values (e.g. every request failed)."""
    if not values:
        return {key: None for key in STAT_KEYS}
    return {"mean": math.fsum(values) / len(values), "median": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values)}


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A successful request within every given objective. A one-token output has no TPOT and so meets any TPOT
    objective (vLLM counts its TPOT as 0)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft_ms, "tpot": record.tpot_ms or 0.0, "e2el": record.e2el_ms}
    return all(values[key] is not None and values[key] <= limit for key, limit in slos_ms.items())


def goodput(records: Iterable[RequestRecord], slos_ms: dict[str, float], duration_s: float) -> tuple[int, float]:
    """(requests meeting all SLOs, those per second of the run)."""
    good = sum(1 for r in records if meets_slos(r, slos_ms))
    return good, good / duration_s if duration_s > 0 else 0.0


def summarize(records: Sequence[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None) -> dict:
    """The run's summary. Token totals and throughputs count successful requests only (a failed request's usage
    is unknown), as vLLM's benchmark does."""
    ok = [r for r in records if r.success]
    failures = Counter(r.error or "unknown" for r in records if not r.success)
    input_tokens = sum(r.prompt_len or 0 for r in ok)
    output_tokens = sum(r.output_len or 0 for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    series = {
        "ttft": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "tpot": [t for r in ok if (t := r.tpot_ms) is not None],
        "itl": [gap for r in ok for gap in r.itl_ms],
        "e2el": [r.e2el_ms for r in ok if r.e2el_ms is not None],
    }
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(sorted(failures.items())),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        **{f"{name}_ms": describe(values) for name, values in series.items()},
        "goodput": None,
    }
    if slos_ms:
        good, rate = goodput(records, slos_ms, duration_s)
        summary["goodput"] = {"slos_ms": dict(slos_ms), "good_requests": good, "request_goodput": rate}
    return summary
