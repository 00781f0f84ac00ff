"""`python tests/faulty_server.py SPEC [server flags]`: the real server, with a fault injected into its model forward.

For tests of the failure paths (tests/test_server_lifecycle.py): production code carries no hook for it. SPEC says
which forward call (counting from 1, after start-up) goes wrong and how:

    raise@N      the N-th forward raises, as a crashed kernel or an out-of-memory error would
    stall@N:S    the N-th forward sleeps S seconds before running, as a hung device would
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
            raise ValueError(f"fault {text!r}: expected raise@N or stall@N:SECONDS with N >= 1")
        if match.group(1):
            return cls("raise", int(match.group(2)))
        return cls("stall", int(match.group(4)), float(match.group(5)))


def inject_fault(model, spec: FaultSpec) -> None:
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
            raise InjectedFault(f"injected fault in model forward call {calls} (tests/faulty_server.py)")
        if hit:
            time.sleep(spec.stall_s)
        return forward(*args, **kwargs)

    model.forward = faulty_forward


def main() -> int:
    spec = FaultSpec.parse(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages, as -m would
    from engine.llm_engine import LLMEngine
    from server.cli import serve_main

    load = LLMEngine.__init__

    def load_then_inject(self, config):  # after start-up, so that N counts serving forwards only
        load(self, config)
        inject_fault(self.core.runner.model, spec)

    LLMEngine.__init__ = load_then_inject
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    return serve_main(prog="tests/faulty_server.py")


if __name__ == "__main__":
    sys.exit(main())
