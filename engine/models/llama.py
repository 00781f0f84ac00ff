"""One decoder for the Llama family: Llama, Mistral, Qwen2 and Qwen3, switched by ModelConfig flags.

Differences handled here: q/k/v bias (Qwen2, or Llama's attention_bias), per-head q/k RMSNorm before
RoPE (Qwen3), per-layer sliding windows (Mistral, Qwen layer_types), tied or untied embeddings, GQA/MQA.
Projections are fused (qkv, gate_up) so each is one matmul; the loader slices HF tensors into them.

Under tensor parallelism (a Shard of size N) each rank holds 1/N of the query heads, its share of the KV heads (or
one replicated head), 1/N of the MLP's intermediate features and of the vocabulary: qkv and gate_up are
column-parallel, o and down row-parallel (one all-reduce each), the embedding and LM head vocab-parallel.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.models.common import (WHOLE, ForwardContext, RMSNorm, RotaryEmbedding, RowParallelLinear, Shard,
                                  VocabParallelEmbedding, WeightTarget, apply_rotary)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: Shard):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads // shard.size
        self.num_kv_heads, self.head_dim = shard.kv_heads(cfg.num_kv_heads)[1], cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_proj_bias, shard)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.sliding_window = cfg.sliding_windows[layer_idx]
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ctx.attention(self.layer_idx, q, k, v, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // shard.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: Shard):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg, shard)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, shard) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


_LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)$")


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard = WHOLE):
        super().__init__()
        self.config, self.shard = cfg, shard
        self.model = LlamaBackbone(cfg, shard)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // shard.size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's share of the vocabulary (all of it on one rank)."""
        return self.lm_head(hidden).float()

    def map_weight(self, name: str) -> WeightTarget | None:
        """HF checkpoint name -> our parameter (and this rank's part of the tensor). None: a tensor we do not need."""
        cfg, shard = self.config, self.shard
        split = shard.size > 1
        if name == "lm_head.weight" or name == "model.embed_tokens.weight":
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                return None
            return WeightTarget(name, segments=(shard.part(cfg.vocab_size, "vocabulary"),) if split else None)
        if name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints saved this buffer; we recompute it
        m = _LAYER_WEIGHT.match(name)
        if m is None:
            return WeightTarget(name)  # norms: every rank holds them whole
        layer, block, proj, kind = m.groups()
        prefix = f"model.layers.{layer}.{block}."
        hd = cfg.head_dim
        q_start, q_len = (h * hd for h in shard.part(cfg.num_heads, "attention heads"))
        kv_start, kv_len = (h * hd for h in shard.kv_heads(cfg.num_kv_heads))
        i_start, i_len = shard.part(cfg.intermediate_size, "intermediate size")
        fused = {  # piece -> (fused parameter, row offset in this rank's parameter, this rank's rows of the piece)
            "q": ("qkv_proj", 0, (q_start, q_len)),
            "k": ("qkv_proj", q_len, (kv_start, kv_len)),
            "v": ("qkv_proj", q_len + kv_len, (kv_start, kv_len)),
            "gate": ("gate_up_proj", 0, (i_start, i_len)),
            "up": ("gate_up_proj", i_len, (i_start, i_len)),
        }
        if proj in fused:
            param, offset, rows = fused[proj]
            return WeightTarget(f"{prefix}{param}.{kind}", row_offset=offset, segments=(rows,) if split else None)
        if split and kind == "weight":  # o and down: row-parallel, this rank's input columns; their bias is whole
            cols = (q_start, q_len) if proj == "o" else (i_start, i_len)
            return WeightTarget(name, segments=(cols,), split_dim=1)
        return WeightTarget(name)
