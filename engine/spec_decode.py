"""Speculative decoding with prompt-lookup (n-gram) proposals: several tokens per sequence per forward.

Per step, the scheduler asks `NgramProposer` for up to K tokens that might follow each decoding sequence (what
followed the latest earlier occurrence of its last n tokens) and schedules them after its newest token, so the one
forward computes 1 + k positions of it. The sampler then draws a token at every position, each under the target
model's distribution given the drafts before it (`draft_rows`), and the sequence keeps the drafts up to the first
position whose draw differs, plus that draw (or, when all k matched, the draw after the last draft: the bonus).

Why that is exact: a prompt-lookup proposal is deterministic, a one-hot draft distribution q. The speculative-sampling
rule accepts draft d with probability min(1, p(d) / q(d)) = p(d), and on rejection samples from the residual
max(0, p - q) normalised: p without d. Drawing x ~ p and accepting iff x = d does both at once (P(x = d) = p(d), and x
given x != d is p without d, normalised), so the output has the target's distribution; under greedy, x is the argmax,
so the output is token for token the non-speculative one. Logprobs are those of the emitted tokens under the target.

The KV of a rejected draft is written past the sequence's computed tokens and overwritten later; only blocks of
accepted tokens are ever registered in the prefix cache (Scheduler.advance counts computed tokens only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.config import SpeculativeConfig
from engine.errors import ValidationError
from engine.sampling_params import SamplingParams
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
    if config.get("method") in ("draft_model", None) and "model" in config:
        raise ValidationError("a draft model (speculative_config.model) is not supported yet; use "
                              "{\"method\": \"ngram\", ...}", "speculative_config")
    if config.get("method") != "ngram":
        raise ValidationError(f"speculative_config.method must be \"ngram\", got {config.get('method')!r}",
                              "speculative_config")
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValidationError(f"speculative_config has unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}", "speculative_config")
    if "num_speculative_tokens" not in config:
        raise ValidationError("speculative_config needs num_speculative_tokens", "speculative_config")
    spec = SpeculativeConfig(**config)
    _check_int("num_speculative_tokens", spec.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
    _check_int("prompt_lookup_min", spec.prompt_lookup_min, 1, None)
    _check_int("prompt_lookup_max", spec.prompt_lookup_max, spec.prompt_lookup_min, None)
    if spec.disable_by_batch_size is not None:
        _check_int("disable_by_batch_size", spec.disable_by_batch_size, 1, None)
    return spec


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValidationError(f"speculative_config.{name} must be an integer {allowed}, got {value!r}",
                              "speculative_config")


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
    rows: list[Sequence | DraftRow] = [seq]
    matcher = seq.matcher
    for j in range(1, len(drafts) + 1):
        if seq.matcher is not None:
            matcher = matcher.deep_copy()
            matcher.consume_token(drafts[j - 1])
        rows.append(DraftRow(seq.params, seq.prompt_token_ids, seq.output_token_ids + drafts[:j], seq.generator,
                             matcher))
    return rows


def accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the sampled tokens confirm: the length of their common prefix (sampled has one more)."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return j
    return len(drafts)
