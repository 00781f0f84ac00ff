"""The synchronous engine: the output processor in front of the engine core, in one thread.

A step runs the core, turns its token ids into RequestOutputs, and aborts in the core the samples whose text reached
a stop string. Both the offline LLM and the async engine drive this class; it is not thread-safe, so the async engine
calls it from its own loop thread only. `prepare_request` is the exception: it reads only immutable state, so the
server validates on its own thread and errors reach the client at once.
"""

from __future__ import annotations

from types import MappingProxyType

from engine.config import EngineConfig
from engine.core import EngineCore, EngineStats, PreparedRequest
from engine.engine_args import EngineArgs
from engine.engine_info import EngineInfo
from engine.models.dummy import tokenizer_for
from engine.output_processor import OutputProcessor, read_generation_defaults
from engine.outputs import RequestOutput
from engine.parallel import describe_layout
from engine.sampling_params import SamplingParams
from engine.stats import IterationStats
from engine.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig):
        tokenizer = tokenizer_for(config.model, config.load_format)
        if config.chat_template is not None:
            tokenizer.override_chat_template(config.chat_template)
        self.core = core = EngineCore(config)
        cfg = core.config
        self.info = EngineInfo(
            model_path=cfg.model.path, architecture=cfg.model.architecture,
            num_parameters=core.runner.num_parameters, dtype=cfg.dtype, device=cfg.device,
            attention_backend=core.runner.backend.selection_reason, max_model_len=cfg.scheduler.max_model_len,
            vocab_size=cfg.model.vocab_size, tokenizer=tokenizer,
            generation_defaults=MappingProxyType(read_generation_defaults(cfg.model.path)),
            num_kv_blocks=core.pool.num_blocks, block_size=cfg.cache.block_size,
            max_num_seqs=cfg.scheduler.max_num_seqs, max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            enable_prefix_caching=cfg.cache.enable_prefix_caching, scheduling_policy=cfg.scheduler.policy,
            tensor_parallel_size=cfg.parallel.tensor_parallel_size,
            parallel_layout=describe_layout(cfg.parallel, cfg.device),
        )
        self.processor = OutputProcessor(self.info, tokenizer.eos_token_ids | cfg.model.eos_token_ids)

    @classmethod
    def from_args(cls, model: str | None = None, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(model, **kwargs).create_config())

    @property
    def tokenizer(self) -> Tokenizer:
        return self.info.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return self.processor.default_sampling_params()

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        arrival_time: float | None = None, cache_salt: str | None = None,
                        priority: int = 0, group: str | None = None) -> PreparedRequest:
        """Tokenize and validate (raises ValidationError); see OutputProcessor.prepare."""
        return self.processor.prepare(request_id, prompt, params, arrival_time, cache_salt, priority, group)

    def add_prepared(self, req: PreparedRequest) -> None:
        self.processor.add(req)
        self.core.add(req)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks. Returns its final (delta) output, or None if unknown."""
        self.core.abort(request_id)
        return self.processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished()

    def has_schedulable_requests(self) -> bool:
        """Unfinished requests that are not all paused: a step would make progress."""
        return self.core.has_schedulable()

    def pause_request(self, request_id: str) -> None:
        """Stop running a request until resume_request (backpressure: nobody is taking its outputs)."""
        self.core.pause(request_id)

    def resume_request(self, request_id: str) -> None:
        self.core.resume(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one engine iteration; returns a delta output for every request that made visible progress."""
        outputs, stopped = self.processor.process(self.core.step())
        for request_id, index in stopped:
            self.core.abort(request_id, index)
        return outputs

    def check_health(self) -> None:
        """Raise if the engine cannot step any more (a tensor-parallel worker has exited or is stopped)."""
        self.core.check_workers()

    def shutdown(self, kill: bool = False) -> None:
        """Release what outlives the object: the tensor-parallel worker processes (kill: at once, from any thread)."""
        self.core.shutdown(kill)

    def pop_iteration_stats(self) -> IterationStats:
        return self.processor.pop_iteration_stats()

    def stats(self) -> EngineStats:
        return self.core.stats()
