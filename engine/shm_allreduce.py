"""All-reduce through shared memory, for the tensor-parallel ranks of one CPU node (engine/parallel.py).

Why: gloo over loopback takes about 1.5 ms per all-reduce of 64 KiB on this machine, and 1 ms per point-to-point
exchange, idle (docs/benchmarks.md), while a tensor-parallel step makes two per layer. Ranks on one node can instead
meet in a shared memory segment: each copies its tensor into its own slot, publishes the call's sequence number,
waits until every rank has published, and sums the slots in rank order. Every rank adds the same values in the same
order, so every rank gets the bit-identical result, as gloo's all-reduce gives.

Two sets of slots alternate by call parity: a rank writes call s + 1 into the other set while a slower rank may
still be reading call s, and it cannot get to call s + 2 (this set again) before every rank has published s + 1,
which each does only after reading s. A published sequence number is an aligned 8-byte store after the data's
stores; x86 (the CPUs this path runs on) keeps stores in order, so a rank that sees the number sees the data.

Waiting spins (a call's peers are normally microseconds apart), yielding the core after a while, and asks
`check` (rank 0: are the local workers alive?) every few milliseconds, so a dead peer ends the wait with its error.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SLOT_BYTES = 4 << 20  # larger tensors go through gloo, where bandwidth, not latency, is the cost
_HEADER = 4096  # the sequence numbers: [2 parities, ranks] int64, one page
_SPINS = 2000  # busy polls before a wait starts yielding the core
CHECK_S = 0.005  # how often a wait on the other ranks checks that they still run (also gloo waits: engine/parallel.py)


def segment_path(port: int) -> Path:
    """The segment of the ranks that rendezvous at `port` (unique on this host while rank 0 lives)."""
    return Path("/dev/shm") / f"attnserve-tp-{port}"


def supported() -> bool:
    return Path("/dev/shm").is_dir() and os.uname().machine in ("x86_64", "AMD64")


class SharedAllReduce:
    def __init__(self, path: Path, rank: int, size: int, create: bool):
        self.rank, self.size = rank, size
        nbytes = _HEADER + 2 * size * SLOT_BYTES
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, nbytes)  # fails now, rather than SIGBUS later, if /dev/shm is too small
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._seq = np.frombuffer(self._map, dtype=np.int64, count=2 * size).reshape(2, size)
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=_HEADER).view(2, size, SLOT_BYTES)
        self._calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= SLOT_BYTES

    def all_reduce(self, x: torch.Tensor, check: Callable[[], None]) -> torch.Tensor:
        """The sum over ranks of x (contiguous, CPU, fitting a slot), as a new tensor."""
        self._calls += 1
        parity, nbytes = self._calls % 2, x.numel() * x.element_size()
        slots = self._slots[parity, :, :nbytes].view(x.dtype).view(self.size, *x.shape)
        slots[self.rank].copy_(x)
        self._seq[parity, self.rank] = self._calls
        self._wait(self._seq[parity], check)
        out = slots[0].clone()
        for r in range(1, self.size):
            out += slots[r]
        return out

    def _wait(self, seq: np.ndarray, check: Callable[[], None]) -> None:
        target, spins, next_check = self._calls, 0, time.monotonic() + CHECK_S
        while int(seq.min()) < target:
            spins += 1
            if spins > _SPINS:
                os.sched_yield()
                if time.monotonic() > next_check:
                    check()
                    next_check = time.monotonic() + CHECK_S

    def close(self) -> None:
        del self._seq, self._slots
        self._map.close()
