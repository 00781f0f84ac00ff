"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU MLP, tied LM head.

HF stores GPT-2's projections as Conv1D ([in, out]); the loader transposes them into nn.Linear.

Under tensor parallelism the fused c_attn is column-parallel by heads (each rank takes its heads' columns of q, of k
and of v), c_fc column-parallel, both c_proj row-parallel, wte vocab-parallel (and so the tied LM head); wpe and the
LayerNorms are whole on every rank.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.models.common import (WHOLE, ForwardContext, RowParallelLinear, Shard, VocabParallelEmbedding,
                                  WeightTarget)

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: Shard):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.num_heads // shard.size, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * self.num_heads * cfg.head_dim)
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, True, shard)
        self.scale = cfg.head_dim**-0.5
        if cfg.attn_scale_by_layer:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = ctx.attention(self.layer_idx, q, k, v, self.scale, None)
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size // shard.size)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True, shard)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: Shard):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx, shard)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, shard)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i, shard) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_PARALLEL = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$")
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard = WHOLE):
        super().__init__()
        self.config, self.shard = cfg, shard
        self.transformer = GPT2Backbone(cfg, shard)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // shard.size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block in t.h:
            x = block(x, ctx)
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's share of the vocabulary (all of it on one rank)."""
        return self.lm_head(hidden).float()

    def map_weight(self, name: str) -> WeightTarget | None:
        cfg, shard = self.config, self.shard
        vocab = (shard.part(cfg.vocab_size, "vocabulary"),) if shard.size > 1 else None
        if name == "lm_head.weight":
            return None if cfg.tie_word_embeddings else WeightTarget(name, segments=vocab)
        # Checkpoints come with and without the "transformer." prefix (GPT2Model vs GPT2LMHeadModel saves).
        name = name.removeprefix("transformer.")
        if _BUFFERS.match(name):
            return None  # causal-mask buffers; our mask comes from the attention backend
        target = WeightTarget(f"transformer.{name}", transpose=bool(_CONV1D.match(name)))
        if shard.size == 1:
            return target
        if name == "wte.weight":
            return dataclasses.replace(target, segments=vocab)
        m = _PARALLEL.match(name)
        if m is None:
            return target
        proj, kind = m.groups()
        if proj == "attn.c_attn":  # [q | k | v] along the output features: this rank's heads of each
            start, length = (h * cfg.head_dim for h in shard.part(cfg.num_heads, "attention heads"))
            parts = tuple((i * cfg.hidden_size + start, length) for i in range(3))
            return dataclasses.replace(target, segments=parts)
        if proj == "mlp.c_fc":
            return dataclasses.replace(target, segments=(shard.part(cfg.intermediate_size, "intermediate size"),))
        if kind == "bias":
            return target  # a row-parallel layer's bias is added once, after the all-reduce: whole on every rank
        if proj == "attn.c_proj":  # row-parallel: this rank's heads' input columns
            cols = tuple(h * cfg.head_dim for h in shard.part(cfg.num_heads, "attention heads"))
        else:
            cols = shard.part(cfg.intermediate_size, "intermediate size")
        return dataclasses.replace(target, segments=(cols,), split_dim=1)
