"""Frozen configuration, read once at start-up and passed down explicitly.

ModelConfig normalizes the config.json dialects found in the wild (transformers 4.x: top-level
rope_theta / rope_scaling / torch_dtype; 5.x: rope_parameters / dtype) into one shape, so the model
code never looks at raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import ModelLoadError, UnsupportedArchitectureError, ValidationError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# The architectures this engine runs (GPT-2 by engine/models/gpt2.py, the rest by engine/models/llama.py), with the
# defaults the parser needs: transformers omits keys equal to its class defaults when it writes config.json.
_ARCH_DEFAULTS = {
    "LlamaForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_pos=2048),
    "MistralForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_pos=4096 * 32),
    "Qwen2ForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_pos=32768),
    "Qwen3ForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_pos=32768),
    "GPT2LMHeadModel": dict(rope_theta=None, rms_norm_eps=1e-5, tie_word_embeddings=True, max_pos=1024),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_DEFAULTS)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) means float32 on CPU and bfloat16 on CUDA."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValidationError(f"dtype must be one of auto, float32, float16, bfloat16; got {name!r}", "dtype")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str
    checkpoint_dtype: str | None
    rope: RopeConfig | None  # None: learned absolute positions (GPT-2)
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for full attention, else the window size in tokens (key allowed if q - k < window).
    sliding_windows: tuple[int | None, ...] = ()
    attn_scale_by_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx
    bos_token_id: int | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_gpt2(self) -> bool:
        return self.architecture == "GPT2LMHeadModel"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
        raw = read_json(path / "config.json", required=True)
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(archs) if archs else f"none (model_type={raw.get('model_type')!r})"
            raise UnsupportedArchitectureError(
                f"unsupported architecture {named} in {path / 'config.json'}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            return _gpt2_config(path, raw) if arch == "GPT2LMHeadModel" else _llama_family_config(path, raw, arch)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path / 'config.json'}: malformed or missing field ({exc!r})") from exc


def read_json(file: Path, required: bool = False) -> dict:
    """The object in a model directory's JSON file; {} for a missing optional file."""
    if not file.is_file():
        if required:
            raise ModelLoadError(f"missing {file.name} in {file.parent}")
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _eos_ids(raw: dict) -> frozenset[int]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])


def _checkpoint_dtype(raw: dict) -> str | None:
    return raw.get("dtype") or raw.get("torch_dtype")


def _rope_config(raw: dict, default_theta: float) -> RopeConfig:
    # 5.x: rope_parameters holds theta and the scaling type; 4.x: top-level rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", default_theta))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _sliding_windows(raw: dict, arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ModelLoadError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "MistralForCausalLM" and window:
        return (int(window),) * num_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window") and window:
        # Qwen: layers from max_window_layers on use the window.
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def _llama_family_config(path: Path, raw: dict, arch: str) -> ModelConfig:
    defaults = _ARCH_DEFAULTS[arch]
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    layers = int(raw["num_hidden_layers"])
    head_dim = raw.get("head_dim") or hidden // heads
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"hidden_act {act!r} is not supported for {arch}; supported: silu")
    qwen2 = arch == "Qwen2ForCausalLM"
    return ModelConfig(
        path=path,
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(raw["intermediate_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", defaults["max_pos"])),
        norm_eps=float(raw.get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        hidden_act="silu",
        checkpoint_dtype=_checkpoint_dtype(raw),
        rope=_rope_config(raw, defaults["rope_theta"]),
        # Qwen2 always has q/k/v bias; the others follow attention_bias.
        attention_bias=qwen2 or bool(raw.get("attention_bias", False)),
        o_proj_bias=not qwen2 and bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_windows=_sliding_windows(raw, arch, layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


_GPT2_ACTIVATIONS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish", "quick_gelu")


def _gpt2_config(path: Path, raw: dict) -> ModelConfig:
    defaults = _ARCH_DEFAULTS["GPT2LMHeadModel"]
    hidden = int(raw.get("n_embd", raw.get("hidden_size", 768)))
    heads = int(raw.get("n_head", raw.get("num_attention_heads", 12)))
    layers = int(raw.get("n_layer", raw.get("num_hidden_layers", 12)))
    act = raw.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ModelLoadError(f"activation_function {act!r} is not supported; supported: {', '.join(_GPT2_ACTIVATIONS)}")
    if raw.get("scale_attn_weights") is False:
        raise ModelLoadError("scale_attn_weights=false is not supported")
    return ModelConfig(
        path=path,
        architecture="GPT2LMHeadModel",
        vocab_size=int(raw.get("vocab_size", 50257)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(raw.get("n_positions", raw.get("max_position_embeddings", defaults["max_pos"]))),
        norm_eps=float(raw.get("layer_norm_epsilon", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        hidden_act=act,
        checkpoint_dtype=_checkpoint_dtype(raw),
        rope=None,
        attention_bias=True,
        o_proj_bias=True,
        mlp_bias=True,
        sliding_windows=(None,) * layers,
        attn_scale_by_layer=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # explicit pool size wins over the memory-based sizing
    kv_cache_memory: int = 1 << 30  # bytes; the CPU sizing budget
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of total memory the engine may use
    enable_prefix_caching: bool = True  # share the KV blocks of equal prompt prefixes (engine/block_hash.py)


SCHEDULING_POLICIES = ("fair", "fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Who runs first (engine/scheduler.py): "fair" shares the running slots equally between requests, "fcfs" admits
    # in arrival order, "priority" by each request's priority (lower first), then arrival.
    policy: str = "fair"


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode.py), vLLM's speculative_config: each decode step proposes up to
    num_speculative_tokens tokens, by prompt lookup (ngram: the latest earlier occurrence of the sequence's last n
    tokens, n from prompt_lookup_max down to prompt_lookup_min) or by a draft model, and the model verifies them in
    the same forward."""

    method: str  # "ngram", or "draft_model": a smaller model with the same vocabulary proposes (engine/draft_model.py)
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None  # draft_model: the draft's directory or hub id, as given
    draft: ModelConfig | None = None  # draft_model: its config, once read (EngineArgs.create_config)
    # No speculation in a step with more running sequences than this: a large batch is compute-bound, so the drafts'
    # extra positions cost more than the forwards they save (docs/benchmarks.md: 8% slower at 16 on random prompts).
    disable_by_batch_size: int | None = 8


EXECUTOR_BACKENDS = ("mp", "external_launcher")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (engine/parallel.py): one model across tensor_parallel_size ranks, each a process with 1/N of
    the weights and of the KV cache. Size 1: this process alone, no torch.distributed."""

    tensor_parallel_size: int = 1
    # "mp": this process starts its node's other ranks as local processes (rank 0 is the engine's own process);
    # "external_launcher": every rank was started by torchrun, which set RANK, WORLD_SIZE and MASTER_ADDR/PORT (env://).
    distributed_executor_backend: str = "mp"
    nnodes: int = 1  # nodes the ranks span (mp): each runs tensor_parallel_size / nnodes of them
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the others to join
    master_port: int | None = None  # None: a free port, chosen by rank 0 (one node only)

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    attention_backend: str | None = None  # None: the default for the device
    load_format: str = "auto"  # "auto"/"safetensors": the checkpoint's weights; "dummy": random, from config.json
    enforce_eager: bool = False  # no torch.compile (CPU), no CUDA graphs for decode steps (CUDA)
    chat_template: str | None = None  # Jinja source that replaces the model's chat template (--chat-template)
    speculative: SpeculativeConfig | None = None  # None: one token per sequence per step
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
