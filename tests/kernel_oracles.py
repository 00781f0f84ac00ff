"""The torch references (oracles) the Triton kernels are checked against: float32, one sequence at a time,
written from the definitions, with none of the kernels' tiling. tests/test_triton_kernels.py uses them, and so
does the GPU suite's correctness part (benchmarks/gpusuite/correctness.py), which puts tests/ on its path."""

from __future__ import annotations

import torch

from kernels.kv_write import write_kv


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    decode_seqs: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """What paged_decode_attention computes, in float32 torch: [len(decode_seqs), num_heads, head_dim]."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    rows = []
    for seq in decode_seqs.tolist():
        ctx = int(seq_lens[seq])
        first = 0 if sliding_window is None else max(0, ctx - sliding_window)
        pos = torch.arange(first, ctx, device=q.device)
        blocks = block_tables[seq, pos // block_size]
        k = k_cache[blocks, pos % block_size].float()  # [keys, kv_heads, dim]
        v = v_cache[blocks, pos % block_size].float()
        query = q[int(query_start[seq])].float().view(num_kv_heads, -1, q.shape[-1])  # [kv_heads, group, dim]
        probs = (torch.einsum("hgd,khd->hgk", query, k) * scale).softmax(-1)
        rows.append(torch.einsum("hgk,khd->hgd", probs, v).reshape(q.shape[1:]))
    return torch.stack(rows) if rows else q.new_zeros(0, *q.shape[1:], dtype=torch.float32)


def paged_extend_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    prefill_seqs: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> dict[int, torch.Tensor]:
    """What paged_extend_attention computes, in float32 torch: {sequence: [query_len, num_heads, head_dim]}."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    result = {}
    for seq in prefill_seqs.tolist():
        ctx = int(seq_lens[seq])
        first, end = int(query_start[seq]), int(query_start[seq + 1])
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[seq, pos // block_size]
        k = k_cache[blocks, pos % block_size].float()  # [ctx, kv_heads, dim]
        v = v_cache[blocks, pos % block_size].float()
        query = q[first:end].float().unflatten(1, (num_kv_heads, -1))  # [q_len, kv_heads, group, dim]
        q_pos = torch.arange(ctx - (end - first), ctx, device=q.device)[:, None]
        visible = pos[None, :] <= q_pos
        if sliding_window is not None:
            visible &= pos[None, :] > q_pos - sliding_window
        scores = torch.einsum("qhgd,khd->hgqk", query, k) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        result[seq] = torch.einsum("hgqk,khd->qhgd", probs, v).flatten(1, 2)
    return result


def write_kv_reference(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """What write_kv_triton does, in torch: the index_copy_ write, for the tokens with a slot."""
    keep = slot_mapping >= 0
    write_kv(k_cache, v_cache, k[keep], v[keep], slot_mapping[keep])
