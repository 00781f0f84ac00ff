"""The attention-backend interface and its registry.

A backend turns a step's batch description into whatever metadata it needs (once per step, in
`plan`), then computes attention for every layer from that metadata (`forward`). The model code only
sees this interface, so the device picks the implementation: the SDPA reference on CPU, paged Triton
kernels on GPU. Kernels never import the engine; everything they need arrives in BatchLayout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

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
    name: str = ""
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


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}
# Built-in backends register themselves on import; they are imported only when chosen, so a missing
# optional dependency (triton) costs nothing until asked for.
_BUILTIN = {"sdpa": "kernels.sdpa", "triton": "kernels.triton_backend"}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def _load_triton() -> str:
    """Import the Triton backend and return triton's version; RuntimeError says what is missing."""
    try:
        import_module("kernels.triton_backend")
    except ImportError as exc:
        if exc.name == "triton":
            raise RuntimeError("the triton package is not installed") from exc
        raise RuntimeError(f"the Triton kernels failed to import ({exc})") from exc
    except (RuntimeError, OSError) as exc:  # a triton install that cannot find its driver or toolchain
        raise RuntimeError(f"triton failed to load ({exc})") from exc
    import triton

    return triton.__version__


def choose_attention_backend(name: str | None, device: torch.device) -> tuple[str, str]:
    """(backend name, one-line reason). name None or "auto": triton on CUDA when it imports, else sdpa."""
    device = torch.device(device)
    if name in (None, "auto"):
        if device.type != "cuda":
            return "sdpa", f"sdpa: {device.type.upper()} device"
        try:
            version = _load_triton()
        except RuntimeError as exc:
            return "sdpa", f"sdpa: CUDA device, but {exc}"
        from kernels.triton_common import interpreter_enabled

        if interpreter_enabled():
            return "sdpa", "sdpa: CUDA device, but TRITON_INTERPRET is set (triton would run on the CPU)"
        return "triton", f"triton: CUDA device and triton {version} available"
    if name not in available_backends():
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}, "
            "or 'auto' (triton on CUDA when installed, else sdpa)"
        )
    if name != "triton":
        return name, f"{name}: requested"
    try:
        version = _load_triton()
    except RuntimeError as exc:
        raise RuntimeError(
            f"attention backend 'triton' is unavailable: {exc}; install triton (pip install triton) "
            "or use attention backend 'sdpa'"
        ) from exc
    if device.type == "cuda":
        return name, f"triton: requested, triton {version} on CUDA"
    from kernels.triton_common import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError(
            f"attention backend 'triton' on a {device.type} device runs only through the Triton interpreter "
            "(slow, for tests): start the process with TRITON_INTERPRET=1 (triton reads it when first "
            "imported), or use attention backend 'sdpa'"
        )
    return name, f"triton: requested, triton {version} interpreter on {device.type.upper()} (slow)"


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """The backend for `name` ("sdpa", "triton", "auto" or None) on `device`. Its `selection_reason`
    says in one line what was picked and why, for the engine's log."""
    chosen, reason = choose_attention_backend(name, device)
    if chosen in _BUILTIN:
        import_module(_BUILTIN[chosen])
    backend = _REGISTRY[chosen]()
    backend.selection_reason = reason
    return backend
