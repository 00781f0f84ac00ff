"""Fault injection into the model forward, for tests of the failure paths. Off unless a spec is given.

A spec says which forward call (counting from 1, after start-up) goes wrong and how:

    raise@N      the N-th forward raises, as a crashed kernel or an out-of-memory error would
    stall@N:S    the N-th forward sleeps S seconds before running, as a hung device would

The server reads it from $ATTNSERVE_TEST_FAULT. It lives in the engine, not in a test file, because the tests
that need it drive a real server process.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

import torch

FAULT_ENV = "ATTNSERVE_TEST_FAULT"
_SPEC = re.compile(r"(raise)@(\d+)|(stall)@(\d+):(\d+(?:\.\d+)?)")


class InjectedFault(RuntimeError):
    """The error a `raise@N` fault raises."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str  # "raise" | "stall"
    at_call: int
    stall_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        match = _SPEC.fullmatch(text.strip())
        if match is None or int(match.group(2) or match.group(4)) < 1:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected raise@N or stall@N:SECONDS with N >= 1")
        if match.group(1):
            return cls("raise", int(match.group(2)))
        return cls("stall", int(match.group(4)), float(match.group(5)))


def inject_fault(model: torch.nn.Module, spec: FaultSpec) -> None:
    """Wrap `model.forward` so that its `spec.at_call`-th call fails as the spec says; other calls run unchanged."""
    forward = model.forward
    calls = 0
    lock = threading.Lock()

    def faulty_forward(*args, **kwargs):
        nonlocal calls
        with lock:
            calls += 1
            hit = calls == spec.at_call
        if hit and spec.kind == "raise":
            raise InjectedFault(f"injected fault in model forward call {calls} (test hook {FAULT_ENV})")
        if hit:
            time.sleep(spec.stall_s)
        return forward(*args, **kwargs)

    model.forward = faulty_forward
