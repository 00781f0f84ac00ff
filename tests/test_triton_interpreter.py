"""Runs the Triton kernel and backend tests through the Triton interpreter when this process cannot.

Triton fixes compiled-vs-interpreted when first imported, and collection imports it (torch._dynamo
does) before any test module could set TRITON_INTERPRET. Without a GPU, and unless the whole run was
started with TRITON_INTERPRET=1, those tests skip here and run in a child pytest with it set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITES = ["test_triton_kernels.py", "test_triton_backend.py"]


def test_triton_suites_under_the_interpreter():
    pytest.importorskip("triton")
    from kernels.triton_common import interpreter_enabled

    if interpreter_enabled() or torch.cuda.is_available():
        pytest.skip("the Triton tests run in this process")
    here = Path(__file__).parent
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(here / s) for s in SUITES)],
        cwd=here.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, report
    summary = child.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, report
