"""Timing calls on the device, a time budget for the whole run, and the device's copy bandwidth.

On CUDA each call is bracketed by its own pair of events, after the L2 cache was overwritten: a small
batch's K/V (1 x 512 tokens of an 8-head, 128-dim layer is 2 MiB) fits in an H200's 50 MiB L2, and timing
repeated calls back to back would measure L2, not HBM. The median over repeats discards launch hiccups.
On the CPU there are no events: perf_counter around each call, no flush.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

_FLUSH_BYTES = 256 << 20  # several times any current L2


class Timer:
    def __init__(self, device: torch.device, max_reps: int, warmup: int, target_s: float):
        """max_reps / warmup: calls per measurement; target_s: stop adding repeats once they would take longer
        (a slow point still gets at least 3 timed calls)."""
        self.device = device
        self.max_reps = max_reps
        self.warmup = warmup
        self.target_s = target_s
        self._flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def median_s(self, fn: Callable[[], object]) -> float:
        """Median seconds per call of fn."""
        for _ in range(self.warmup):
            fn()
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        estimate = max(time.perf_counter() - start, 1e-7)
        reps = max(3, min(self.max_reps, int(self.target_s / estimate)))
        return statistics.median(self._events(fn, reps) if self._flush is not None else self._wall(fn, reps))

    def _events(self, fn: Callable[[], object], reps: int) -> list[float]:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in pairs:
            self._flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [begin.elapsed_time(end) / 1e3 for begin, end in pairs]

    def _wall(self, fn: Callable[[], object], reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes per second of one large device-to-device copy, counting the read and the write: the practical
    ceiling of a kernel that streams memory (HBM on a GPU)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    seconds = timer.median_s(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


class Deadline:
    """The run's time budget: parts ask before each measurement point and skip the rest once it is spent, so
    an unattended run ends (and writes what it has) inside its wall-clock limit."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0
