"""Continuous batching: which sequences run this step, with how many tokens each.

Every step spends a token budget (max_num_batched_tokens) over at most max_num_seqs sequences:
running decodes first (one token each, they keep latency low), then running prefills that were
chunked, then waiting sequences in the policy's order (fair, fcfs or priority: _admission_key, and
docs/architecture.md). A prompt longer than what is left of the budget is split into chunks over
several steps. When the KV pool runs dry, a running sequence is preempted (the policy's _victim): its
blocks are freed and it is recomputed later. Under fair and priority a waiting sequence may also
preempt one with less claim to run (_victim_for). A paused request (its output unread) is neither
run nor admitted.

With prefix caching, a sequence admitted without KV first takes the longest chain of cached full blocks that
matches its tokens (always leaving at least one token to compute, so its next token gets fresh logits), and
every block it fills is registered for later requests once its K/V are computed (advance()). A sequence that asks
for prompt logprobs reads nothing from the cache until they are all computed (Sequence.needs_prompt_logprobs); it
still registers its blocks for others.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass, field

from engine.block_hash import ROOT, block_key, hash_block
from engine.config import SchedulerConfig
from engine.kv_cache import BlockPool, blocks_for
from engine.outputs import TokenLogprob
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode import PENDING, DraftSlots, NgramProposer
from engine.structured_output import accept_token


@dataclass
class SchedulerOutput:
    # (sequence, tokens to compute this step), decodes first.
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # moved from waiting to running this step
    # samples[i]: scheduled[i] samples a token this step, because its tokens reach the end of its known tokens.
    samples: list[bool] = field(default_factory=list)
    # Speculative decoding: seq_id -> the draft tokens scheduled after its newest token (engine/spec_decode.py). They
    # are part of its count in `scheduled`, and it samples at each of them. A draft model's are PENDING until it has
    # run (EngineCore.step).
    spec_tokens: dict[int, list[int]] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, pool: BlockPool, prefix_caching: bool = False,
                 proposer: NgramProposer | DraftSlots | None = None):
        self.config = config
        self.proposer = proposer  # speculative decoding: drafts for decoding sequences; None: off
        self.block_size = block_size
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.policy = config.policy
        # Waiting sequences, per request (each request's in the order they are to be admitted). Requests are admitted
        # in the order of _admission_key; `waiting` lists them all in that order.
        self._waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []  # admission order: oldest first
        self._num_running: Counter[str] = Counter()  # fairness group -> its running sequences
        self.paused: set[str] = set()  # requests whose output nobody reads: not scheduled until resumed
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found cached

    def add(self, seq: Sequence) -> None:
        self._waiting.setdefault(seq.request_id, deque()).append(seq)

    @property
    def waiting(self) -> list[Sequence]:
        order = sorted(self._waiting, key=lambda r: self._admission_key(self._waiting[r][0]))
        return [seq for request_id in order for seq in self._waiting[request_id]]

    def waiting_request_ids(self) -> set[str]:
        return set(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running)

    def has_schedulable(self) -> bool:
        """Is there anything to step? Paused requests wait for their reader, not for the engine (pause() took their
        sequences out of the batch, and admission skips them)."""
        return bool(self.running) or any(request_id not in self.paused for request_id in self._waiting)

    def pause(self, request_id: str) -> None:
        """Stop scheduling a request (its client is not reading its output): its running sequences are preempted,
        which frees their slots and KV blocks (full blocks stay in the prefix cache for the return)."""
        self.paused.add(request_id)
        for seq in [seq for seq in self.running if seq.request_id == request_id]:
            self.preempt(seq)

    def resume(self, request_id: str) -> None:
        self.paused.discard(request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        planned: dict[int, int] = {}  # seq_id -> tokens, to undo if the sequence is preempted later this step

        # The batch this step may have: the running sequences and every waiting one (a queue fills the batch).
        demand = len(self.running) + sum(len(queue) for queue in self._waiting.values())
        speculate = self.proposer is not None and (self.proposer.max_batch is None or demand <= self.proposer.max_batch)
        # Decodes (one new token) before chunked prefills; each group keeps admission order.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._drafts(seq, budget - n) if speculate and seq.num_tokens - seq.num_computed_tokens == 1 \
                else []
            if not self._reserve(seq, n + len(drafts), out, planned):
                continue
            planned[seq.seq_id] = n + len(drafts)
            if drafts:
                out.spec_tokens[seq.seq_id] = drafts
            budget -= n + len(drafts)
        # Refunds from sequences preempted after they were planned.
        budget = self.config.max_num_batched_tokens - sum(planned.values())
        out.spec_tokens = {seq_id: drafts for seq_id, drafts in out.spec_tokens.items() if seq_id in planned}

        # NOTE: no admissions in a step that had to preempt: the pool is already short.
        if not out.preempted:
            self._admit(out, planned, budget)

        by_id = {s.seq_id: s for s in self.running}
        spec = out.spec_tokens
        decodes = [(by_id[i], n) for i, n in planned.items() if n == 1 or i in spec]
        prefills = [(by_id[i], n) for i, n in planned.items() if n > 1 and i not in spec]
        out.scheduled = decodes + prefills
        # A max_tokens=0 sequence (prompt scoring) never samples: it ends when its prompt is computed.
        out.samples = [seq.num_computed_tokens + n - len(spec.get(seq.seq_id, ())) == seq.num_tokens
                       and seq.max_tokens > 0 for seq, n in out.scheduled]
        return out

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a decoding sequence: no more than the budget left, and fewer than the tokens it may still
        generate (each accepted draft is one of them, and so is the token sampled after the last). With a grammar,
        only the drafts it allows (the first one it refuses could never be accepted)."""
        room = min(seq.max_tokens - seq.num_output_tokens, self.config.max_model_len - seq.num_tokens) - 1
        drafts = self.proposer.propose(seq.token_ids, min(room, budget))
        if drafts and seq.matcher is not None and drafts[0] != PENDING:  # a draft model samples under the grammar
            drafts = drafts[: seq.matcher.validate_tokens(drafts)]
        return drafts

    def _admit(self, out: SchedulerOutput, planned: dict[int, int], budget: int) -> None:
        """Move waiting sequences to running, best admission key first, while slots, blocks and budget last. The
        first that does not fit stops admission (later ones never jump ahead of it, so nothing starves), unless
        the policy lets it preempt a running sequence that has less claim to run (_victim_for)."""
        heap = [(self._admission_key(queue[0]), request_id) for request_id, queue in self._waiting.items()
                if request_id not in self.paused]
        heapq.heapify(heap)
        while heap and budget > 0:
            key, request_id = heap[0]
            queue = self._waiting[request_id]
            seq = queue[0]
            if self._admission_key(seq) != key:  # fair: its group gained a running sequence since the key was taken
                heapq.heapreplace(heap, (self._admission_key(seq), request_id))
                continue
            cached = self._cached_prefix(seq)
            computed = len(cached) * self.block_size
            n = seq.num_tokens - computed
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            needed = blocks_for(computed + n, self.block_size) - len(cached)
            revived = sum(1 for block in cached if self.pool.ref_count(block) == 0)  # they leave the free count
            if needed + revived > self.pool.num_free or len(self.running) >= self.config.max_num_seqs:
                victim = self._victim_for(seq)
                if victim is None:
                    break
                self.preempt(victim)
                out.preempted.append(victim)
                budget += planned.pop(victim.seq_id, 0)
                continue  # the freed blocks may include cached ones of seq's prefix: look again
            self._admit_cached(seq, cached)
            if seq.num_cached_tokens is None:  # first admission (not a return after preemption)
                seq.num_cached_tokens = computed
            seq.block_ids.extend(self.pool.allocate(needed))
            queue.popleft()
            if not queue:
                del self._waiting[request_id]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._num_running[seq.group] += 1
            out.admitted.append(seq)
            planned[seq.seq_id] = n
            budget -= n
            if queue:
                heapq.heapreplace(heap, (self._admission_key(queue[0]), request_id))
            else:
                heapq.heappop(heap)

    # ---- policies: who is admitted first, and who gives way ---------------------------------------------------

    def _admission_key(self, seq: Sequence) -> tuple[int, ...]:
        """fcfs: arrival. priority: the request's priority (lower first), then arrival. fair: the fewest running
        sequences first, so every request holds an equal share of the running slots (max-min fairness), then
        arrival."""
        if self.policy == "priority":
            return seq.priority, seq.arrival
        if self.policy == "fair":
            return self._num_running[seq.group], seq.arrival
        return (seq.arrival,)

    def _victim(self) -> Sequence:
        """The running sequence to preempt when the pool runs dry. fcfs: the newest. priority: the newest of the
        lowest priority. fair: the newest of the request holding the most running sequences."""
        if self.policy == "priority":
            return max(reversed(self.running), key=lambda s: (s.priority, s.arrival))
        if self.policy == "fair":
            return max(reversed(self.running), key=lambda s: self._num_running[s.group])
        return self.running[-1]

    def _victim_for(self, seq: Sequence) -> Sequence | None:
        """A running sequence that a waiting one may preempt to be admitted, or None. fcfs: never. priority: one of
        strictly lower priority. fair: one whose request holds at least two more running sequences than seq's, so
        the shares even out and never swing back."""
        if not self.running or self.policy == "fcfs":
            return None
        victim = self._victim()
        if self.policy == "priority":
            return victim if victim.priority > seq.priority else None
        return victim if self._num_running[victim.group] >= self._num_running[seq.group] + 2 else None

    def update_from_output(self, out: SchedulerOutput, token_ids: list[list[int]],
                           prompt_logprobs: dict[int, list[TokenLogprob]] | None = None,
                           ) -> list[tuple[Sequence, list[int]]]:
        """Apply one step's result; the one place that writes a sequence's per-step state. The scheduled tokens'
        K/V are now cached, and their prompt logprobs (seq_id -> the next ones, for sequences that asked) recorded;
        each sampling sequence (in `out.scheduled` order) takes its tokens (one, or a speculating sequence's accepted
        drafts and the token after them) one at a time, and one that reached EOS, a stop token id, max_tokens,
        max_model_len or the end of its grammar is finished by its tokens there (the rest are dropped). A
        max_tokens=0 sequence whose prompt is now computed ends with "length". Returns each sampling sequence with
        the tokens it took."""
        sampled = [seq for (seq, _), samples in zip(out.scheduled, out.samples) if samples]
        assert len(sampled) == len(token_ids), (len(sampled), len(token_ids))
        for seq, n in out.scheduled:
            if prompt_logprobs and seq.seq_id in prompt_logprobs:
                seq.prompt_logprobs.extend(prompt_logprobs[seq.seq_id])
            if seq.seq_id in out.spec_tokens:
                continue  # how much of it is computed depends on how many drafts it accepts: below
            self.advance(seq, n)
            if seq.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens:
                self.finish(seq, "length")
        taken = []
        for seq, tokens in zip(sampled, token_ids):
            kept = []
            for token in tokens:
                seq.append_token(token)
                kept.append(token)
                reason, stop_reason = self._token_stop(seq, token)
                if reason is None and seq.matcher is not None and accept_token(seq, token):
                    reason = "stop"  # the output is complete: its grammar allows nothing more
                if reason is not None:
                    self.finish(seq, reason, stop_reason)
                    break
            if seq.seq_id in out.spec_tokens and not seq.is_finished:
                # Computed now: its newest token and the accepted drafts, as many as the tokens it took (the last of
                # which is new). The K/V written for rejected drafts lie past them and are overwritten later.
                self.advance(seq, len(tokens))
            taken.append((seq, kept))
        return taken

    def _token_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in p.eos_token_ids:
                return "stop", None
            if p.stop_token_ids and token in p.stop_token_ids:
                return "stop", token
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length", None
        return None, None

    def advance(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq have their K/V in the cache: register the blocks that are now full."""
        seq.num_computed_tokens += n
        # NOTE: the invariants of a running sequence, checked where they are written.
        assert 0 < seq.num_computed_tokens <= seq.num_tokens, seq
        assert seq.num_computed_tokens <= len(seq.block_ids) * self.block_size, seq
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_registered_blocks, full):
            block_hash = self._block_hash(seq, i)
            parent = seq.block_hashes[i - 1] if i else ROOT
            self.pool.register(seq.block_ids[i], block_hash, block_key(parent, self._block_tokens(seq, i),
                                                                       seq.cache_salt))
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    # ---- prefix caching ---------------------------------------------------------------------------

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of full block i, computing (once) those before it too: each hash chains its parent's."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else ROOT
            seq.block_hashes.append(hash_block(parent, self._block_tokens(seq, j), seq.cache_salt))
        return seq.block_hashes[i]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest prefix of seq's tokens, at most all but its last token."""
        if not self.prefix_caching or seq.block_ids or seq.needs_prompt_logprobs:
            return []
        blocks: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            parent = seq.block_hashes[i - 1] if i else ROOT
            block = self.pool.lookup(self._block_hash(seq, i),
                                     block_key(parent, self._block_tokens(seq, i), seq.cache_salt))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _admit_cached(self, seq: Sequence, cached: list[int]) -> None:
        if not self.prefix_caching:
            return
        for block in cached:
            self.pool.acquire(block)
        hits = len(cached) * self.block_size
        seq.block_ids.extend(cached)
        seq.num_computed_tokens, seq.num_registered_blocks = hits, len(cached)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += hits

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput, planned: dict[int, int]) -> bool:
        """Make room for n more tokens of seq, preempting the newest running sequences as needed.
        Returns False if seq itself had to be preempted."""
        needed = blocks_for(seq.num_computed_tokens + n, self.block_size) - len(seq.block_ids)
        while needed > self.pool.num_free:
            victim = self._victim()
            self.preempt(victim)
            out.preempted.append(victim)
            planned.pop(victim.seq_id, None)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_ids.extend(self.pool.allocate(needed))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Recompute-preemption: drop the sequence's KV and send it to the front of its request's queue."""
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self._waiting.setdefault(seq.request_id, deque()).appendleft(seq)

    def finish(self, seq: Sequence, reason: str = "abort", stop_reason: int | str | None = None) -> None:
        """End a sequence for `reason` ("stop", "length" or "abort"), wherever it is, and return its blocks to the
        pool. Finishing a finished sequence only changes its recorded reason (stop strings are the output
        processor's: it aborts the sample through EngineCore.abort, which skips finished ones)."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status is SequenceStatus.WAITING:
            queue = self._waiting[seq.request_id]
            queue.remove(seq)
            if not queue:
                del self._waiting[seq.request_id]
            self.pool.free(seq.block_ids[::-1])
            seq.block_ids = []
        elif seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._num_running[seq.group] -= 1
        if not self._num_running[seq.group]:
            del self._num_running[seq.group]
        # Tail first: if these blocks stay cached, the end of the chain is evicted before its start.
        self.pool.free(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
