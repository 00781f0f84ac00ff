"""The synchronous engine: admission, the step loop (schedule -> run -> sample -> stop checks) and outputs.

Both the offline LLM and the async engine drive this class; it is not thread-safe, so the async
engine calls it from its own loop thread only. `prepare_request` is the exception: it reads only
immutable state, so the server validates on its own thread and errors reach the client at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from types import MappingProxyType

from engine.config import EngineConfig, read_json
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_args import EngineArgs
from engine.engine_info import EngineInfo
from engine.errors import ValidationError
from engine.kv_cache import BlockPool, blocks_for
from engine.model_runner import ModelRunner
from engine.models.dummy import tokenizer_for
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stats import FinishedRequestStats, IterationStats, RequestTimes

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A validated request, ready to be queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float
    cache_salt: str | None = None


@dataclass
class _RequestState:
    request: PreparedRequest
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    times: RequestTimes
    num_finished: int = 0


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


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.tokenizer = tokenizer_for(config.model, config.load_format)
        if config.chat_template is not None:
            self.tokenizer.override_chat_template(config.chat_template)
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.config = self._cap_max_model_len(config, num_blocks)
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(self.config.scheduler, config.cache.block_size, self.pool,
                                   prefix_caching=config.cache.enable_prefix_caching)
        self.eos_token_ids = self.tokenizer.eos_token_ids | config.model.eos_token_ids
        self.vocab_size = config.model.vocab_size
        self.generation_defaults = self._read_generation_defaults()
        self._requests: dict[str, _RequestState] = {}
        self._seq_ids = itertools.count()
        self.counters = _Counters()
        self._iteration = IterationStats()
        # Off by default so that an offline run does not accumulate measurements nobody collects.
        self.collect_stats = False
        cfg = self.config
        self.info = EngineInfo(
            model_path=cfg.model.path, architecture=cfg.model.architecture,
            num_parameters=sum(p.numel() for p in self.runner.model.parameters()), dtype=cfg.dtype,
            device=cfg.device, attention_backend=self.runner.backend.selection_reason,
            max_model_len=cfg.scheduler.max_model_len, vocab_size=self.vocab_size, tokenizer=self.tokenizer,
            generation_defaults=MappingProxyType(dict(self.generation_defaults)), num_kv_blocks=num_blocks,
            block_size=cfg.cache.block_size, max_num_seqs=cfg.scheduler.max_num_seqs,
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            enable_prefix_caching=cfg.cache.enable_prefix_caching,
        )

    @classmethod
    def from_args(cls, model: str | None = None, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(model, **kwargs).create_config())

    @staticmethod
    def _cap_max_model_len(config: EngineConfig, num_blocks: int) -> EngineConfig:
        capacity = num_blocks * config.cache.block_size
        if config.scheduler.max_model_len <= capacity:
            return config
        logger.warning(
            "max_model_len %d exceeds the KV pool's %d tokens; capping max_model_len to %d",
            config.scheduler.max_model_len, capacity, capacity,
        )
        return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_model_len=capacity))

    def _read_generation_defaults(self) -> dict:
        gen = read_json(self.config.model.path / "generation_config.json")
        keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
        defaults = {ours: gen[theirs] for theirs, ours in keys.items() if gen.get(theirs) is not None}
        while True:
            try:
                SamplingParams(**defaults)
                return defaults
            except ValidationError as exc:
                # A bad value in a model's own file should not make the model unservable.
                logger.warning("ignoring %s from generation_config.json: %s", exc.param, exc)
                defaults.pop(exc.param)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def default_sampling_params(self) -> SamplingParams:
        """Library defaults overridden by the model's generation_config.json (as vLLM does)."""
        return SamplingParams(**self.generation_defaults)

    # ---- admission ---------------------------------------------------------------------------

    def prepare_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> PreparedRequest:
        """Tokenize and validate. Raises ValidationError with a message fit for the client. Requests with a
        cache_salt share prefix-cache blocks only with requests that have the same salt."""
        params = params if params is not None else self.default_sampling_params()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValidationError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise ValidationError("prompt must not be empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"prompt has token id {bad}, but the vocabulary has ids 0..{self.vocab_size - 1}", "prompt")
        params.validate()
        params.check_vocab(self.vocab_size)
        params = params.clone(eos_token_ids=frozenset(self.eos_token_ids))
        if len(ids) >= self.max_model_len:
            raise ValidationError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has {len(ids)}; "
                f"a prompt may have at most {self.max_model_len - 1} tokens to leave room for the completion",
                "prompt",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        total = len(ids) + max_tokens
        if total > self.max_model_len:
            raise ValidationError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {total} were requested "
                f"({len(ids)} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        if blocks_for(total, self.config.cache.block_size) > self.pool.num_blocks:
            raise ValidationError(
                f"the request needs {total} tokens of KV cache, more than the whole pool holds "
                f"({self.pool.num_blocks * self.config.cache.block_size} tokens)",
                "max_tokens",
            )
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValidationError("cache_salt must be a non-empty string", "cache_salt")
        return PreparedRequest(request_id, text, ids, params, max_tokens, arrival_time or time.monotonic(),
                               cache_salt)

    def add_prepared(self, req: PreparedRequest) -> None:
        if req.request_id in self._requests:
            raise ValidationError(f"request id {req.request_id!r} is already in use", "request_id")
        seqs, detoks = [], []
        for index in range(req.params.n):
            seq = Sequence(next(self._seq_ids), req.request_id, index, req.prompt_token_ids, req.params,
                           req.max_tokens, req.arrival_time, req.cache_salt)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(
                self.tokenizer,
                skip_special_tokens=req.params.skip_special_tokens,
                stop=req.params.stop_strings,
                include_stop_str_in_output=req.params.include_stop_str_in_output,
            ))
            self.scheduler.add(seq)
        self._requests[req.request_id] = _RequestState(req, seqs, detoks, RequestTimes(req.arrival_time))
        self.counters.prompt_tokens += len(req.prompt_token_ids)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks. Returns its final (delta) output, or None if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        outs = []
        for seq, detok in zip(state.seqs, state.detokenizers):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                outs.append(CompletionOutput(seq.index, detok.flush(), [], [] if seq.logprobs is not None else None, "abort"))
        state.times.finished = time.monotonic()
        self._record_finished(state, "abort")
        return self._request_output(state, outs, finished=True)

    # ---- the step ------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one engine iteration; returns a delta output for every request that made visible progress."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (pool or budget misconfigured)")
            return []
        scheduled_at = time.monotonic()
        for seq, _ in sched.scheduled:
            times = self._requests[seq.request_id].times
            if times.first_scheduled is None:
                times.first_scheduled = scheduled_at
        sampler_out = self.runner.execute(sched.scheduled, sched.samples)
        token_ids = [] if sampler_out is None else sampler_out.token_ids
        sampled_seqs = self.scheduler.update_from_output(sched, token_ids,
                                                         None if sampler_out is None else sampler_out.logprobs)
        sampled_at = time.monotonic()
        self.counters.generation_tokens += len(sampled_seqs)
        if self.collect_stats:
            self._iteration.step_tokens.append(sched.num_batched_tokens)

        deltas: dict[str, list[CompletionOutput]] = {}
        for i, seq in enumerate(sampled_seqs):
            self._record_token(seq, sampled_at)
            completion = self._detokenize(seq, token_ids[i], sampler_out.logprobs[i])
            deltas.setdefault(seq.request_id, []).append(completion)

        outputs = []
        for request_id, completions in deltas.items():
            state = self._requests[request_id]
            state.num_finished += sum(c.finish_reason is not None for c in completions)
            done = state.num_finished == len(state.seqs)
            if done:
                del self._requests[request_id]
                state.times.finished = sampled_at
                self._record_finished(state, state.seqs[0].finish_reason)
            outputs.append(self._request_output(state, completions, done))
        return outputs

    # ---- measurements --------------------------------------------------------------------------

    def _record_token(self, seq: Sequence, now: float) -> None:
        times = self._requests[seq.request_id].times
        if times.first_token is None:
            times.first_token = now
            if self.collect_stats:
                self._iteration.ttfts_s.append(now - times.arrival)
        if seq.last_token_time is not None and self.collect_stats:
            self._iteration.itls_s.append(now - seq.last_token_time)
        seq.last_token_time = now
        times.last_token = now

    def _record_finished(self, state: _RequestState, reason: str) -> None:
        if not self.collect_stats:
            return
        t = state.times
        self._iteration.finished.append(FinishedRequestStats(
            finish_reason=reason,
            prompt_tokens=len(state.request.prompt_token_ids),
            generation_tokens=sum(seq.num_output_tokens for seq in state.seqs),
            e2e_s=t.finished - t.arrival,
            queue_s=t.queue_s,
            prefill_s=None if t.first_token is None else t.first_token - t.first_scheduled,
            decode_s=None if t.first_token is None else t.last_token - t.first_token,
        ))

    def pop_iteration_stats(self) -> IterationStats:
        """What happened since the previous call: step sizes, TTFTs, inter-token gaps, finished requests."""
        stats, self._iteration = self._iteration, IterationStats()
        return stats

    def _detokenize(self, seq: Sequence, token: int, logprob) -> CompletionOutput:
        """The text a sampled token adds; a stop string found in it ends the sequence in the scheduler."""
        detok = self._requests[seq.request_id].detokenizers[seq.index]
        reason = seq.finish_reason
        if reason == "stop":
            # Ended by eos or a stop token: that token is not part of the text.
            text = detok.flush()
        else:
            text, stop_str = detok.step(seq.output_token_ids)
            if stop_str is None and reason is not None:
                text += detok.flush()
        # Text held back (e.g. an incomplete character) can complete a stop string only at the flush.
        if detok.matched_stop is not None:
            self.scheduler.finish(seq, "stop", detok.matched_stop)
        return CompletionOutput(seq.index, text, [token], [logprob] if logprob is not None else None,
                                seq.finish_reason, seq.stop_reason)

    def _request_output(self, state: _RequestState, completions: list[CompletionOutput], finished: bool) -> RequestOutput:
        req = state.request
        metrics = dataclasses.replace(state.times) if finished else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished, metrics,
                             num_cached_tokens=state.seqs[0].num_cached_tokens or 0)

    def stats(self) -> EngineStats:
        # Counted in requests, not sequences, like vLLM's gauges: an n=4 request is one request.
        running = {seq.request_id for seq in self.scheduler.running}
        waiting = {seq.request_id for seq in self.scheduler.waiting} - running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=self.pool.usage,
            num_kv_blocks=self.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.counters.prompt_tokens,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            generation_tokens_total=self.counters.generation_tokens,
        )
