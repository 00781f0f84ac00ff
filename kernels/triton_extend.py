"""Paged prefill/extend attention in Triton: the query tokens of prefill chunks over their cached
history plus the chunk itself (already in the cache), flash-attention style over the block table.

One program per (tile of query tokens, sequence, KV head). A program's query tile packs BLOCK_Q
consecutive tokens times the whole GQA group into one [BLOCK_Q * BLOCK_G, head_dim] matrix, so each
K/V tile read through the block table feeds every query head that shares it. Query i of a chunk of
length L in a context of length C sits at position C - L + i; key tiles outside the tile's causal and
sliding-window span are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import dot_config, load_kv_tile, next_pow2
from kernels.triton_decode import NO_WINDOW

BLOCK_N = 64  # keys per tile
QUERY_ROWS = 64  # query rows (tokens x group heads) per program


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, prefill_seqs_ptr, out_ptr,
    scale, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_start = tl.program_id(0) * BLOCK_Q  # axis 0: the only one whose size may pass 65535
    seq = tl.load(prefill_seqs_ptr + tl.program_id(1))
    kv_head = tl.program_id(2)
    first_row = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - first_row
    if tile_start >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq)

    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    token = tile_start + r // BLOCK_G
    g = r % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    row_mask = (token < q_len) & (g < GROUP)
    d_mask = d < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask[None, :]
    heads = kv_head * GROUP + g
    rows = first_row + token
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    q_pos = ctx - q_len + token

    # Keys this tile can see: from the first query's window start to the last query's position.
    first_pos = ctx - q_len + tile_start
    lo = tl.maximum(first_pos - window + 1, 0)
    hi = tl.minimum(first_pos + BLOCK_Q, ctx)

    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kv_head, d, d_mask,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None]) & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row may see nothing in this tile (outside its window, or a padding row) while m is still
        # -inf; subtracting 0 instead keeps exp(-inf - -inf) = NaN out of the sums.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    dst = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_extend_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    prefill_seqs: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    block_n: int = BLOCK_N,
) -> None:
    """Write out[query_start[s]:query_start[s + 1]] for each sequence s in prefill_seqs.

    Shapes as in paged_decode_attention; max_query_len bounds the query lengths of prefill_seqs (it sizes
    the grid; tiles past a sequence's own length exit at once).
    """
    if prefill_seqs.numel() == 0:
        return
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_g = next_pow2(group)
    block_q = max(1, QUERY_ROWS // block_g)  # rows = max(QUERY_ROWS, block_g) >= 16, tl.dot's minimum
    dot_dtype, precision = dot_config(k_cache.dtype)
    grid = (triton.cdiv(max_query_len, block_q), prefill_seqs.numel(), num_kv_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, prefill_seqs, out,
        scale, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=next_pow2(head_dim, 16),
        BLOCK_Q=block_q, BLOCK_N=block_n, PAGE=k_cache.shape[1],
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
