"""The Triton attention backend: kernels that read the paged KV cache through the block table, with
no gather copy.

plan() turns the step's layout into a few int32 device tensors, once per step, with queued copies
only (the host never waits for the device). forward(), per layer, writes the new K/V, then runs the
decode rows (query length 1) through the split-KV decode kernel and the prefill-chunk rows through the
extend kernel.

plan_graph_decode() plans a pure-decode batch for CUDA-graph capture: its split count comes from the
batch size and max_context_len, not from the step's lengths, so every replay launches exactly what
was captured (the decode kernel divides each sequence's own range by the split count on the device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from kernels.interface import AttentionBackend, BatchLayout
from kernels.triton_decode import MIN_KEYS_PER_SPLIT, alloc_partials, choose_num_splits, paged_decode_attention
from kernels.triton_extend import paged_extend_attention
from kernels.triton_kv_write import write_kv_triton
from kernels.transfer import to_device


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device, off_cuda: int) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return off_cuda


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64
    seq_lens: torch.Tensor  # [num_seqs] int32 context lengths
    query_start: torch.Tensor  # [num_seqs + 1] int32 first row of each sequence
    decode_seqs: torch.Tensor  # [num_decodes] int32 sequences with one query token
    prefill_seqs: torch.Tensor  # [num_prefills] int32 sequences with a prefill chunk
    max_decode_context: int
    max_prefill_query: int
    num_sms: int
    min_keys_per_split: int
    # Split-KV scratch, set by the first layer that needs it. NOTE: held here so that a CUDA graph's
    # metadata keeps the buffers its launches point at alive even if the backend later grows its own.
    partials: tuple[torch.Tensor, torch.Tensor] | None = None
    _splits: dict[int, int] = field(default_factory=dict)

    def num_splits(self, num_kv_heads: int) -> int:
        """Split-KV count for this step's decodes; the same for every layer of a model."""
        if num_kv_heads not in self._splits:
            self._splits[num_kv_heads] = choose_num_splits(
                self.decode_seqs.numel(), num_kv_heads, self.max_decode_context, self.num_sms, self.min_keys_per_split
            )
        return self._splits[num_kv_heads]


class TritonBackend(AttentionBackend):
    name = "triton"
    min_keys_per_split = MIN_KEYS_PER_SPLIT
    # Off CUDA (the interpreter, in tests) there is no SM count; a small one keeps splitting exercised.
    num_sms_off_cuda = 4

    def __init__(self) -> None:
        self._partials: tuple[torch.Tensor, torch.Tensor] | None = None

    def plan(self, layout: BatchLayout) -> TritonMetadata:
        device = layout.slot_mapping.device
        q_lens, ctx_lens = layout.query_lens, layout.context_lens
        query_start = [0, *accumulate(q_lens)]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        prefills = [i for i, n in enumerate(q_lens) if n > 1]
        given = layout.seq_lens is not None and layout.query_start is not None
        # One queued copy for every int array the caller did not upload itself.
        extra = [] if given else [*ctx_lens, *query_start]
        packed = to_device([*decodes, *prefills, *extra], torch.int32, device)
        decode_seqs, prefill_seqs, seq_lens, query_start_t = packed.split(
            [len(decodes), len(prefills), 0 if given else len(ctx_lens), 0 if given else len(query_start)]
        )
        if given:
            seq_lens, query_start_t = layout.seq_lens, layout.query_start
        return TritonMetadata(
            slot_mapping=layout.slot_mapping,
            block_tables=_unit_row_stride(layout.block_tables),
            seq_lens=seq_lens,
            query_start=query_start_t,
            decode_seqs=decode_seqs,
            prefill_seqs=prefill_seqs,
            max_decode_context=max((ctx_lens[i] for i in decodes), default=0),
            max_prefill_query=max((q_lens[i] for i in prefills), default=0),
            num_sms=_num_sms(device, self.num_sms_off_cuda),
            min_keys_per_split=self.min_keys_per_split,
        )

    def cuda_graph_unsupported(self) -> str | None:
        return None

    def plan_graph_decode(
        self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_context_len: int
    ) -> TritonMetadata:
        device = slot_mapping.device
        rows = torch.arange(seq_lens.numel() + 1, dtype=torch.int32, device=device)
        return TritonMetadata(
            slot_mapping=slot_mapping,
            block_tables=_unit_row_stride(block_tables),
            seq_lens=seq_lens,
            query_start=rows,  # one query row per sequence
            decode_seqs=rows[:-1],
            prefill_seqs=rows[:0],
            # The longest context any replay may bring, so the split count suits them all.
            max_decode_context=max_context_len,
            max_prefill_query=0,
            num_sms=_num_sms(device, self.num_sms_off_cuda),
            min_keys_per_split=self.min_keys_per_split,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: TritonMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        write_kv_triton(k_cache, v_cache, k, v, metadata.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty_like(q)
        m = metadata
        if m.decode_seqs.numel():
            splits = m.num_splits(k_cache.shape[2])
            if splits > 1 and m.partials is None:
                m.partials = self._partials_for(m.decode_seqs.numel(), q)
            paged_decode_attention(
                out, q, k_cache, v_cache, m.block_tables, m.seq_lens, m.query_start, m.decode_seqs,
                scale, sliding_window, splits, m.partials if splits > 1 else None,
            )
        if m.prefill_seqs.numel():
            paged_extend_attention(
                out, q, k_cache, v_cache, m.block_tables, m.seq_lens, m.query_start, m.prefill_seqs,
                m.max_prefill_query, scale, sliding_window,
            )
        return out

    def _partials_for(self, rows: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Grow-only, so steady-state decoding allocates nothing and the buffers keep their addresses.
        num_heads, head_dim = q.shape[1:]
        part = self._partials
        if part is None or part[0].shape[0] < rows or part[0].shape[1] != num_heads or part[0].shape[3] != head_dim:
            self._partials = part = alloc_partials(rows, num_heads, head_dim, q.device)
        return part


def _unit_row_stride(block_tables: torch.Tensor) -> torch.Tensor:
    # The kernels step along a row by 1 and take the row stride as an argument, so a column slice of a
    # wider table (the runner's preallocated one) needs no copy.
    return block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
