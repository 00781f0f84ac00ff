"""The paged KV cache: a fixed pool of physical blocks (allocated once), shared through reference counts.

Every sequence owns a block table (list of block ids); token t lives in block block_table[t // block_size] at
offset t % block_size. Only a sequence's last block can be partly empty.

With prefix caching, a full block is also registered under the hash of its contents (engine/block_hash.py), and
several sequences with the same prefix point at the same physical block. A block is in exactly one state:
  - in use: reference count > 0;
  - cached: count 0 but holding registered contents; reusable by a later hit, or evicted when the pool needs it;
  - free: count 0 and holding nothing.
Allocation takes free blocks first, then evicts cached ones least recently used first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

import torch

from engine.config import ModelConfig


class BlockPool:
    """Block ids with reference counts, a free stack, an LRU of cached blocks, and the contents -> block table.
    Every operation is O(1) per block."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # NOTE: a stack, so recently freed (cache-warm) blocks are reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # count-0 blocks with contents, oldest first
        self._by_hash: dict[bytes, int] = {}
        self._hash: dict[int, bytes] = {}  # block -> its hash, for the registered blocks
        self._key: dict[int, Hashable] = {}  # block -> what its hash was computed from, to confirm a hit

    # ---- counts ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones (which it would evict)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks not in use that still hold reusable contents."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Blocks in use / total, in [0, 1] (cached blocks are reclaimable, so they do not count)."""
        return self.num_used / self.num_blocks

    # ---- allocation -----------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"KV pool exhausted: asked for {n} blocks, {self.num_free} free")
        taken = self._free[len(self._free) - n:] if n <= len(self._free) else list(self._free)
        del self._free[len(self._free) - len(taken):]
        while len(taken) < n:
            block, _ = self._cached.popitem(last=False)  # evict the least recently used
            self._forget(block)
            taken.append(block)
        for block in taken:
            self._ref[block] = 1
        return taken

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. A block whose count reaches 0 stays cached if it holds registered
        contents (pass a sequence's blocks tail first, so the tail of a chain is evicted before its head)."""
        for block in block_ids:
            if self._ref[block] <= 0:
                raise RuntimeError(f"KV block {block} freed more often than it was taken")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- prefix caching -------------------------------------------------------------------------

    def register(self, block: int, block_hash: bytes, key: Hashable) -> None:
        """Record a full, computed block's contents. If equal contents are registered already (two sequences
        computed the same prefix at once), the first stays the one that is found; this one is left as it is."""
        if block in self._hash or block_hash in self._by_hash:
            return
        self._by_hash[block_hash] = block
        self._hash[block] = block_hash
        self._key[block] = key

    def lookup(self, block_hash: bytes, key: Hashable) -> int | None:
        """The block holding these contents, or None. A hash match alone is not enough: the key it was computed
        from (parent hash, token ids, salt) must be equal too, so a collision can never serve another's KV."""
        block = self._by_hash.get(block_hash)
        if block is None or self._key[block] != key:
            return None
        return block

    def acquire(self, block: int) -> None:
        """Take a reference to a block found by lookup (reviving it if it was only cached)."""
        if self._ref[block] == 0:
            del self._cached[block]
        self._ref[block] += 1

    def _forget(self, block: int) -> None:
        del self._by_hash[self._hash.pop(block)]
        del self._key[block]


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """K and V, every layer, one block. num_kv_heads: a tensor-parallel rank's own (None: the model's)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * (num_kv_heads or model.num_kv_heads) * model.head_dim * itemsize


def allocate_kv_tensors(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    num_kv_heads: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads or model.num_kv_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]
