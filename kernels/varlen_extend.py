"""Prefill/extend attention through torch.nn.attention.varlen.varlen_attn over the paged cache
(FlashAttention with a block table), used instead of the Triton extend kernel where it works.

Whether it works depends on the torch build, the device, the dtype and the block size (FlashAttention
has no fp32 and no CPU kernel, and upstream FlashAttention 2 pages only in multiples of 256 tokens), so
it is feature-detected once per configuration: the API must take a block table, and a small probe run
must match paged_extend_reference. Anything else, an exception included, means "use the Triton kernel".
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

from kernels.transfer import to_device
from kernels.triton_extend import paged_extend_reference

_NEEDED_PARAMS = ("block_table", "seqused_k", "window_size", "enable_gqa", "scale")


@dataclass
class VarlenArgs:
    """The prefill chunks of one step in varlen_attn's terms (int32 on the device)."""

    rows: slice | torch.Tensor  # the chunks' rows of the flat token array
    cu_seq_q: torch.Tensor  # [P + 1]
    cu_seq_k: torch.Tensor  # [P + 1]
    seqused_k: torch.Tensor  # [P] context lengths
    block_table: torch.Tensor  # [P, max_blocks]
    max_q: int
    max_k: int


@functools.lru_cache(maxsize=1)
def varlen_api() -> Callable[..., torch.Tensor] | None:
    """torch's varlen_attn if this torch has the paged form of it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if all(p in params for p in _NEEDED_PARAMS) else None


def build_varlen_args(
    query_lens: list[int], context_lens: list[int], seqs: list[int], query_start: list[int],
    block_tables: torch.Tensor, device: torch.device,
) -> VarlenArgs:
    q_lens = [query_lens[i] for i in seqs]
    k_lens = [context_lens[i] for i in seqs]
    first, last = query_start[seqs[0]], query_start[seqs[-1]] + q_lens[-1]
    if last - first == sum(q_lens):  # consecutive rows (the scheduler puts chunks after the decodes)
        rows: slice | torch.Tensor = slice(first, last)
    else:
        rows = to_device([query_start[i] + j for i, n in zip(seqs, q_lens) for j in range(n)], torch.long, device)
    count = len(seqs)
    # One queued copy for the three int arrays.
    dev = to_device([0, *accumulate(q_lens), 0, *accumulate(k_lens), *k_lens], torch.int32, device)
    index = to_device(seqs, torch.long, block_tables.device)
    return VarlenArgs(
        rows=rows,
        cu_seq_q=dev[: count + 1],
        cu_seq_k=dev[count + 1 : 2 * count + 2],
        seqused_k=dev[2 * count + 2 :],
        block_table=block_tables.index_select(0, index).to(device=device, dtype=torch.int32),
        max_q=max(q_lens),
        max_k=max(k_lens),
    )


def varlen_extend_attention(
    out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, args: VarlenArgs,
    scale: float, sliding_window: int | None,
) -> None:
    """Write the prefill chunks' rows of out, like paged_extend_attention."""
    # FlashAttention's window (left, 0) admits keys p - left .. p: ours of w keys is left = w - 1.
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    result = varlen_api()(
        q[args.rows], k_cache, v_cache, args.cu_seq_q, args.cu_seq_k, args.max_q, args.max_k,
        scale=scale, window_size=window, enable_gqa=q.shape[1] != k_cache.shape[2],
        seqused_k=args.seqused_k, block_table=args.block_table,
    )
    if isinstance(args.rows, slice):
        out[args.rows] = result
    else:
        out.index_copy_(0, args.rows, result)


@functools.lru_cache(maxsize=None)
def varlen_unsupported(
    device: torch.device, dtype: torch.dtype, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> str | None:
    """None if varlen_attn computes paged extend attention correctly for this configuration, else why not."""
    if varlen_api() is None:
        return f"torch {torch.__version__} has no varlen_attn with a block table"
    if device.type != "cuda":
        return f"varlen_attn runs FlashAttention, which has no {device.type} kernel"
    try:
        return _probe(device, dtype, block_size, num_heads, num_kv_heads, head_dim)
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"; the reason is reported
        return f"varlen_attn failed on a probe: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _probe(
    device: torch.device, dtype: torch.dtype, block_size: int, heads: int, kv_heads: int, dim: int
) -> str | None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(11, 6), (0, 5)]  # (cached, new): a chunk with history, a first chunk
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in shapes]
    num_blocks = sum(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(shapes), max(blocks_per_seq), dtype=torch.long)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used : used + n]
        used += n

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    k_cache, v_cache = rand(num_blocks, block_size, kv_heads, dim), rand(num_blocks, block_size, kv_heads, dim)
    q_lens, ctx_lens = [n for _, n in shapes], [c + n for c, n in shapes]
    q = rand(sum(q_lens), heads, dim)
    tables = tables.to(device)
    args = build_varlen_args(q_lens, ctx_lens, [0, 1], [0, q_lens[0]], tables, device)
    seq_lens = torch.tensor(ctx_lens, device=device)
    query_start = torch.tensor([0, q_lens[0], sum(q_lens)], device=device)
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # a wrong mask errs by O(1)
    for window in (None, 3):
        out = torch.zeros_like(q)
        varlen_extend_attention(out, q, k_cache, v_cache, args, dim**-0.5, window)
        ref = paged_extend_reference(q, k_cache, v_cache, tables, seq_lens, query_start, torch.tensor([0, 1]),
                                     dim**-0.5, window)
        err = (out.float() - torch.cat([ref[0], ref[1]])).abs().max().item()
        if not err <= tol:
            return f"varlen_attn disagrees with the reference on a probe (window {window}: max error {err:.3g})"
    return None
