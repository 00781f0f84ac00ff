"""Random paged-attention batches on the device, shaped like an engine step.

Blocks are handed out in a random order, as in a pool that has served many requests, so a sequence's
blocks are scattered over the cache. Tensors are drawn on the device itself: the timing part's largest
cache (256 sequences x 8k tokens of an 8-KV-head, 128-dim layer, K and V) is 8 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from kernels.interface import BatchLayout

from .shapes import AttentionShape

# Scores q.k/sqrt(d) of unit-variance data have unit variance, and softmax over thousands of keys is then
# nearly flat: the output is a tiny average that hides a missing or extra key. Wider scores make a few keys
# dominate, so an indexing or masking error moves the output by O(1).
Q_SCALE = 2.0


@dataclass
class PagedBatch:
    query_lens: list[int]
    context_lens: list[int]
    q: torch.Tensor  # [num_tokens, heads, dim]
    k_new: torch.Tensor  # [num_tokens, kv_heads, dim]: this step's keys, for the backends to write
    v_new: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64

    @property
    def device(self) -> torch.device:
        return self.q.device

    def layout(self) -> BatchLayout:
        return BatchLayout(self.query_lens, self.context_lens, self.block_tables, self.slot_mapping,
                           self.k_cache.shape[1])

    def seq_lens(self) -> torch.Tensor:
        return _int32(self.context_lens, self.device)

    def query_start(self) -> torch.Tensor:
        return _int32([0, *accumulate(self.query_lens)], self.device)

    def seqs(self, decodes: bool) -> torch.Tensor:
        """int32 indices of the decode sequences (query length 1), or of the prefill chunks."""
        return _int32([i for i, n in enumerate(self.query_lens) if (n == 1) == decodes], self.device)

    def rows(self, decodes: bool) -> torch.Tensor:
        """The flat token rows of the decodes, or of the prefill chunks, in sequence order."""
        starts = [0, *accumulate(self.query_lens)]
        return torch.tensor([r for i, n in enumerate(self.query_lens) if (n == 1) == decodes
                             for r in range(starts[i], starts[i] + n)], device=self.device)


def random_batch(shape: AttentionShape, seqs: list[tuple[int, int]], block_size: int, dtype: torch.dtype,
                 device: torch.device, seed: int, new_in_cache: bool) -> PagedBatch:
    """Sequences of (cached, new) tokens in a cache of exactly the blocks they need plus one spare.

    new_in_cache: the new tokens' K/V already sit in their slots (what the attention kernels expect after the
    KV write), so a backend's write is a no-op; otherwise their slots hold other random values that the
    write must replace."""
    gen = torch.Generator(device=device).manual_seed(seed)
    needed = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    spare = order.pop()  # padding entries of the block tables point at a block no sequence owns
    tables, slots = [], []
    for (cached, new), count in zip(seqs, needed):
        table = [order.pop() for _ in range(count)]
        tables.append(table + [spare] * (max(needed) - count))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    kv_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    slot_mapping = torch.tensor(slots, device=device)
    tokens = len(slots)
    if new_in_cache:
        k_new = k_cache.view(-1, *kv_shape[2:])[slot_mapping].clone()
        v_new = v_cache.view(-1, *kv_shape[2:])[slot_mapping].clone()
    else:
        k_new = torch.randn(tokens, *kv_shape[2:], generator=gen, device=device, dtype=dtype)
        v_new = torch.randn(tokens, *kv_shape[2:], generator=gen, device=device, dtype=dtype)
    q = torch.randn(tokens, shape.num_heads, shape.head_dim, generator=gen, device=device) * Q_SCALE
    return PagedBatch([n for _, n in seqs], [c + n for c, n in seqs], q.to(dtype), k_new, v_new, k_cache, v_cache,
                      torch.tensor(tables, device=device), slot_mapping)


class DecodePool:
    """One large random cache shared by every timing point of a shape; each point takes a random set of its
    blocks for its sequences."""

    def __init__(self, shape: AttentionShape, max_batch: int, max_context: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape = shape
        self.block_size = block_size
        self.gen = torch.Generator(device=device).manual_seed(seed)
        num_blocks = max_batch * -(-max_context // block_size)
        kv_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        self.k_cache = torch.randn(kv_shape, generator=self.gen, device=device, dtype=dtype)
        self.v_cache = torch.randn(kv_shape, generator=self.gen, device=device, dtype=dtype)
        self.order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))

    def decode_batch(self, batch: int, context: int) -> PagedBatch:
        """`batch` sequences decoding their token at position context - 1."""
        shape, bs, device = self.shape, self.block_size, self.k_cache.device
        per_seq = -(-context // bs)
        tables = self.order[: batch * per_seq].view(batch, per_seq)
        last = context - 1
        slots = tables[:, last // bs] * bs + last % bs
        dtype = self.k_cache.dtype
        q = torch.randn(batch, shape.num_heads, shape.head_dim, generator=self.gen, device=device) * Q_SCALE
        kv_shape = (batch, shape.num_kv_heads, shape.head_dim)
        k_new = torch.randn(kv_shape, generator=self.gen, device=device, dtype=dtype)
        v_new = torch.randn(kv_shape, generator=self.gen, device=device, dtype=dtype)
        return PagedBatch([1] * batch, [context] * batch, q.to(dtype), k_new, v_new, self.k_cache, self.v_cache,
                          tables.to(device), slots.to(device))


def _int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)
