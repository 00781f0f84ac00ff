"""Writing new keys/values into the paged cache through the slot mapping."""

from __future__ import annotations

import torch


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; k/v: [num_tokens, num_kv_heads, head_dim].

    A cache slot is block_id * block_size + offset, so the cache viewed as [num_slots, heads, dim] is
    indexed by the slot mapping directly.
    """
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
