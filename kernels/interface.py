"""The attention-backend interface: what every backend implements and what the engine hands it.

A backend turns a step's batch description into whatever metadata it needs (once per step, in
`plan`), then computes attention for every layer from that metadata (`forward`). The model code only
sees this interface, so the device picks the implementation: the SDPA reference on CPU, paged Triton
kernels on GPU. Kernels never import the engine; everything they need arrives in BatchLayout. The
backends import this module and nothing that chooses among them (kernels/backend.py), so no import
runs in a cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Describes one step's batch. Tokens are flat: sequence i owns rows query_start[i] .. query_start[i] + query_lens[i].

    query_lens[i]: new tokens of sequence i this step (1 for a decode, the chunk size for a prefill chunk).
    context_lens[i]: tokens of sequence i whose K/V are in the cache once this step's are written.
    block_tables: [num_seqs, max_blocks] int64 physical block ids (padding entries are never read).
    slot_mapping: [num_tokens] int64 cache slot (block_id * block_size + offset) of each new token.
    seq_lens, query_start: optional int32 device copies of context_lens and of the first row of each
    sequence ([num_seqs + 1]), for callers that already uploaded them: plan() then need not copy them.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int
    seq_lens: torch.Tensor | None = None
    query_start: torch.Tensor | None = None

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
    name: str = ""  # its key in kernels.backend.BACKENDS
    selection_reason: str = ""  # set by get_attention_backend

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

    def compile_decode(self, enable: bool = True) -> bool:
        """Switch decodes to (or, enable=False, back from) a compiled kernel where the backend has one (the SDPA
        backend: C++ built for this CPU); the engine calls this when it compiles the model. True if decodes now
        use it."""
        return False

    def cuda_graph_unsupported(self) -> str | None:
        """None if plan_graph_decode() works, else why this backend cannot run inside a CUDA graph."""
        return f"the {self.name} attention backend does not support CUDA graphs"

    def plan_graph_decode(
        self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_context_len: int
    ) -> Any:
        """Metadata for a batch of single-token decodes (sequence i owns row i) that a CUDA graph captures
        once and then replays with new contents in these same device tensors. So nothing in it may depend
        on the values in them: every launch is fixed by the batch size and max_context_len alone.
        slot_mapping [B] int64, block_tables [B, max_blocks] int64, seq_lens [B] int32."""
        raise NotImplementedError(self.cuda_graph_unsupported())
