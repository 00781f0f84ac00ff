"""When requests are sent: gaps between arrivals drawn from a Gamma distribution, as vLLM's benchmark does.

Shape k = burstiness and scale = 1 / (rate * k) keep the mean gap at 1/rate for every k, while the coefficient
of variation is 1/sqrt(k): k = 1 is a Poisson process (exponential gaps), k < 1 clusters arrivals into bursts,
k > 1 spaces them more evenly. An infinite rate sends everything at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def arrival_gaps(rate: float, burstiness: float = 1.0, seed: int | random.Random = 0) -> Iterator[float]:
    """An endless stream of gaps in seconds between consecutive requests (the first request goes at time 0)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Offsets from the start of the run of the first n arrivals: 0, then the running sum of the gaps."""
    times, t = [], 0.0
    gaps = arrival_gaps(rate, burstiness, seed)
    for _ in range(n):
        times.append(t)
        t += next(gaps)
    return times
