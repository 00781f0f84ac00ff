"""Decode attention read straight from the paged KV cache: one fused loop nest that inductor compiles (CPU).

Why: for a decode (one query per sequence) the SDPA path first copies every sequence's blocks into a dense
[seqs, keys] tensor, then SDPA runs one tiny matrix-vector product per (sequence, head), which costs more in
set-up than in arithmetic. Written instead as broadcast products and sums over `k_cache[block_tables]`, the
gather becomes indirect loads inside inductor's reduction loops: nothing is copied, and the whole batch is one
kernel call per layer. docs/benchmarks.md has the measurements.

Layout choices, for the loops inductor generates:
- scores are [seqs, keys, kv_heads, group], each a dot product over the head dimension, so a sequence's keys are
  read once, in cache order;
- values are reduced per block first (the block's keys), then over blocks, so each block's values stay in L1
  while every head and head-dim lane reads them.

Sequences are padded to the batch's longest block table; keys past a sequence's context (and before its window)
are masked to -inf, so they weigh exactly zero. Every table entry is a valid block and the cache holds finite
values (it starts zeroed), so the masked reads are harmless.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_MIN_SIZE = 2  # dynamo specializes a dimension of size 1; padding to 2 keeps one graph for every batch
_fallback_calls = 0  # calls that ran uncompiled (see _gathered_decode); tests assert none did


def fallback_calls() -> int:
    return _fallback_calls


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """q [B, heads, dim], one query per sequence at position context_lens[b] - 1; caches [blocks, block_size,
    kv_heads, dim]; block_tables [B, M] int64; context_lens [B] int. Returns [B, heads, dim] in q's dtype."""
    if not torch.compiler.is_compiling():
        return _gathered_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    seqs, heads, dim = q.shape
    blocks, block_size, kv_heads = block_tables.shape[1], k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    keys = k_cache[block_tables].view(seqs, blocks * block_size, kv_heads, 1, dim)
    scores = (q.view(seqs, 1, kv_heads, group, dim).float() * keys.float()).sum(-1) * scale
    key_pos = torch.arange(blocks * block_size, device=q.device).view(1, -1, 1, 1)
    last = context_lens.view(-1, 1, 1, 1).long()
    valid = key_pos < last
    if sliding_window is not None:
        valid = valid & (key_pos >= last - sliding_window)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
    probs = probs.view(seqs, blocks, block_size, kv_heads, group, 1)
    values = v_cache[block_tables].view(seqs, blocks, block_size, kv_heads, 1, dim)
    out = (probs * values.float()).sum(2).sum(1)
    return out.view(seqs, heads, dim).to(q.dtype)


def _gathered_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window) -> torch.Tensor:
    """The same attention by gather + SDPA. Runs only where dynamo ran decode_attention uncompiled (past its
    recompile limit, many engines in one process), where the broadcast form would materialise every product."""
    global _fallback_calls
    if _fallback_calls == 0:
        logger.warning("compiled decode attention is running uncompiled (dynamo's recompile limit?); it falls back "
                       "to gather + SDPA, which is correct but slower")
    _fallback_calls += 1
    seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache[block_tables].view(seqs, -1, kv_heads, dim).transpose(1, 2)
    values = v_cache[block_tables].view(seqs, -1, kv_heads, dim).transpose(1, 2)
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    key_pos = torch.arange(keys.shape[2], device=q.device)
    last = context_lens.view(-1, 1).long()
    allowed = key_pos < last
    if sliding_window is not None:
        allowed &= key_pos >= last - sliding_window
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=allowed.view(seqs, 1, 1, -1),
                                         scale=scale)
    return out.squeeze(2)


class CompiledDecode:
    """decode_attention compiled with only the batch size, the table width and the pool size dynamic, so head
    counts, head size and block size are constants in the generated loops (dynamic=True made them symbolic and the
    kernel about 2x slower). Callers pad the batch and the tables to at least _MIN_SIZE (see pad_decode)."""

    def __init__(self) -> None:
        self._fn = torch.compile(decode_attention, dynamic=False)

    def __call__(self, q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window) -> torch.Tensor:
        for tensor, dims in ((q, (0,)), (k_cache, (0,)), (v_cache, (0,)), (block_tables, (0, 1)), (context_lens, (0,))):
            for d in dims:
                torch._dynamo.mark_dynamic(tensor, d)
        return self._fn(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


def pad_decode(rows: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor):
    """Pad a decode batch to at least _MIN_SIZE sequences and table columns: extra sequences repeat the first
    (their outputs are dropped), extra columns point at block 0 (masked: past every context)."""
    seqs, width = block_tables.shape
    if width < _MIN_SIZE:
        block_tables = F.pad(block_tables, (0, _MIN_SIZE - width))
    if seqs < _MIN_SIZE:
        extra = _MIN_SIZE - seqs
        rows = torch.cat([rows, rows[:1].expand(extra)])
        block_tables = torch.cat([block_tables, block_tables[:1].expand(extra, -1)])
        context_lens = torch.cat([context_lens, context_lens[:1].expand(extra)])
    return rows, block_tables.contiguous(), context_lens
