"""Scheduler decisions: token budget, decode-first, chunked prefill, preemption, FCFS, and applying a step's result."""

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache import BlockPool
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make_seq(prompt_len: int, name: str = "r") -> Sequence:
    return Sequence(next(_ids), name, 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8), 8)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256,
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, block_size, BlockPool(num_blocks))


def run_step(sched: Scheduler, sample_token: int = 7):
    """Schedule, then apply the step's result through the scheduler's own update_from_output, as the engine does:
    every sampling sequence gets `sample_token`."""
    out = sched.schedule()
    sched.update_from_output(out, [sample_token] * sum(out.samples))
    return out


def test_prefill_then_decode_and_blocks_match_tokens():
    s = make_scheduler()
    seq = make_seq(10)
    s.add(seq)
    out = run_step(s)
    assert out.scheduled == [(seq, 10)]
    assert len(seq.block_ids) == 3  # ceil(10 / 4)
    out = run_step(s)
    assert out.scheduled == [(seq, 1)]  # a decode: one token (the sampled one)
    assert seq.num_computed_tokens == 11 and len(seq.block_ids) == 3


def test_chunked_prefill_splits_long_prompt_over_budget():
    s = make_scheduler(budget=8)
    seq = make_seq(20)
    s.add(seq)
    chunks = [run_step(s).scheduled[0][1] for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert seq.num_output_tokens == 1  # only the last chunk samples


def test_without_chunking_prompt_waits_for_full_budget():
    s = make_scheduler(budget=8, chunked=False)
    s.add(make_seq(6))
    s.add(make_seq(6))
    out = s.schedule()
    assert [n for _, n in out.scheduled] == [6]  # the second does not fit in what is left


def test_decodes_scheduled_before_prefills_and_budget_respected():
    s = make_scheduler(budget=10)
    a, b = make_seq(4, "a"), make_seq(4, "b")
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled (8 tokens)
    c = make_seq(30, "c")
    s.add(c)
    out = run_step(s)
    assert [(q.request_id, n) for q, n in out.scheduled] == [("a", 1), ("b", 1), ("c", 8)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_seqs=2, budget=100)
    seqs = [make_seq(3, str(i)) for i in range(4)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [q.request_id for q, _ in out.scheduled] == ["0", "1"]
    assert len(s.waiting) == 2


def test_preempts_most_recent_when_pool_runs_out():
    # 4 blocks of 4 tokens; two sequences of 8 tokens fill the pool exactly.
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    old, new = make_seq(8, "old"), make_seq(8, "new")
    s.add(old)
    s.add(new)
    run_step(s)
    assert s.pool.num_free == 0
    out = run_step(s)  # both need a 3rd block for their 9th token: the newest is preempted
    assert [q.request_id for q in out.preempted] == ["new"]
    assert [(q.request_id, n) for q, n in out.scheduled] == [("old", 1)]
    assert new.status is SequenceStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert s.waiting[0] is new and s.num_preemptions == 1
    # It is recomputed (prompt + its sampled token) once blocks are free again.
    s.finish(old)
    out = run_step(s)
    assert out.scheduled == [(new, 9)]


def test_fcfs_head_of_queue_is_not_starved():
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    running = make_seq(16, "running")  # takes 4 blocks
    s.add(running)
    run_step(s)
    big = make_seq(12, "big")  # needs 3 blocks, only 2 free
    small = make_seq(4, "small")  # would fit in 1 block
    s.add(big)
    s.add(small)
    out = s.schedule()
    assert [q.request_id for q, _ in out.scheduled] == ["running"]  # small may not jump ahead of big
    assert list(s.waiting) == [big, small]


def test_finish_frees_blocks_wherever_the_sequence_is():
    s = make_scheduler(num_blocks=8)
    a, b = make_seq(8, "a"), make_seq(8, "b")
    s.add(a)
    run_step(s)
    s.add(b)
    s.finish(a)
    s.finish(b)  # still waiting
    assert s.pool.num_free == 8 and not s.has_unfinished()
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED


def test_update_from_output_finishes_by_tokens_and_frees_the_blocks():
    """The scheduler alone decides token-based finishes: eos only after min_tokens, a stop token id (reported as
    the stop reason), and max_tokens; a finished sequence leaves the batch with its blocks back in the pool."""
    s = make_scheduler(num_blocks=16)
    free = s.pool.num_free
    eos = Sequence(next(_ids), "eos", 0, [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=2, eos_token_ids=frozenset({9})), 8)
    stop = Sequence(next(_ids), "stop", 0, [1, 2, 3], SamplingParams(max_tokens=8, stop_token_ids=[5]), 8)
    length = Sequence(next(_ids), "length", 0, [1, 2, 3], SamplingParams(max_tokens=2), 2)
    for seq in (eos, stop, length):
        s.add(seq)
    out = s.schedule()
    assert s.update_from_output(out, [9, 4, 4]) == [eos, stop, length]
    assert [seq.finish_reason for seq in (eos, stop, length)] == [None, None, None]  # eos before min_tokens
    out = s.schedule()
    s.update_from_output(out, [9, 5, 4])
    assert [(seq.finish_reason, seq.stop_reason) for seq in (eos, stop, length)] == \
        [("stop", None), ("stop", 5), ("length", None)]
    assert all(seq.is_finished and not seq.block_ids for seq in (eos, stop, length))
    assert not s.has_unfinished() and s.pool.num_free == free
    assert eos.output_token_ids == [9, 9] and stop.output_token_ids == [4, 5]


def test_update_from_output_refuses_a_token_count_that_does_not_match_the_step():
    s = make_scheduler()
    s.add(make_seq(5))
    out = s.schedule()
    with pytest.raises(AssertionError):
        s.update_from_output(out, [])
