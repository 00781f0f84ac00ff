"""Paged decode attention in Triton: one query token per sequence, K/V read through the block table.

Split-KV (flash-decoding): stage 1 runs one program per (sequence, KV head, split); it owns the whole
GQA group of that KV head, so each K/V tile is loaded once for all the query heads that share it. Each
program walks its slice of the context in tiles with an online softmax and leaves a normalized partial
output and its log-sum-exp; stage 2 merges a row's splits weighted by exp(lse - max lse). With a
single split stage 1 writes the output directly.

The split count is a launch parameter (at most MAX_SPLITS, the size of the partial buffers), and each
sequence divides its own attended range by it on the device, so one count is valid for any context
length: a CUDA graph can be captured with a fixed count and replayed as contexts grow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import dot_config, load_kv_tile, next_pow2

MAX_SPLITS = 16
# A split shorter than this costs more in partial-result traffic and the merge than it gains.
MIN_KEYS_PER_SPLIT = 128
BLOCK_N = 64  # keys per tile
NO_WINDOW = 1 << 30  # a window wider than any context


def choose_num_splits(
    num_decodes: int, num_kv_heads: int, max_context: int, num_sms: int, min_keys: int = MIN_KEYS_PER_SPLIT
) -> int:
    """Enough programs for about two waves over num_sms, but no split shorter than min_keys."""
    if num_decodes == 0:
        return 1
    by_occupancy = triton.cdiv(2 * num_sms, num_decodes * num_kv_heads)
    by_length = triton.cdiv(max_context, min_keys)
    return max(1, min(MAX_SPLITS, by_occupancy, by_length))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, decode_seqs_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale, window, num_splits,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    stride_ot, stride_oh, stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(decode_seqs_ptr + i)
    row = tl.load(query_start_ptr + seq)
    ctx = tl.load(seq_lens_ptr + seq)
    # The query sits at ctx - 1 and sees keys ctx - window .. ctx - 1; splits divide that range in
    # whole tiles, so trailing splits of a short range are empty.
    lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    # NOTE: every tile starts below `end`, so it holds at least one live key and m stays finite.
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kv_head, d, d_mask,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    # An empty split (no tile ran) leaves l = 0: it reports lse = -inf and a zero output, never 0/0.
    safe_l = tl.where(l > 0, l, 1.0)
    o = acc / safe_l[:, None]
    if SINGLE_SPLIT:
        dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part = part_out_ptr + i * stride_pr + heads[:, None] * stride_ph + split * stride_ps + d[None, :]
        tl.store(part, o, mask=q_mask)
        lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
        tl.store(part_lse_ptr + i * stride_lr + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, query_start_ptr, decode_seqs_ptr, out_ptr, num_splits,
    stride_pr, stride_ph, stride_ps, stride_lr, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_ptr + tl.load(decode_seqs_ptr + i))
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + i * stride_lr + head * stride_lh + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: weights 0, not exp(-inf + inf)
    w = tl.exp(lse - top)
    mask = s_mask[:, None] & (d < HEAD_DIM)[None, :]
    parts = part_out_ptr + i * stride_pr + head * stride_ph + s[:, None] * stride_ps + d[None, :]
    part = tl.load(parts, mask=mask, other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def alloc_partials(rows: int, num_heads: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV scratch for `rows` decodes: ([rows, heads, MAX_SPLITS, head_dim], [rows, heads, MAX_SPLITS]) fp32."""
    return (
        torch.empty(rows, num_heads, MAX_SPLITS, head_dim, dtype=torch.float32, device=device),
        torch.empty(rows, num_heads, MAX_SPLITS, dtype=torch.float32, device=device),
    )


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    decode_seqs: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int = BLOCK_N,
) -> None:
    """Write out[query_start[s]] for each sequence s in decode_seqs (whose single query is its last token).

    q/out: [num_tokens, num_heads, head_dim]; k_cache/v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables: [num_seqs, max_blocks]; seq_lens (context lengths), query_start
    ([num_seqs + 1]) and decode_seqs are int32. partials: from alloc_partials, at least len(decode_seqs) rows.
    """
    num_decodes = decode_seqs.numel()
    if num_decodes == 0:
        return
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(2), out  # never touched: stage 1 writes `out` directly
    else:
        part_out, part_lse = partials or alloc_partials(num_decodes, num_heads, head_dim, q.device)
    dot_dtype, precision = dot_config(k_cache.dtype)
    block_d = next_pow2(head_dim, 16)
    _decode_split_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, decode_seqs,
        out, part_out, part_lse,
        scale, sliding_window or NO_WINDOW, num_splits,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=next_pow2(group, 16), BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=k_cache.shape[1], SINGLE_SPLIT=num_splits == 1,
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_decodes, num_heads)](
            part_out, part_lse, query_start, decode_seqs, out, num_splits,
            *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
        )
