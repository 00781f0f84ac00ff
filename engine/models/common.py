"""Pieces shared by the model files: the per-step forward context, norms, rotary embeddings, weight targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import RopeConfig
from kernels.interface import AttentionBackend


@dataclass
class ForwardContext:
    """Everything attention needs for one step, passed explicitly down the model (no global state)."""

    backend: AttentionBackend
    metadata: Any
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
        """The one call a model makes per attention layer (engine/compilation.py routes it around a compiled graph)."""
        k_cache, v_cache = self.kv_caches[layer_idx]
        return self.backend.forward(q, k, v, k_cache, v_cache, self.metadata, scale, sliding_window)


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint tensor goes: a parameter, optionally a row slice of a fused one, optionally transposed."""

    param: str
    row_offset: int | None = None  # set for pieces of fused parameters (qkv, gate_up)
    transpose: bool = False  # GPT-2 Conv1D stores [in, out]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 and cast back before the weight, as the reference implementation does,
        # so low-precision runs round the same way.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies (float32, CPU) with the configured scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1 keeps high frequencies, divides low frequencies by `factor`, and blends linearly in
    # between (by wavelength relative to the original context length).
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding:
    """Computes cos/sin for a step's positions once; every layer reuses them."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        self.inv_freq = rope_inv_freq(head_dim, rope)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim], rotating the two halves of head_dim (the HF "rotate_half" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
