"""Continuous batching: which sequences run this step, with how many tokens each.

Every step spends a token budget (max_num_batched_tokens) over at most max_num_seqs sequences:
running decodes first (one token each, they keep latency low), then running prefills that were
chunked, then waiting sequences in arrival order. A prompt longer than what is left of the budget
is split into chunks over several steps. When the KV pool runs dry, the most recently admitted
running sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache import BlockPool, blocks_for
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    # (sequence, tokens to compute this step), decodes first. A sequence samples a token this step
    # exactly when its scheduled tokens reach the end of its known tokens.
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, pool: BlockPool):
        self.config = config
        self.block_size = block_size
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        planned: dict[int, int] = {}  # seq_id -> tokens, to undo if the sequence is preempted later this step

        # Decodes (one new token) before chunked prefills; each group keeps admission order.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n, out, planned):
                continue
            planned[seq.seq_id] = n
            budget -= n
        # Refunds from sequences preempted after they were planned.
        budget = self.config.max_num_batched_tokens - sum(planned.values())

        # NOTE: no admissions in a step that had to preempt: the pool is already short.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            needed = blocks_for(seq.num_computed_tokens + n, self.block_size) - len(seq.block_ids)
            if needed > self.pool.num_free:
                break  # FCFS: later arrivals never jump ahead of the head of the queue
            seq.block_ids.extend(self.pool.allocate(needed))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned[seq.seq_id] = n
            budget -= n

        by_id = {s.seq_id: s for s in self.running}
        decodes = [(by_id[i], n) for i, n in planned.items() if n == 1]
        prefills = [(by_id[i], n) for i, n in planned.items() if n > 1]
        out.scheduled = decodes + prefills
        return out

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput, planned: dict[int, int]) -> bool:
        """Make room for n more tokens of seq, preempting the newest running sequences as needed.
        Returns False if seq itself had to be preempted."""
        needed = blocks_for(seq.num_computed_tokens + n, self.block_size) - len(seq.block_ids)
        while needed > self.pool.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            planned.pop(victim.seq_id, None)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_ids.extend(self.pool.allocate(needed))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Recompute-preemption: drop the sequence's KV and send it to the front of the queue."""
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence, wherever it is, and return its blocks to the pool."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.pool.free(seq.block_ids)
            seq.block_ids = []
        elif seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
