"""The shared-memory all-reduce of tensor-parallel ranks on one CPU node (engine/shm_allreduce.py), with two ranks
played by two threads of this process: sums are exact against torch's, bit-identical on both ranks, across both slot
sets; and a peer that never arrives ends the wait with the check's error instead of a hang."""

from __future__ import annotations

import threading

import pytest
import torch

from engine import shm_allreduce
from engine.shm_allreduce import SharedAllReduce

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(), reason="needs /dev/shm and an x86 CPU (its store order)")


@pytest.fixture
def pair(tmp_path):
    path = tmp_path / "segment"  # any file works; /dev/shm keeps it in memory
    first = SharedAllReduce(path, 0, 2, create=True)
    second = SharedAllReduce(path, 1, 2, create=False)
    yield first, second
    first.close()
    second.close()


def _run_both(pair, inputs):
    results = [[], []]

    def rank(r):
        for x in inputs[r]:
            results[r].append(pair[r].all_reduce(x, lambda: None))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "an all-reduce never completed"
    return results


def test_sums_are_exact_and_identical_on_both_ranks(pair):
    torch.manual_seed(0)
    shapes = [(32, 512), (1, 64), (7, 3, 5), (2048, 8)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    inputs = [[], []]
    for i in range(12):  # both parities, many times over
        shape, dtype = shapes[i % len(shapes)], dtypes[i % len(dtypes)]
        for r in (0, 1):
            inputs[r].append(torch.randn(shape).to(dtype))
    mine, theirs = _run_both(pair, inputs)
    for a, b, x0, x1 in zip(mine, theirs, *inputs):
        assert torch.equal(a, b)  # bit-identical on every rank
        assert a.dtype == x0.dtype and a.shape == x0.shape
        assert torch.equal(a, x0 + x1)  # rank 0's values plus rank 1's, as torch adds them
        assert a.data_ptr() != x0.data_ptr()


def test_larger_tensors_do_not_fit_a_slot(pair):
    rows = shm_allreduce.SLOT_BYTES // (4 * 1024)
    assert pair[0].fits(torch.empty(rows, 1024))
    assert not pair[0].fits(torch.empty(rows + 1, 1024))


def test_a_peer_that_never_arrives_ends_the_wait_with_the_checks_error(pair, monkeypatch):
    monkeypatch.setattr(shm_allreduce, "CHECK_S", 0.001)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker rank 1 exited")

    with pytest.raises(RuntimeError, match="worker rank 1 exited"):
        pair[0].all_reduce(torch.ones(4), check)
