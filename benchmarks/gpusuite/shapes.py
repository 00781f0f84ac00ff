"""The model shapes the suite measures: the published configs in benchmarks/configs, or (--smoke) the same
architectures shrunk until a CPU runs them in seconds, keeping each one's GQA ratio."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODELS = ("qwen3-0.6b", "llama-3-8b")


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's heads, as the kernels see them."""

    model: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


def model_dirs(smoke: bool, scratch: Path) -> dict[str, Path]:
    """name -> a directory holding only config.json, for load_format dummy."""
    if not smoke:
        return {name: CONFIG_DIR / name for name in MODELS}
    return {name: _shrunk_copy(name, scratch) for name in MODELS}


def attention_shapes(smoke: bool) -> list[AttentionShape]:
    shapes = []
    for name in MODELS:
        cfg = ModelConfig.from_dir(CONFIG_DIR / name)
        if smoke:
            shapes.append(AttentionShape(name, *_smoke_heads(cfg)))
        else:
            shapes.append(AttentionShape(name, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))
    return shapes


def _smoke_heads(cfg: ModelConfig) -> tuple[int, int, int]:
    group = cfg.num_heads // cfg.num_kv_heads
    return 2 * group, 2, 32  # two KV heads, the model's group size, a small head


def _shrunk_copy(name: str, scratch: Path) -> Path:
    raw = json.loads((CONFIG_DIR / name / "config.json").read_text())
    heads, kv_heads, head_dim = _smoke_heads(ModelConfig.from_dir(CONFIG_DIR / name))
    raw.update(hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=4096,
               max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    if "max_window_layers" in raw:
        raw["max_window_layers"] = 2
    out = scratch / f"{name}-smoke"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out
