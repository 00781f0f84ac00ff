"""The text side of the engine, in front of the core: requests in as text or ids, RequestOutputs out.

On the way in it tokenizes and validates (`prepare`: the only place a request is checked, so every frontend gives
the same errors); on the way out it turns the core's token ids into text deltas, ends a sample whose text reached a
stop string (the caller then aborts that sample in the core), assembles RequestOutputs and keeps each request's
timestamps for metrics. It owns no sequence state: the core does (engine/core.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from engine.config import read_json
from engine.core import CoreOutput, CoreStepOutput, PreparedRequest
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_info import EngineInfo
from engine.errors import ValidationError
from engine.kv_cache import blocks_for
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams, check_token_ids
from engine.stats import FinishedRequestStats, IterationStats, RequestTimes
from engine.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)


@dataclass
class _Sample:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_time: float | None = None  # when its latest token was sampled (inter-token latency)


@dataclass
class _RequestState:
    request: PreparedRequest
    samples: list[_Sample]
    times: RequestTimes
    num_cached_tokens: int = 0  # of sample 0, once admitted
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once the first sample has reported them

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, info: EngineInfo, eos_token_ids: frozenset[int]):
        self.info = info
        self.tokenizer = info.tokenizer
        self.eos_token_ids = eos_token_ids
        self.grammars = GrammarCompiler(info.tokenizer, info.vocab_size, eos_token_ids)
        self._requests: dict[str, _RequestState] = {}
        # Off by default so that an offline run does not accumulate measurements nobody collects.
        self.collect_stats = False
        self._iteration = IterationStats()

    # ---- in -----------------------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        """Library defaults overridden by the model's generation_config.json (as vLLM does)."""
        return SamplingParams(**self.info.generation_defaults)

    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                arrival_time: float | None = None, cache_salt: str | None = None, priority: int = 0,
                group: str | None = None) -> PreparedRequest:
        """Tokenize and validate. Raises ValidationError with a message fit for the client. Requests with a
        cache_salt share prefix-cache blocks only with requests that have the same salt. A priority other than 0 needs
        the priority scheduling policy (as in vLLM). Requests of one group share one fair share of the engine."""
        info, max_len = self.info, self.info.max_model_len
        params = params if params is not None else self.default_sampling_params()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, max_tokens=max_len, what="the prompt")
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValidationError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise ValidationError("prompt must not be empty", "prompt")
        check_token_ids("prompt", ids, info.vocab_size)
        # The copy validates again: SamplingParams is mutable (as vLLM's), so it may have changed since it was made.
        params = params.clone(eos_token_ids=self.eos_token_ids)
        params.check_vocab(info.vocab_size)
        # A prompt scored without sampling (max_tokens 0) may fill the whole context.
        if len(ids) > max_len or (len(ids) == max_len and params.max_tokens != 0):
            raise ValidationError(
                f"this model's maximum context length is {max_len} tokens, but the prompt has {len(ids)}; "
                f"a prompt may have at most {max_len - 1} tokens to leave room for the completion "
                f"({max_len} with max_tokens 0)", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(ids)
        total = len(ids) + max_tokens
        if total > max_len:
            raise ValidationError(
                f"this model's maximum context length is {max_len} tokens, but {total} were requested "
                f"({len(ids)} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
                "max_tokens")
        if blocks_for(total, info.block_size) > info.num_kv_blocks:
            raise ValidationError(
                f"the request needs {total} tokens of KV cache, more than the whole pool holds "
                f"({info.num_kv_blocks * info.block_size} tokens)", "max_tokens")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValidationError("cache_salt must be a non-empty string", "cache_salt")
        if isinstance(priority, bool) or not isinstance(priority, int) or not -2**63 <= priority < 2**63:
            raise ValidationError(f"priority must be a 64-bit integer, got {priority!r}", "priority")
        if priority != 0 and info.scheduling_policy != "priority":
            raise ValidationError(f"priority is only allowed with the priority scheduling policy (this server uses "
                                  f"{info.scheduling_policy!r}; start it with --scheduling-policy priority)", "priority")
        # Last: compiling a grammar is the costliest check (cached; time-limited).
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        return PreparedRequest(request_id, text, ids, params, max_tokens, arrival_time or time.monotonic(), cache_salt,
                               priority, request_id if group is None else group, grammar)

    def add(self, req: PreparedRequest) -> None:
        if req.request_id in self._requests:
            raise ValidationError(f"request id {req.request_id!r} is already in use", "request_id")
        p = req.params
        samples = [_Sample(IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens,
                                                  stop=p.stop_strings,
                                                  include_stop_str_in_output=p.include_stop_str_in_output))
                   for _ in range(p.n)]
        self._requests[req.request_id] = _RequestState(req, samples, RequestTimes(req.arrival_time))

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- out ----------------------------------------------------------------------------------------

    def process(self, step: CoreStepOutput) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """The delta output of every request the step advanced, and the (request id, sample index) of the samples
        whose text reached a stop string: the core must abort those."""
        for request_id, index, num_cached in step.admitted:
            state = self._requests.get(request_id)
            if state is not None:
                if state.times.first_scheduled is None:
                    state.times.first_scheduled = step.scheduled_at
                if index == 0:
                    state.num_cached_tokens = num_cached
        if step.num_batched_tokens and self.collect_stats:
            self._iteration.step_tokens.append(step.num_batched_tokens)
        deltas: dict[str, list[CompletionOutput]] = {}
        stopped: list[tuple[str, int]] = []
        new_prompt_logprobs: set[str] = set()
        for out in step.outputs:
            state = self._requests.get(out.request_id)
            if state is None or state.samples[out.index].finish_reason is not None:
                continue  # aborted, or ended by a stop string, while the core ran this step
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = out.prompt_logprobs
                new_prompt_logprobs.add(out.request_id)
            sample = state.samples[out.index]
            if out.token_id is None:  # max_tokens=0: the sample ends with its prompt, without a token
                sample.finish_reason = out.finish_reason
                no_logprobs = state.request.params.logprobs is None
                completion = CompletionOutput(out.index, "", [], None if no_logprobs else [], out.finish_reason)
            else:
                self._record_token(state, sample, step.finished_at)
                completion = self._detokenize(sample, state.request.params, out)
            if completion.finish_reason is not None and out.finish_reason is None:
                stopped.append((out.request_id, out.index))
            deltas.setdefault(out.request_id, []).append(completion)
        outputs = []
        for request_id, completions in deltas.items():
            state = self._requests[request_id]
            if state.finished:
                del self._requests[request_id]
                state.times.finished = step.finished_at
                self._record_finished(state, state.samples[0].finish_reason)
            output = self._request_output(state, completions)
            if request_id in new_prompt_logprobs:
                output.prompt_logprobs = state.prompt_logprobs
            outputs.append(output)
        return outputs, stopped

    def _detokenize(self, sample: _Sample, params: SamplingParams, out: CoreOutput) -> CompletionOutput:
        """The text a new token adds; a stop string found in it ends the sample."""
        detok = sample.detokenizer
        sample.token_ids.append(out.token_id)
        reason, stop_reason = out.finish_reason, out.stop_reason
        if reason == "stop" and (stop_reason is not None or (out.token_id in params.eos_token_ids
                                                             and not params.ignore_eos)):
            # Ended by eos or a stop token: that token is not part of the text. (A sample whose grammar ended is
            # "stop" too, but its last token is text.)
            text = detok.flush()
        else:
            text, stop_str = detok.step(sample.token_ids)
            if stop_str is None and reason is not None:
                text += detok.flush()
        # Text held back (e.g. an incomplete character) can complete a stop string only at the flush.
        if detok.matched_stop is not None:
            reason, stop_reason = "stop", detok.matched_stop
        sample.finish_reason = reason
        return CompletionOutput(out.index, text, [out.token_id], None if out.logprob is None else [out.logprob],
                                reason, stop_reason)

    def abort(self, request_id: str) -> RequestOutput | None:
        """The final (delta) output of a request ended early, or None if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        logprobs = state.request.params.logprobs
        outs = []
        for index, sample in enumerate(state.samples):
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
                outs.append(CompletionOutput(index, sample.detokenizer.flush(), [],
                                             None if logprobs is None else [], "abort"))
        state.times.finished = time.monotonic()
        self._record_finished(state, "abort")
        return self._request_output(state, outs)

    def _request_output(self, state: _RequestState, completions: list[CompletionOutput]) -> RequestOutput:
        req, finished = state.request, state.finished
        metrics = dataclasses.replace(state.times) if finished else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished, metrics,
                             num_cached_tokens=state.num_cached_tokens)

    # ---- measurements ---------------------------------------------------------------------------------

    def _record_token(self, state: _RequestState, sample: _Sample, now: float) -> None:
        times = state.times
        if times.first_token is None:
            times.first_token = now
            if self.collect_stats:
                self._iteration.ttfts_s.append(now - times.arrival)
        if sample.last_token_time is not None and self.collect_stats:
            self._iteration.itls_s.append(now - sample.last_token_time)
        sample.last_token_time = times.last_token = now

    def _record_finished(self, state: _RequestState, reason: str) -> None:
        if not self.collect_stats:
            return
        t = state.times
        self._iteration.finished.append(FinishedRequestStats(
            finish_reason=reason,
            prompt_tokens=len(state.request.prompt_token_ids),
            generation_tokens=sum(len(s.token_ids) for s in state.samples),
            e2e_s=t.finished - t.arrival,
            queue_s=t.queue_s,
            prefill_s=None if t.first_token is None else t.first_token - t.first_scheduled,
            decode_s=None if t.first_token is None else t.last_token - t.first_token,
        ))

    def pop_iteration_stats(self) -> IterationStats:
        """What happened since the previous call: step sizes, TTFTs, inter-token gaps, finished requests."""
        stats, self._iteration = self._iteration, IterationStats()
        return stats


def read_generation_defaults(model_dir) -> dict:
    """SamplingParams fields from the model's generation_config.json; a bad value is dropped with a warning, since
    a model's own file should not make it unservable."""
    gen = read_json(model_dir / "generation_config.json")
    keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
    defaults = {ours: gen[theirs] for theirs, ours in keys.items() if gen.get(theirs) is not None}
    while True:
        try:
            SamplingParams(**defaults)
            return defaults
        except ValidationError as exc:
            logger.warning("ignoring %s from generation_config.json: %s", exc.param, exc)
            defaults.pop(exc.param)
