"""Speculative decoding: several tokens per sequence per forward, proposed by prompt lookup (n-gram) or a draft model.

Per step, the scheduler asks `NgramProposer` for up to K tokens that might follow each decoding sequence (what
followed the latest earlier occurrence of its last n tokens) and schedules them after its newest token, so the one
forward computes 1 + k positions of it. With a draft model the scheduler reserves the K slots (`DraftSlots`) and the
draft model (engine/draft_model.py) fills them before the step runs. The sampler then draws a token at every position, each under the target
model's distribution given the drafts before it (`draft_rows`), and the sequence keeps the drafts up to the first
position whose draw differs, plus that draw (or, when all k matched, the draw after the last draft: the bonus).

Why that is exact: a prompt-lookup proposal is deterministic, a one-hot draft distribution q. The speculative-sampling
rule accepts draft d with probability min(1, p(d) / q(d)) = p(d), and on rejection samples from the residual
max(0, p - q) normalised: p without d. Drawing x ~ p and accepting iff x = d does both at once (P(x = d) = p(d), and x
given x != d is p without d, normalised), so the output has the target's distribution; under greedy, x is the argmax,
so the output is token for token the non-speculative one. Logprobs are those of the emitted tokens under the target.

A draft model's sampled proposals come from a real distribution q, so they go through the general rule
(`verify_sampled`): accept with probability min(1, p/q), else draw from the residual. Its greedy proposals are argmaxes
and are verified as above.

The KV of a rejected draft is written past the sequence's computed tokens and overwritten later; only blocks of
accepted tokens are ever registered in the prefix cache (Scheduler.advance counts computed tokens only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import tokenizers
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.config import ModelConfig, SpeculativeConfig
from engine.errors import ValidationError
from engine.sampling_params import SamplingParams, check_int
from engine.sequence import Sequence

MAX_SPECULATIVE_TOKENS = 16


def parse_speculative_config(value: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """vLLM's speculative_config (a dict, or its JSON text) -> SpeculativeConfig. Unknown keys and values outside
    their range are a ValidationError that says what is allowed."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(f"speculative_config must be JSON, got {value!r}: {exc}", "speculative_config") \
                from None
    if not isinstance(value, dict):
        raise ValidationError("speculative_config must be an object such as {\"method\": \"ngram\", "
                              "\"num_speculative_tokens\": 3}", "speculative_config")
    config = dict(value)
    if "model" in config and config.get("method") in (None, "draft_model"):
        config["method"] = "draft_model"  # vLLM: a model and no method means a draft model
    if config.get("method") not in ("ngram", "draft_model"):
        raise ValidationError(f"speculative_config.method must be \"ngram\" or \"draft_model\" (with \"model\": a "
                              f"directory), got {config.get('method')!r}", "speculative_config")
    if config["method"] == "draft_model" and not (isinstance(config.get("model"), str) and config["model"]):
        raise ValidationError("speculative_config.model must name the draft model's directory (or hub id)",
                              "speculative_config")
    known = {f.name for f in fields(SpeculativeConfig)} - {"draft"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValidationError(f"speculative_config has unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}", "speculative_config")
    if "num_speculative_tokens" not in config:
        raise ValidationError("speculative_config needs num_speculative_tokens", "speculative_config")
    spec = SpeculativeConfig(**config)

    def check(name: str, low: int, high: int | None = None) -> None:
        check_int(f"speculative_config.{name}", getattr(spec, name), low, high, param="speculative_config")

    check("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    check("prompt_lookup_min", 1)
    check("prompt_lookup_max", spec.prompt_lookup_min)
    if spec.disable_by_batch_size is not None:
        check("disable_by_batch_size", 1)
    return spec


def check_draft_vocabulary(target: ModelConfig, draft: ModelConfig) -> None:
    """A draft proposes token ids of the target's vocabulary: the embedding sizes and the tokenizers must agree."""
    if draft.vocab_size != target.vocab_size:
        raise ValidationError(f"the draft model has {draft.vocab_size} token embeddings, the model {target.vocab_size}: "
                              "a draft must share the model's vocabulary", "speculative_config")
    vocabularies = [_vocabulary(config.path) for config in (target, draft)]
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        differing = sorted(set(vocabularies[0].items()) ^ set(vocabularies[1].items()))[:3]
        raise ValidationError(f"the draft model's tokenizer differs from the model's (e.g. {differing}): a draft must "
                              "share the model's vocabulary", "speculative_config")


def _vocabulary(model_dir) -> dict[str, int] | None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    return tokenizers.Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


# A draft slot the draft model fills in after scheduling (EngineCore.step), before the step runs.
PENDING = -1


class DraftSlots:
    """The scheduler's side of the draft-model proposer: how many drafts a sequence gets (as many as fit); the draft
    model writes them before the step runs."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.max_batch = config.disable_by_batch_size

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        return [PENDING] * max(0, min(self.k, limit))


def make_proposer(config: SpeculativeConfig | None) -> NgramProposer | DraftSlots | None:
    if config is None:
        return None
    return DraftSlots(config) if config.method == "draft_model" else NgramProposer(config)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_batch = config.disable_by_batch_size  # more running sequences: no drafts (None: always)

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(K, limit) tokens: those that followed the latest earlier occurrence of the last n tokens, for the
        largest n in [min, max] that occurs. Vectorized: one comparison of every window of the context per n."""
        limit = min(self.k, limit)
        if limit <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that start early enough to be followed by at least one token (the last n is not a match of
            # itself).
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + limit].tolist()
        return []


@dataclass
class DraftRow:
    """The sampler's view of a sequence at one speculative position: its state as if the drafts before the position
    were already its output (penalties, min_tokens and the grammar then see what the target model conditioned on)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: Any
    matcher: Any


def draft_rows(seq: Sequence, drafts: list[int]) -> list[Sequence | DraftRow]:
    """Sampler rows for seq's 1 + len(drafts) positions: the sequence itself, then a view per accepted-so-far prefix.
    The generator is shared, so a seeded sequence draws its noise position after position from its own stream."""
    return [seq] + [draft_row(seq, drafts[:j]) for j in range(1, len(drafts) + 1)]


def draft_row(seq: Sequence, drafts: list[int]) -> DraftRow:
    """seq as if `drafts` were its newest output tokens; its grammar matcher (a copy) advanced through them."""
    matcher = seq.matcher
    if matcher is not None and drafts:
        matcher = matcher.deep_copy()
        for token in drafts:
            matcher.consume_token(token)
    return DraftRow(seq.params, seq.prompt_token_ids, seq.output_token_ids + drafts, seq.generator, matcher)


def verify_sampled(drafts: list[int], draft_probs: list[torch.Tensor], target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> list[int]:
    """The speculative-sampling rule for drafts drawn from a distribution q (a draft model's): draft j is accepted with
    probability min(1, p_j(d) / q_j(d)); at the first rejection the token comes from the residual max(0, p_j - q_j),
    normalised; when all are accepted, one more from p_k. target_probs: [k + 1, vocab], p at each position. The output
    then has the target's distribution whatever q is. Returns the tokens to keep."""
    p = target_probs.float().cpu()
    for j, draft in enumerate(drafts):
        q = draft_probs[j].float().cpu()
        if torch.rand((), generator=generator) * q[draft] < p[j, draft]:
            continue
        residual = (p[j] - q).clamp_min_(0.0)
        total = residual.sum()
        # A residual of all zeros (p equal to q up to rounding) would have accepted: sample from p itself.
        dist = residual / total if total > 0 else p[j]
        return drafts[:j] + [int(torch.multinomial(dist, 1, generator=generator))]
    bonus = p[len(drafts)]
    # After a draft that completes the sequence's grammar nothing is allowed (the row is NaN): it ends there anyway.
    if not (torch.isfinite(bonus).all() and bonus.sum() > 0):
        return drafts
    return drafts + [int(torch.multinomial(bonus, 1, generator=generator))]


def accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the sampled tokens confirm: the length of their common prefix (sampled has one more)."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return j
    return len(drafts)
