"""Scheduler decisions: token budget, decode-first, chunked prefill, preemption, the fcfs / fair / priority policies,
pausing, and applying a step's result."""

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache import BlockPool
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make_seq(prompt_len: int, name: str = "r") -> Sequence:
    return Sequence(next(_ids), name, 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8), 8)


def make_request(name: str, n: int, prompt_len: int = 4, priority: int = 0, group: str | None = None) -> list[Sequence]:
    """The n samples of one request, as EngineCore.add makes them: consecutive ids, one arrival."""
    first = next(_ids)
    ids = [first] + [next(_ids) for _ in range(n - 1)]
    return [Sequence(i, name, k, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=64), 64,
                     priority=priority, arrival=first, group=group) for k, i in enumerate(ids)]


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True, policy="fcfs") -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256,
                          enable_chunked_prefill=chunked, policy=policy)
    return Scheduler(cfg, block_size, BlockPool(num_blocks))


def running_per_request(s: Scheduler) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seq in s.running:
        counts[seq.request_id] = counts.get(seq.request_id, 0) + 1
    return counts


def run_step(sched: Scheduler, sample_token: int = 7):
    """Schedule, then apply the step's result through the scheduler's own update_from_output, as the engine does:
    every sampling sequence gets `sample_token`."""
    out = sched.schedule()
    sched.update_from_output(out, [[sample_token]] * sum(out.samples))
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
    assert [seq for seq, _ in s.update_from_output(out, [[9], [4], [4]])] == [eos, stop, length]
    assert [seq.finish_reason for seq in (eos, stop, length)] == [None, None, None]  # eos before min_tokens
    out = s.schedule()
    s.update_from_output(out, [[9], [5], [4]])
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


# ---- policies -------------------------------------------------------------------------------------------------


def test_fcfs_lets_one_big_request_hold_every_slot():
    """The behaviour the fair policy exists to change: under fcfs a later request waits for a free slot."""
    s = make_scheduler(max_seqs=8, budget=64, policy="fcfs")
    for seq in make_request("big", 16):
        s.add(seq)
    run_step(s)
    (short,) = make_request("short", 1)
    s.add(short)
    out = run_step(s)
    assert running_per_request(s) == {"big": 8} and not out.preempted and short in s.waiting


def test_fair_admits_a_later_request_beside_one_that_holds_every_slot():
    s = make_scheduler(max_seqs=8, budget=64, policy="fair")
    big = make_request("big", 16)
    for seq in big:
        s.add(seq)
    run_step(s)
    assert running_per_request(s) == {"big": 8}
    (short,) = make_request("short", 1)
    s.add(short)
    out = run_step(s)
    # The newest of big's running samples gives way, and goes back to the head of big's queue.
    assert out.preempted == [big[7]] and out.admitted == [short]
    assert running_per_request(s) == {"big": 7, "short": 1}
    assert s.waiting[0] is big[7] and big[7].num_computed_tokens == 0 and not big[7].block_ids
    # Once short is running nothing swings back: big's waiting samples have more running than short.
    out = run_step(s)
    assert not out.preempted and running_per_request(s) == {"big": 7, "short": 1}


def test_fair_shares_the_slots_equally_and_a_group_counts_as_one():
    s = make_scheduler(max_seqs=8, budget=64, num_blocks=128, policy="fair")
    for seq in make_request("a", 16):
        s.add(seq)
    run_step(s)
    # Two prompts of one HTTP request (one group) arrive: together they get the share of one request.
    for name in ("b0", "b1"):
        for seq in make_request(name, 8, group="b"):
            s.add(seq)
    run_step(s)
    counts = running_per_request(s)
    assert counts["a"] == 4 and counts.get("b0", 0) + counts.get("b1", 0) == 4
    assert s.num_preemptions == 4
    run_step(s)
    assert s.num_preemptions == 4  # balanced: no more preemptions


def test_fair_admission_without_preemption_goes_to_the_request_with_the_fewest_running():
    s = make_scheduler(max_seqs=8, budget=64, policy="fair")
    a = make_request("a", 8)
    b = make_request("b", 8)
    for seq in a + b:
        s.add(seq)
    out = run_step(s)
    # Round robin from an empty batch: a and b alternate, a first (it arrived first).
    assert [seq.request_id for seq in out.admitted] == ["a", "b"] * 4


def test_priority_admits_lower_values_first_and_preempts_only_for_strictly_higher_priority():
    s = make_scheduler(max_seqs=4, budget=64, policy="priority")
    low = make_request("low", 4, priority=5)
    for seq in low:
        s.add(seq)
    run_step(s)
    (same,) = make_request("same", 1, priority=5)
    s.add(same)
    out = run_step(s)
    assert not out.preempted and same in s.waiting  # equal priority waits its turn
    (urgent,) = make_request("urgent", 1, priority=-1)
    s.add(urgent)
    out = run_step(s)
    assert out.preempted == [low[3]] and out.admitted == [urgent]
    # The waiting order: urgent ran; then low's preempted sample (same priority as `same`, earlier arrival).
    assert s.waiting == [low[3], same]


def test_priority_victim_of_a_full_pool_is_the_lowest_priority_not_the_newest():
    # Two 8-token sequences fill 4 blocks; both need a third block for their 9th token.
    s = make_scheduler(num_blocks=4, block_size=4, budget=64, policy="priority")
    (important,) = make_request("important", 1, prompt_len=8, priority=0)
    (background,) = make_request("background", 1, prompt_len=8, priority=9)
    # The background request arrived first, so under fcfs the important one would be preempted.
    s.add(background)
    s.add(important)
    run_step(s)
    out = run_step(s)
    assert out.preempted == [background] and [q for q, _ in out.scheduled] == [important]


def test_pause_preempts_skips_and_resume_readmits():
    s = make_scheduler(max_seqs=8, budget=64, policy="fair")
    a = make_request("a", 2)
    (b,) = make_request("b", 1)
    for seq in a + [b]:
        s.add(seq)
    run_step(s)
    free_before = s.pool.num_free
    s.pause("a")
    assert all(seq.status is SequenceStatus.WAITING and not seq.block_ids for seq in a)
    assert s.pool.num_free > free_before and s.has_schedulable()
    for _ in range(3):
        out = run_step(s)
        assert [q.request_id for q, _ in out.scheduled] == ["b"]
    s.finish(b)
    assert s.has_unfinished() and not s.has_schedulable()  # only a paused request is left: nothing to step
    assert s.schedule().is_empty
    s.resume("a")
    out = run_step(s)
    assert sorted(out.admitted, key=lambda q: q.index) == a
    assert [seq.num_computed_tokens for seq in a] == [5, 5]  # prompt + the token each had sampled, recomputed
