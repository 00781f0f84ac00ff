"""The engine core: scheduler, KV block pool and model runner (model + sampler). Token ids in, token ids out.

It knows nothing of text: a request arrives as token ids with its SamplingParams, and each step reports, per sample
that advanced, the new token id (and logprob) and a finish reason decided from tokens alone (eos, stop token ids,
max_tokens, max_model_len). A request that asks for prompt logprobs gets them with each sample's first output: every
sample computes them (each prefills its own copy of the prompt anyway), so whichever reports first carries them.
Its interface is plain-data messages, so that it could run in another process: add (a PreparedRequest), abort (a
request id, optionally one sample of it), pause and resume (a request id: backpressure) and the step's
CoreStepOutput. The text side (tokenizing, detokenizing, stop strings, RequestOutputs) is engine/output_processor.py;
LLMEngine joins them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.model_runner import ModelRunner
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec_decode import make_proposer
from engine.structured_output import CompiledGrammar

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A validated request (engine/output_processor.py makes it): the core's add message."""

    request_id: str
    prompt: str | None  # the text, when the prompt came as text (the core reads only the ids)
    prompt_token_ids: list[int]
    params: SamplingParams  # eos_token_ids filled in
    max_tokens: int  # resolved: never None
    arrival_time: float
    cache_salt: str | None = None
    priority: int = 0  # lower runs first, under the priority scheduling policy
    group: str | None = None  # the fair policy's unit (None: this request alone), e.g. one HTTP request's prompts
    # params.structured_outputs compiled (engine/structured_output.py). Not plain data: a core in its own process would
    # compile params.structured_outputs again on its side, from the grammar cache it would then own.
    grammar: CompiledGrammar | None = None


@dataclass
class CoreOutput:
    """One sample's new token in one step; or, for max_tokens=0, the end of its prompt (token_id None)."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None
    logprob: TokenLogprob | None  # when the request asked for logprobs
    finish_reason: str | None  # "stop" (eos, stop token id) | "length"; None while it runs
    stop_reason: int | None  # the stop token id that ended it
    # With the sample's first output, when the request asked for them: one per prompt token, the first None.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class CoreStepOutput:
    outputs: list[CoreOutput] = field(default_factory=list)
    # (request id, sample index, prompt tokens found in the prefix cache) of each sample that started running this
    # step; after a preemption, the same sample again.
    admitted: list[tuple[str, int, int]] = field(default_factory=list)
    scheduled_at: float = 0.0  # time.monotonic() when the batch was formed
    finished_at: float = 0.0  # ... and when its tokens were sampled
    num_batched_tokens: int = 0


@dataclass
class EngineStats:
    num_running: int  # requests with a sequence in the running batch
    num_waiting: int  # requests waiting for their first (or, after preemption, next) schedule
    kv_cache_usage: float
    num_kv_blocks: int
    num_preemptions: int
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    # Speculative decoding (engine/spec_decode.py): sequences that speculated (one per sequence per step), their
    # draft tokens, and the drafts accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        self.config = _cap_max_model_len(config, num_blocks)
        self.runner.allocate_kv_cache(num_blocks, self.config.scheduler.max_model_len)
        self.pool = BlockPool(num_blocks)
        proposer = make_proposer(config.speculative)
        self.scheduler = Scheduler(self.config.scheduler, config.cache.block_size, self.pool,
                                   prefix_caching=config.cache.enable_prefix_caching, proposer=proposer)
        self._seqs: dict[str, list[Sequence]] = {}  # request id -> its samples, until all of them finished
        self._next_seq_id = 0  # samples of a request get consecutive ids; the first is the request's arrival
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0

    def add(self, req: PreparedRequest) -> None:
        first = self._next_seq_id
        seqs = [Sequence(first + index, req.request_id, index, req.prompt_token_ids, req.params, req.max_tokens,
                         req.cache_salt, req.priority, arrival=first, group=req.group,
                         matcher=req.grammar.new_matcher() if req.grammar else None) for index in range(req.params.n)]
        self._next_seq_id += req.params.n
        self._seqs[req.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(req.prompt_token_ids)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """End a request's samples (or only sample `index`) wherever they are and free their blocks. Unknown ids and
        finished samples are ignored: an abort may cross the step that finished them."""
        seqs = self._seqs.get(request_id, [])
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self._forget_if_done(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def has_schedulable(self) -> bool:
        """Is there work a step can do now (not all that is left paused)?"""
        return self.scheduler.has_schedulable()

    def pause(self, request_id: str) -> None:
        """Stop running a request until resume(): its client is not reading its output (backpressure). Its running
        samples are preempted, freeing their slots and KV blocks; they are recomputed when it resumes."""
        if request_id in self._seqs:
            self.scheduler.pause(request_id)

    def resume(self, request_id: str) -> None:
        self.scheduler.resume(request_id)

    def step(self) -> CoreStepOutput:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_schedulable():
                raise RuntimeError("scheduler made no progress with requests pending (pool or budget misconfigured)")
            return CoreStepOutput()
        scheduled_at = time.monotonic()
        draft_probs = None
        if sched.spec_tokens and self.runner.draft is not None:
            draft_probs = self.runner.propose_drafts(sched.scheduled, sched.spec_tokens)
            # A draft model may stop short of its slots (a draft that ends the output): fewer tokens to compute.
            sched.scheduled = [(seq, 1 + len(sched.spec_tokens[seq.seq_id])) if seq.seq_id in sched.spec_tokens
                               else (seq, n) for seq, n in sched.scheduled]
        result = self.runner.execute(sched.scheduled, sched.samples, sched.spec_tokens, draft_probs)
        taken = self.scheduler.update_from_output(sched, result.token_ids, result.prompt_logprobs)
        self._count_speculation(sched.spec_tokens, taken, result.token_ids)
        outputs = []
        for (seq, tokens), logprobs in zip(taken, result.logprobs):
            self.generation_tokens_total += len(tokens)
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1  # a finish belongs to the sample's last token of the step
                outputs.append(CoreOutput(seq.request_id, seq.index, token, logprobs[i],
                                          seq.finish_reason if last else None, seq.stop_reason if last else None,
                                          _first_prompt_logprobs(seq) if i == 0 else None))
        sampled = [seq for seq, _ in taken]
        # max_tokens=0: a sample that did not sample and is finished has had its prompt computed.
        ended = [seq for (seq, _), samples in zip(sched.scheduled, sched.samples) if not samples and seq.is_finished]
        outputs += [CoreOutput(seq.request_id, seq.index, None, None, seq.finish_reason, None,
                               _first_prompt_logprobs(seq)) for seq in ended]
        for request_id in {seq.request_id for seq in sampled + ended if seq.is_finished}:
            self._forget_if_done(request_id)
        admitted = [(seq.request_id, seq.index, seq.num_cached_tokens) for seq in sched.admitted]
        return CoreStepOutput(outputs, admitted, scheduled_at, time.monotonic(), sched.num_batched_tokens)

    def _count_speculation(self, spec_tokens: dict[int, list[int]], taken: list[tuple[Sequence, list[int]]],
                           emitted: list[list[int]]) -> None:
        """vLLM's speculative-decoding counters: drafts proposed (sequences that speculated), their tokens, and the
        tokens accepted (each emitted token but the last is a confirmed draft; a stop may cut the run later)."""
        for (seq, _), tokens in zip(taken, emitted):
            drafts = spec_tokens.get(seq.seq_id)
            if drafts:
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += len(drafts)
                self.spec_num_accepted_tokens += len(tokens) - 1

    def check_workers(self) -> None:
        """Raise if a local tensor-parallel worker has exited or is stopped (engine/parallel.py)."""
        self.runner.check_workers()

    def shutdown(self, kill: bool = False) -> None:
        """Stop the tensor-parallel workers, if any (kill: at once, from any thread; see ModelRunner.shutdown)."""
        self.runner.shutdown(kill)

    def _forget_if_done(self, request_id: str) -> None:
        if all(seq.is_finished for seq in self._seqs.get(request_id, [])):
            self._seqs.pop(request_id, None)
            self.scheduler.resume(request_id)  # forget a pause

    def stats(self) -> EngineStats:
        # Counted in requests, not sequences, like vLLM's gauges: an n=4 request is one request.
        running = {seq.request_id for seq in self.scheduler.running}
        waiting = self.scheduler.waiting_request_ids() - running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=self.pool.usage,
            num_kv_blocks=self.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
        )


def _first_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
    """A sample's prompt logprobs, on its first output only (the one with its first token, or its end when
    max_tokens is 0); by then they are complete."""
    if seq.prompt_logprobs is None or seq.num_output_tokens > 1:
        return None
    assert not seq.needs_prompt_logprobs, seq
    return seq.prompt_logprobs


def _cap_max_model_len(config: EngineConfig, num_blocks: int) -> EngineConfig:
    """A sequence can grow no longer than the whole pool: the one place max_model_len is capped by it."""
    capacity = num_blocks * config.cache.block_size
    if config.scheduler.max_model_len <= capacity:
        return config
    logger.warning("max_model_len %d exceeds the KV pool's %d tokens; capping max_model_len to %d",
                   config.scheduler.max_model_len, capacity, capacity)
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_model_len=capacity))
