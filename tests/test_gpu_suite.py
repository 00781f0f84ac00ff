"""benchmarks/gpu_suite.py off the GPU: --smoke runs every part this machine can, says what it skipped, writes its
JSON and exits 0; a failing correctness check makes it exit 1. Each run is a child process, as on the GPU, so
TRITON_INTERPRET is read at that process's start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


def run_suite(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The smoke shapes are tiny: a second thread only adds barrier waits, which a busy 2-core CI box makes long.
    env["OMP_NUM_THREADS"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_smoke_runs_every_part_and_writes_json(tmp_path):
    out = tmp_path / "suite.json"
    proc = run_suite("--out", str(out))
    report = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    for title in ("## Correctness", "## Decode attention per layer call", "## End-to-end decode step"):
        assert title in proc.stdout, report
    assert proc.stdout.rstrip().splitlines()[-1].startswith("OK")

    data = json.loads(out.read_text())
    assert data["copy_bandwidth_gb_per_s"] > 0
    checks = data["parts"]["correctness"]["checks"]
    assert data["parts"]["correctness"]["passed"] and checks and all(c["passed"] for c in checks)
    points = data["parts"]["attention"]["points"]
    sdpa = [p for p in points if p["variant"] == "sdpa backend"]
    assert len(sdpa) == 2 * 2 * 2 and all(p["status"] == "ok" and p["us"] > 0 and p["gb_per_s"] > 0 for p in sdpa)
    steps = data["parts"]["decode"]["results"]
    assert {(r["model"], r["batch"]) for r in steps} == {(m, b) for m in ("qwen3-0.6b", "llama-3-8b") for b in (1, 4)}
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["roofline_pct"] > 0 for r in steps)
    if not data["env"]["device"].startswith("cuda"):
        # What cannot run here is named, not silently left out.
        assert "Triton checks skipped" in " ".join(data["parts"]["correctness"]["notes"])
        assert "Triton timings skipped" in " ".join(data["parts"]["attention"]["notes"])


def test_a_failing_check_fails_the_run():
    proc = run_suite("--parts", "correctness", "--inject-failure")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "| FAIL" in proc.stdout and "FAIL: a correctness check failed" in proc.stdout


def test_triton_kernels_are_checked_through_the_interpreter():
    pytest.importorskip("triton")
    proc = run_suite("--parts", "correctness", interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for check in ("Triton decode kernel", "Triton extend kernel", "TritonBackend KV write", "TritonBackend vs SDPA"):
        assert check in proc.stdout
    assert "| FAIL" not in proc.stdout


def test_unknown_part_is_refused():
    proc = run_suite("--parts", "correctness,warp-drive")
    assert proc.returncode == 2 and "unknown part(s) warp-drive" in proc.stderr
