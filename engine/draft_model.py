"""The draft-model proposer of speculative decoding: a smaller model with the same vocabulary proposes K tokens per
decoding sequence, K forwards of its own per step, and the target verifies them in one (engine/spec_decode.py).

Its paged KV cache mirrors the target's: the same block ids, block tables and slots, in tensors of its own shape, so
the scheduler's one block pool serves both (a block holds the target's and the draft's K/V of the same tokens). To keep
it complete, every target forward is run by the draft too (prompt chunks included); the positions a proposal writes
past the sequence's computed tokens are overwritten by the verifying step, and what rejected drafts leave there is
overwritten later, as for the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.kv_cache import allocate_kv_tensors, bytes_per_block
from engine.models.common import ForwardContext
from engine.models.loader import load_model
from engine.sampler import apply_logit_processors, exponential_noise, sampling_probs
from engine.sequence import Sequence
from engine.spec_decode import DraftRow, draft_row
from engine.step_inputs import StepInputs
from engine.structured_output import mask_logits

logger = logging.getLogger(__name__)


@dataclass
class _Position:
    """A sequence as one draft forward sees it: its tokens so far (drafts included), the newest not yet computed."""

    seq_id: int
    token_ids: list[int]
    block_ids: list[int]

    @property
    def num_computed_tokens(self) -> int:
        return len(self.token_ids) - 1


@dataclass
class Proposal:
    tokens: list[int]
    probs: list[torch.Tensor | None]  # per draft: the draft's sampling distribution [vocab]; None where greedy


class DraftModel:
    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, load_format: str, seed: int):
        self.config = config
        self.model = load_model(config, device, dtype, load_format, seed)
        self.dtype, self.device = dtype, device
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        logger.info("speculative decoding: draft model %s, %.1fM parameters", config.path,
                    sum(p.numel() for p in self.model.parameters()) / 1e6)

    def bytes_per_block(self, block_size: int) -> int:
        return bytes_per_block(self.config, block_size, self.dtype)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """As many blocks as the target's cache (padding block included): the same ids address both."""
        self.kv_caches = allocate_kv_tensors(self.config, num_blocks, block_size, self.dtype, self.device)
        logger.info("speculative decoding: the draft's KV cache takes %.1f MiB",
                    num_blocks * self.bytes_per_block(block_size) / 2**20)

    def mirror(self, input_ids: torch.Tensor, positions: torch.Tensor, backend, metadata) -> None:
        """Run the draft over a target step's tokens, so that its cache holds what the target's does."""
        self.model(input_ids, positions, ForwardContext(backend, metadata, self.kv_caches))

    def propose(self, seqs: list[Sequence], counts: list[int], inputs: StepInputs, backend,
                layout: Callable) -> list[Proposal]:
        """counts[i] draft tokens for seqs[i], one draft forward per position: the first takes each sequence's newest
        token, each next one the draft before it. A draft is sampled as the target would sample (the request's
        parameters, penalties and grammar, over the drafts before it), from the draft's logits."""
        proposals = [Proposal([], []) for _ in seqs]
        counts = list(counts)
        for j in range(max(counts, default=0)):
            live = [i for i, count in enumerate(counts) if count > j]
            if not live:
                break
            rows = [_Position(seqs[i].seq_id, seqs[i].token_ids + proposals[i].tokens, seqs[i].block_ids) for i in live]
            batch = inputs.prepare([(row, 1) for row in rows], list(range(len(rows))), len(rows))
            ctx = ForwardContext(backend, backend.plan(layout(batch)), self.kv_caches)
            logits = self.model.compute_logits(self.model(batch.input_ids, batch.positions, ctx))
            views = [draft_row(seqs[i], proposals[i].tokens) for i in live]
            tokens, probs = _draw(logits, views)
            for row, i in enumerate(live):
                proposals[i].tokens.append(tokens[row])
                proposals[i].probs.append(probs[row])
                if _ends(seqs[i], proposals[i].tokens):
                    counts[i] = j + 1  # nothing can follow: no more drafts for it
        return proposals


def _ends(seq: Sequence, drafts: list[int]) -> bool:
    """Would the newest draft, once accepted, end the output (eos, a stop token id, a complete grammar)? Then a
    further draft is wasted work, and under a grammar nothing would be allowed after it."""
    token, params = drafts[-1], seq.params
    if (token in params.eos_token_ids and not params.ignore_eos) or token in (params.stop_token_ids or ()):
        return True
    if seq.matcher is None:
        return False
    matcher = draft_row(seq, drafts).matcher
    return matcher.is_stopped() or matcher.is_error()


def _draw(logits: torch.Tensor, views: list[DraftRow]) -> tuple[list[int], list[torch.Tensor | None]]:
    """A token per row from the draft's distribution, and that distribution (None for greedy rows: the target
    verifies a greedy draft by its own argmax, so no probability is needed)."""
    processed = apply_logit_processors(mask_logits(logits, views), views)
    tokens = processed.argmax(dim=-1)
    probs: list[torch.Tensor | None] = [None] * len(views)
    sampled = [i for i, v in enumerate(views) if not v.params.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        rows = [views[i] for i in sampled]
        p = sampling_probs(processed.index_select(0, index), rows)
        tokens.index_copy_(0, index, (p / exponential_noise(p, rows)).argmax(dim=-1))
        for row, i in enumerate(sampled):
            probs[i] = p[row]
    return tokens.tolist(), probs

