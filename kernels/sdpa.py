"""Reference attention backend: gather each sequence's context from the paged cache, then one masked SDPA call.

This is the CPU path and the oracle the fast GPU kernels are tested against.

Sequences are split into groups per step: decodes (one query each) apart from prefill chunks, because
padding every decode to the longest chunk's query length would multiply the decode work by that
length (a step mixing 60 decodes with one 512-token chunk is the common case under continuous
batching); and within each kind, by length, so that short contexts are not padded to the longest.

Where the engine compiles the model (CPU), it also turns on `compile_decode`: every decode of a step then goes
through one C++ kernel that reads the paged cache in place (kernels/cpu_decode.py), and only prefill chunks are
grouped as above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from kernels.cpu_decode import NativeDecode
from kernels.interface import AttentionBackend, BatchLayout, segment_offsets
from kernels.kv_write import write_kv
from kernels.transfer import to_device, upload

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _sdpa_has_enable_gqa() -> bool:
    # enable_gqa arrived in torch 2.5; older builds need the KV heads repeated.
    q = torch.zeros(1, 2, 1, 4)
    kv = torch.zeros(1, 1, 1, 4)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


@dataclass
class _Group:
    num_seqs: int
    max_q: int  # padded query length (1 for the decode group)
    max_ctx: int  # padded key length
    rows: torch.Tensor  # [tokens_in_group] rows of the flat token array, in group order
    pad_index: torch.Tensor  # [tokens_in_group] row of each token in the padded [num_seqs * max_q] layout
    kv_blocks: torch.Tensor  # [num_seqs * blocks] the cache blocks holding keys 0 .. max_ctx - 1 of each sequence
    query_pos: torch.Tensor  # [num_seqs, max_q] absolute position of each query (0 for padding rows)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """[num_seqs, 1, max_q, max_ctx] bool, True = attend. Built once per step per window size."""
        if window not in self.masks:
            key_pos = torch.arange(self.max_ctx, device=self.query_pos.device)
            q = self.query_pos.unsqueeze(-1)
            # NOTE: causality by absolute position also masks key padding, because every real query sits
            # at a position below its sequence's context length; a padding query row sits at 0 and so
            # still sees key 0, which keeps softmax free of all-masked rows.
            allowed = key_pos <= q
            if window is not None:
                allowed &= key_pos > q - window
            self.masks[window] = allowed.unsqueeze(1)
        return self.masks[window]


@dataclass
class _DecodeBatch:
    """Every decode of a step, for the C++ kernel."""

    rows: torch.Tensor  # [seqs] the decode's row in the flat token array
    block_tables: torch.Tensor  # [seqs, blocks] covering the longest context
    context_lens: torch.Tensor  # [seqs]


@dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor
    groups: list[_Group]
    decode: _DecodeBatch | None = None


def _build_decode(layout: BatchLayout, seq_idx: list[int], query_start: list[int], device) -> _DecodeBatch:
    blocks = -(-max(layout.context_lens[i] for i in seq_idx) // layout.block_size)
    tables = layout.block_tables.index_select(0, to_device(seq_idx, torch.long, layout.block_tables.device))
    return _DecodeBatch(
        rows=to_device([query_start[i] for i in seq_idx], torch.long, device),
        block_tables=tables[:, :blocks].to(device).contiguous(),
        context_lens=to_device([layout.context_lens[i] for i in seq_idx], torch.long, device),
    )


def _build_group(layout: BatchLayout, seq_idx: list[int], query_start: list[int], device: torch.device) -> _Group:
    # Index arithmetic runs on the host from Python lists (no device sync); only the block lookup in the
    # block tables runs where the tables live.
    q_lens = torch.tensor([layout.query_lens[i] for i in seq_idx], dtype=torch.long)
    ctx_lens = torch.tensor([layout.context_lens[i] for i in seq_idx], dtype=torch.long)
    starts = torch.tensor([query_start[i] for i in seq_idx], dtype=torch.long)
    num_seqs = len(seq_idx)
    max_q = max(layout.query_lens[i] for i in seq_idx)
    max_ctx = max(layout.context_lens[i] for i in seq_idx)

    seq_of_token, offset = segment_offsets(q_lens)
    rows = starts[seq_of_token] + offset
    pad_index = seq_of_token * max_q + offset

    query_pos = torch.zeros(num_seqs, max_q, dtype=torch.long)
    query_pos.view(-1)[pad_index] = (ctx_lens - q_lens)[seq_of_token] + offset

    # Whole blocks are gathered (one contiguous copy of block_size * heads * dim values each, rather than one per
    # key); forward() cuts each sequence's keys back to max_ctx.
    num_blocks = -(-max_ctx // layout.block_size)
    tables = layout.block_tables.index_select(0, to_device(seq_idx, torch.long, layout.block_tables.device))
    kv_blocks = tables[:, :num_blocks].reshape(-1)

    return _Group(
        num_seqs=num_seqs,
        max_q=max_q,
        max_ctx=max_ctx,
        rows=upload(rows, device),
        pad_index=upload(pad_index, device),
        kv_blocks=kv_blocks.to(device),
        query_pos=upload(query_pos, device),
    )


# A group's padded work is num_seqs * max_q * max_ctx. Sequences are grouped by descending length and
# a new group starts once a sequence is shorter than this fraction of the group's longest, which bounds
# the padding waste per sequence; each extra group costs one more SDPA call per layer.
_MIN_FILL = 0.6
_MIN_GROUP = 4  # fewer sequences than this are not worth their own call


def _split_by_length(seq_idx: list[int], layout: BatchLayout) -> list[list[int]]:
    if not seq_idx:
        return []
    ordered = sorted(seq_idx, key=lambda i: (layout.context_lens[i], layout.query_lens[i]), reverse=True)
    groups: list[list[int]] = [[ordered[0]]]
    for i in ordered[1:]:
        head = groups[-1][0]
        short = layout.context_lens[i] < _MIN_FILL * layout.context_lens[head] or (
            layout.query_lens[i] < _MIN_FILL * layout.query_lens[head]
        )
        if short and len(groups[-1]) >= _MIN_GROUP:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def __init__(self) -> None:
        self.decode_kernel: NativeDecode | None = None

    def compile_decode(self, enable: bool = True) -> bool:
        self.decode_kernel = None
        if enable:
            try:
                self.decode_kernel = NativeDecode()
            except (RuntimeError, OSError) as exc:  # no compiler, or it failed: the gather path still serves
                logger.warning("the C++ decode attention kernel is unavailable (%s); decodes use gather + SDPA", exc)
        return self.decode_kernel is not None

    def cuda_graph_unsupported(self) -> str | None:
        return ("the sdpa attention backend gathers each step's K/V into tensors shaped by that step's context "
                "lengths, which a CUDA graph cannot replay")

    def plan(self, layout: BatchLayout) -> SdpaMetadata:
        device = layout.slot_mapping.device
        query_start = [0]
        for n in layout.query_lens[:-1]:
            query_start.append(query_start[-1] + n)
        decodes = [i for i, n in enumerate(layout.query_lens) if n == 1]
        prefills = [i for i, n in enumerate(layout.query_lens) if n > 1]
        decode = None
        if self.decode_kernel is not None and decodes:
            decode, decodes = _build_decode(layout, decodes, query_start, device), []
        groups = [
            _build_group(layout, idx, query_start, device)
            for kind in (decodes, prefills)
            for idx in _split_by_length(kind, layout)
        ]
        return SdpaMetadata(slot_mapping=layout.slot_mapping, groups=groups, decode=decode)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: SdpaMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        write_kv(k_cache, v_cache, k, v, metadata.slot_mapping)
        num_heads, head_dim = q.shape[1:]
        kv_heads = k_cache.shape[-2]
        # Per model, not per group: let SDPA broadcast KV heads where the torch build can, else repeat them.
        repeat = 1 if kv_heads == num_heads or _sdpa_has_enable_gqa() else num_heads // kv_heads
        extra = {"enable_gqa": True} if kv_heads != num_heads and repeat == 1 else {}
        out = torch.empty_like(q)
        if (d := metadata.decode) is not None:
            od = self.decode_kernel(q.index_select(0, d.rows), k_cache, v_cache, d.block_tables, d.context_lens,
                                    scale, sliding_window)
            out.index_copy_(0, d.rows, od)
        for g in metadata.groups:
            q_rows = q.index_select(0, g.rows)
            if g.max_q > 1:
                padded = q.new_zeros(g.num_seqs * g.max_q, num_heads, head_dim)
                padded.index_copy_(0, g.pad_index, q_rows)
                q_rows = padded
            qg = q_rows.view(g.num_seqs, g.max_q, num_heads, head_dim).transpose(1, 2)
            kv_shape = (g.num_seqs, -1, kv_heads, head_dim)  # [seqs, blocks * block_size, heads, dim]
            kg = k_cache.index_select(0, g.kv_blocks).view(kv_shape)[:, :g.max_ctx].transpose(1, 2)
            vg = v_cache.index_select(0, g.kv_blocks).view(kv_shape)[:, :g.max_ctx].transpose(1, 2)
            if repeat > 1:
                kg, vg = kg.repeat_interleave(repeat, dim=1), vg.repeat_interleave(repeat, dim=1)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask(sliding_window), scale=scale, **extra)
            og = og.transpose(1, 2).reshape(g.num_seqs * g.max_q, num_heads, head_dim)
            if g.max_q > 1:
                og = og.index_select(0, g.pad_index)
            out.index_copy_(0, g.rows, og)
        return out
