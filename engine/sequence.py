"""Per-sample state that the scheduler, model runner and sampler share.

A request with n > 1 becomes n Sequences with the same request_id and indices 0..n-1; each one owns
its own KV blocks, so the scheduler only ever deals with Sequences.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        cache_salt: str | None = None,
        priority: int = 0,
        arrival: int | None = None,
        group: str | None = None,
        matcher: Any = None,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        # NOTE: token_ids is prompt + output; the runner reads new tokens from it by position.
        self.token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved: never None
        # Scheduling (engine/scheduler.py): the request's priority (lower runs first, under the priority policy), its
        # arrival order, and the group that gets one fair share (its request, or e.g. all prompts of an HTTP request).
        self.priority = priority
        self.arrival = seq_id if arrival is None else arrival
        self.group = request_id if group is None else group
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_ids: list[int] = []
        # Prefix caching: only blocks computed under the same salt are shared. block_hashes[i] is the content hash
        # of full block i (kept across preemption: contents do not change); the first num_registered_blocks of
        # block_ids are in the pool's table.
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens: int | None = None  # prompt tokens found in the cache at first admission
        # Prompt logprobs, when the request asks for them: entry j is token j's given tokens 0..j-1 (entry 0 is None:
        # the first token has no prefix). They fill in as the prompt's chunks are computed (engine/model_runner.py).
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        # Structured outputs: the sample's grammar state (engine/structured_output.py), advanced by each token it samples.
        self.matcher = matcher
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # A seeded request draws its noise from its own generator, so its samples do not depend on
        # what else is in the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed((params.seed + index) % 2**64)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and some are still missing: its prompt must be computed, not read from the
        prefix cache (the cache holds K/V, not the hidden states that the logits come from)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, status={self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_ids)})"
        )
