"""Soak (issue 8): 1,500 concurrent requests against a live server on loopback, 30% of them dropped mid-flight, with
preemptions, then exact accounting: every finished request's finish reasons and token counts, parity of the
completions with the offline engine, an idle engine with no KV block in use, metrics equal to the client's counts,
and no RSS growth after the warm-up. See tests/soak.py (also the runner for `make soak DURATION=...`)."""

from __future__ import annotations

from soak import SoakConfig, run_soak


def test_soak_with_disconnects_and_preemption(make_ckpt):
    report = run_soak(SoakConfig(model=make_ckpt("llama"), requests=1500, seed=1234, concurrency=96))
    print(report.summary())
    assert not report.problems, report.summary()
    # The workload did what it is for: cancels (~30%), preemptions, and requests that ran to their end.
    assert report.count("completed") + report.count("cancelled") == 1500
    assert report.count("cancelled") >= 0.25 * 1500
    assert report.metrics["preemptions"] > 0
    assert report.offline_checked["greedy"] >= 20
