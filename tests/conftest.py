"""Shared fixtures. Checkpoints are built once per test session and kind, on first use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return `kind -> checkpoint directory`; see checkpoints.KINDS."""
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in built:
            built[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return make
