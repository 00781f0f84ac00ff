"""Pieces shared by the model files: the per-step forward context, norms, rotary embeddings, weight targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    """Where a checkpoint tensor goes: a parameter, optionally a row slice of a fused one, optionally transposed, and
    under tensor parallelism only this rank's part of it."""

    param: str
    row_offset: int | None = None  # set for pieces of fused parameters (qkv, gate_up)
    transpose: bool = False  # GPT-2 Conv1D stores [in, out]
    # The part this rank holds, in the parameter's orientation: along split_dim (0: output rows, column-parallel;
    # 1: input columns, row-parallel) the concatenation of segments, (start, length) pairs. None: all of it.
    segments: tuple[tuple[int, int], ...] | None = None
    split_dim: int = 0


@dataclass(frozen=True)
class Shard:
    """Which tensor-parallel rank of how many a model instance is (engine/parallel.py). size 1: the whole model,
    and no layer communicates."""

    rank: int = 0
    size: int = 1
    group_key: int = -1  # the process group's key for the attnserve::all_reduce op (engine/parallel.py)

    def part(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `total` items; the caller has checked divisibility."""
        length = total // self.size
        assert length * self.size == total, f"{what}: {total} is not divisible by {self.size}"
        return self.rank * length, length

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank holds: a share, or one replicated head when there are fewer KV
        heads than ranks (each serving the query heads of its rank)."""
        if num_kv_heads >= self.size:
            return self.part(num_kv_heads, "KV heads")
        return self.rank * num_kv_heads // self.size, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        return torch.ops.attnserve.all_reduce(x, self.group_key)


WHOLE = Shard()  # the whole model in one process


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split across ranks: partial products, one all-reduce, then the bias
    (added once). On one rank it is nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, shard: Shard):
        super().__init__(in_features // shard.size, out_features, bias=bias)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return super().forward(x)
        y = self.shard.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """An embedding table split by rows (token ids) across ranks: each looks up the ids in its range, zeros the
    others, and an all-reduce sums the pieces. On one rank it is nn.Embedding."""

    def __init__(self, vocab_size: int, dim: int, shard: Shard):
        self.vocab_start, local = shard.part(vocab_size, "vocabulary")
        super().__init__(local, dim)
        self.shard = shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.shard.all_reduce(rows * inside.unsqueeze(-1).to(rows.dtype))


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
