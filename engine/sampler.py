"""Turns a batch of next-token logits into token ids, plus logprobs under the raw model distribution (after the
row's grammar mask, for structured outputs).

Order of operations (vLLM / OpenAI / HF conventions):
    grammar mask -> logit_bias -> min_tokens -> repetition penalty -> presence/frequency penalty -> greedy argmax
    -> temperature -> top-k -> top-p -> min-p -> sample.

Every step works on the whole batch at once with per-row parameter tensors; Python only loops over
rows to collect parameters (and over seeded rows to draw their noise). A step nobody in the batch
asked for is skipped. Host-to-device copies go through pinned memory without blocking, nothing reads
a value back early (no .item(), no boolean-mask indexing, no nonzero), and the results (token ids,
plus logprobs when asked) come back in one copy at the end: the only point where the host waits.

Seeded rows are the exception to "all on the device": each draws its noise from its own CPU
generator (so its samples do not depend on the batch), which costs O(vocab) host work and a
vocab-sized host-to-device copy per seeded row per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.structured_output import mask_logits
from kernels.transfer import to_device


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where params.logprobs is None


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """Sample one token per row. logits: [num_seqs, vocab] (any float dtype), row i belongs to seqs[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [num_seqs={len(seqs)}, vocab], got {tuple(logits.shape)}")
        # Structured outputs first: what the grammar forbids is gone before any other processing, and logprobs report
        # the distribution the sample was drawn from (docs: "logprobs under a grammar").
        logits = mask_logits(logits, seqs)
        processed = apply_logit_processors(logits, seqs)
        token_ids = _choose_tokens(processed, seqs)
        logprob_tensors = _raw_logprobs(logits, token_ids, seqs)
        # Everything above is only queued on the device; this is the step's one copy back and one wait.
        if logprob_tensors is None:
            return SamplerOutput(copy_to_host(token_ids), [None] * len(seqs))
        tops = [seqs[i].params.logprobs for i in logprob_tensors.rows]
        return _unpack(copy_to_host(_pack(token_ids, logprob_tensors)), logprob_tensors, tops)


def copy_to_host(values: torch.Tensor) -> list:
    """values.tolist(), waiting for the device only until this copy is done.

    On CUDA it waits on an event after a queued copy into pinned memory rather than calling .tolist()
    on the device tensor: the same single wait, but not a stream synchronize, so a test can run the
    step under torch.cuda.set_sync_debug_mode("error") and catch any other wait."""
    if values.device.type != "cuda":
        return values.tolist()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return host.tolist()


def apply_logit_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Return float32 logits with logit_bias, min_tokens masking and the three penalties applied.

    Never modifies `logits`; returns it upcast (possibly the same tensor) when no row uses any of them.
    """
    params = [s.params for s in seqs]
    bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
    banned_rows = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]
    repetition_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    occurrence_rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if not (bias_rows or banned_rows or repetition_rows or occurrence_rows):
        return logits.float()

    # A copy, because the caller still needs the raw logits for logprobs.
    out = logits.to(torch.float32, copy=True)
    device, vocab = out.device, out.shape[-1]
    # NOTE: (row, token) updates go through scatter on the flattened rows, not index_put_: on CUDA some
    # torch versions range-check index_put_(accumulate=True) indices with .item(), a host sync, where
    # scatter checks them inside the kernel.
    if bias_rows:
        entries = [(i * vocab + tok, bias) for i in bias_rows for tok, bias in params[i].logit_bias.items()]
        flat, biases = zip(*entries)
        out.view(-1).scatter_add_(0, to_device(flat, torch.long, device), to_device(biases, torch.float32, device))
    if banned_rows:
        # eos is masked even with ignore_eos: min_tokens is a floor on length whatever ends the sequence.
        flat = [i * vocab + tok for i in banned_rows
                for tok in params[i].eos_token_ids | set(params[i].stop_token_ids or ())]
        if flat:
            out.view(-1).scatter_(0, to_device(flat, torch.long, device), float("-inf"))
    if repetition_rows:
        seen = torch.zeros(out.shape, dtype=torch.bool, device=device)
        history = [chain(seqs[i].prompt_token_ids, seqs[i].output_token_ids) for i in repetition_rows]
        seen.view(-1).scatter_(0, _flat_token_index(repetition_rows, history, vocab, device), True)
        penalty = to_device([p.repetition_penalty for p in params], torch.float32, device)[:, None]
        penalized = torch.where(out > 0, out / penalty, out * penalty)
        out = torch.where(seen, penalized, out)
    if occurrence_rows:
        counts = torch.zeros(out.shape, dtype=torch.float32, device=device)
        index = _flat_token_index(occurrence_rows, [seqs[i].output_token_ids for i in occurrence_rows], vocab, device)
        counts.view(-1).scatter_add_(0, index, torch.ones_like(index, dtype=torch.float32))
        presence = to_device([p.presence_penalty for p in params], torch.float32, device)[:, None]
        frequency = to_device([p.frequency_penalty for p in params], torch.float32, device)[:, None]
        out = out - frequency * counts - presence * (counts > 0)
    return out


def sampling_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The distribution to sample from: temperature, top-k, top-p and min-p applied to processed logits.

    Every row must have temperature > 0 (greedy rows never get here). Returns float32 [rows, vocab]
    probabilities, zero outside the kept set, each row summing to 1.
    """
    params = [s.params for s in seqs]
    device = logits.device
    if any(p.temperature != 1.0 for p in params):
        logits = logits / to_device([p.temperature for p in params], torch.float32, device)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf what top-k and then top-p drop."""
    if all(p.top_k > 0 and p.top_p >= 1.0 for p in params):
        # Top-k alone needs only the k largest per row, far cheaper than sorting the whole vocabulary.
        values, order = logits.topk(min(max(p.top_k for p in params), logits.shape[-1]), dim=-1)
        return torch.full_like(logits, float("-inf")).scatter_(-1, order, _mask_beyond_top_k(values, params))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if any(p.top_k > 0 for p in params):
        sorted_logits = _mask_beyond_top_k(sorted_logits, params)
    if any(p.top_p < 1.0 for p in params):
        probs = sorted_logits.softmax(dim=-1)
        # A token stays while the mass strictly before it is below top_p: the smallest prefix whose
        # mass reaches top_p, and the top token (mass before it is exactly 0) always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        # top_p = 1 must keep everything, but rounding can push the cumulative sum to 1 early.
        top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
        sorted_logits = sorted_logits.masked_fill(
            mass_before >= to_device(top_p, torch.float32, logits.device)[:, None], float("-inf")
        )
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _mask_beyond_top_k(sorted_logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """-inf from position top_k on (rows sorted descending). By position rather than by the k-th value,
    so ties at the boundary still keep exactly k."""
    width = sorted_logits.shape[-1]
    top_k = to_device([p.top_k if p.top_k > 0 else width for p in params], torch.long, sorted_logits.device)
    positions = torch.arange(width, device=sorted_logits.device)
    return sorted_logits.masked_fill(positions >= top_k[:, None], float("-inf"))


def _choose_tokens(processed: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    greedy = [s.params.greedy for s in seqs]
    if all(greedy):
        return processed.argmax(dim=-1)
    if not any(greedy):
        return _sample(processed, seqs)
    tokens = processed.argmax(dim=-1)
    sampled_rows = [i for i, g in enumerate(greedy) if not g]
    index = to_device(sampled_rows, torch.long, processed.device)
    sampled = _sample(processed.index_select(0, index), [seqs[i] for i in sampled_rows])
    return tokens.index_copy_(0, index, sampled)


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, needs no
    # normalization or cumulative sums, and lets each row's noise come from its own generator.
    probs = sampling_probs(logits, seqs)
    return (probs / exponential_noise(probs, seqs)).argmax(dim=-1)


def exponential_noise(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Exp(1) noise shaped like probs. A seeded row's noise comes only from its own generator, so its
    samples do not depend on which other requests share the batch."""
    device = probs.device
    seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
    noise = torch.empty_like(probs).exponential_() if len(seeded) < len(seqs) else None
    if seeded:
        pinned = device.type == "cuda"
        host = torch.empty((len(seeded), probs.shape[-1]), dtype=torch.float32, pin_memory=pinned)
        for row, i in enumerate(seeded):
            host[row].exponential_(generator=seqs[i].generator)
        seeded_noise = host.to(device, non_blocking=pinned)
        if noise is None:
            noise = seeded_noise
        else:
            noise.index_copy_(0, to_device(seeded, torch.long, device), seeded_noise)
    # exponential_ can return 0 on some backends; 0/0 on a dropped token would be NaN and win argmax.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


@dataclass
class _LogprobTensors:
    rows: list[int]
    chosen: torch.Tensor  # [len(rows)] logprob of the sampled token
    ranks: torch.Tensor  # [len(rows)]
    top_logprobs: torch.Tensor  # [len(rows), max N]
    top_ids: torch.Tensor  # [len(rows), max N]


def _raw_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]) -> _LogprobTensors | None:
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    if len(rows) < len(seqs):
        index = to_device(rows, torch.long, logits.device)
        logits, token_ids = logits.index_select(0, index), token_ids.index_select(0, index)
    return _logprob_tensors(logits, token_ids, rows, max(seqs[i].params.logprobs for i in rows))


def _logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, rows: list[int], num_top: int) -> _LogprobTensors:
    """Each row's logprob of token_ids[row] under the raw logits, its rank, and the row's num_top best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    # Counted in int32: summing a bool tensor into the default int64 is ~6x slower on CPU (24 vs 4 ms over
    # [256, 32000]), and for prompt logprobs this runs over every prompt row.
    ranks = (logprobs > chosen).sum(dim=-1, dtype=torch.int32) + 1
    top_logprobs, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
    return _LogprobTensors(rows, chosen.squeeze(1), ranks, top_logprobs, top_ids)


def score_tokens(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """Row i's logprob of token_ids[i] (a prompt token, given the tokens before it), with its rank and the row's
    num_top[i] most likely tokens. One copy back to the host."""
    targets = to_device(token_ids, torch.long, logits.device)
    t = _logprob_tensors(logits, targets, list(range(len(token_ids))), max(num_top))
    return _unpack(copy_to_host(_pack(targets, t)), t, num_top).logprobs


def _pack(token_ids: torch.Tensor, t: _LogprobTensors) -> torch.Tensor:
    """Token ids and logprob results in one float64 row, for a single copy. Lossless: ids and ranks
    are far below 2**53, and float32 logprobs widen exactly (tolist() would widen them anyway)."""
    parts = (token_ids, t.chosen, t.ranks, t.top_logprobs.flatten(), t.top_ids.flatten())
    return torch.cat([p.to(torch.float64) for p in parts])


def _unpack(values: list[float], t: _LogprobTensors, tops: list[int]) -> SamplerOutput:
    """`values` from _pack: the token of every row, then the logprobs of rows t.rows, row t.rows[j] with its
    tops[j] best alternatives."""
    num_lp, num_top = len(t.rows), t.top_ids.shape[-1]
    num_rows = len(values) - num_lp * (2 + 2 * num_top)
    tokens = [int(v) for v in values[:num_rows]]
    chosen = values[num_rows : num_rows + num_lp]
    ranks = values[num_rows + num_lp : num_rows + 2 * num_lp]
    top_start = num_rows + 2 * num_lp
    top_logprobs = values[top_start : top_start + num_lp * num_top]
    top_ids = values[top_start + num_lp * num_top :]
    outputs: list[TokenLogprob | None] = [None] * num_rows
    for j, (i, n) in enumerate(zip(t.rows, tops)):
        first = j * num_top
        # Tokens a grammar forbids (-inf) are no alternatives: top lists only tokens the row could have sampled.
        top = [(int(tok), lp) for tok, lp in zip(top_ids[first : first + n], top_logprobs[first : first + n])
               if lp != float("-inf")]
        outputs[i] = TokenLogprob(token_id=tokens[i], logprob=chosen[j], rank=int(ranks[j]), top=top)
    return SamplerOutput(tokens, outputs)


def _flat_token_index(
    rows: list[int], token_lists: list[Iterable[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """row * vocab + token for every token of token_lists[j] in batch row rows[j]: the positions of
    those (row, token) pairs in the flattened [rows, vocab] logits."""
    tokens = [list(t) for t in token_lists]
    lengths = [len(t) for t in tokens]
    # output_size is known on the host, so the device never has to report it back (no sync).
    row_index = torch.repeat_interleave(
        to_device(rows, torch.long, device), to_device(lengths, torch.long, device), output_size=sum(lengths)
    )
    return row_index * vocab + to_device(list(chain.from_iterable(tokens)), torch.long, device)
