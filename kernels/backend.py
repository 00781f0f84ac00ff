"""The attention-backend interface and its registry.

A backend turns a step's batch description into whatever metadata it needs (once per step, in
`plan`), then computes attention for every layer from that metadata (`forward`). The model code only
sees this interface, so the device picks the implementation: the SDPA reference on CPU, paged Triton
kernels on GPU. Kernels never import the engine; everything they need arrives in BatchLayout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Describes one step's batch. Tokens are flat: sequence i owns rows query_start[i] .. query_start[i] + query_lens[i].

    query_lens[i]: new tokens of sequence i this step (1 for a decode, the chunk size for a prefill chunk).
    context_lens[i]: tokens of sequence i whose K/V are in the cache once this step's are written.
    block_tables: [num_seqs, max_blocks] int64 physical block ids (padding entries are never read).
    slot_mapping: [num_tokens] int64 cache slot (block_id * block_size + offset) of each new token.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


def segment_offsets(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments of the given lengths laid end to end: each element's segment index and its offset
    inside that segment. lengths [3, 1, 2] -> ([0, 0, 0, 1, 2, 2], [0, 1, 2, 0, 0, 1])."""
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(segment.numel(), device=lengths.device) - first[segment]
    return segment, offset


class AttentionBackend(ABC):
    name: str = ""

    @abstractmethod
    def plan(self, layout: BatchLayout) -> Any:
        """Build per-step metadata shared by all layers."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: Any,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Write this step's k/v [num_tokens, num_kv_heads, head_dim] into the paged cache, then attend the
        queries q [num_tokens, num_heads, head_dim] over each sequence's cached context, causally by absolute
        position. Returns [num_tokens, num_heads, head_dim]. With sliding_window w, a query at position p
        sees keys at positions p - w < key <= p."""


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """name=None picks the device default. The SDPA path is the default everywhere until a faster one is registered."""
    from kernels import sdpa  # noqa: F401  (registers the reference backend)

    if name is None:
        name = "sdpa"
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    return _REGISTRY[name]()
