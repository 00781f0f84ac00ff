"""Shared fixtures. Checkpoints are built once per test session and kind, on first use.

Engines run eagerly by default here (ATTNSERVE_ENFORCE_EAGER=1, inherited by the servers the tests start): the suite
builds hundreds of short-lived engines and compiling each would take several seconds. The compiled path has its own
tests (tests/test_compiled.py), which ask for it with enforce_eager=False.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoints import make_checkpoint

os.environ.setdefault("ATTNSERVE_ENFORCE_EAGER", "1")


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return `kind -> checkpoint directory`; see checkpoints.KINDS."""
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in built:
            built[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return make
