"""Tiny random-weight Hugging Face checkpoints, one per architecture variant the engine must load.

Each checkpoint is written by transformers' own save_pretrained (so the files are exactly what a real
export looks like), plus the shared byte-level BPE tokenizer from tools/bpe.py. A few kinds are
then rewritten on disk to mimic layouts found in published checkpoints that transformers 5 no longer
writes itself (4.x-style config.json, GPT-2 keys without the `transformer.` prefix).

Random models have near-tied logits, which would make greedy-token parity tests flaky. What matters
is the top-1 minus top-2 logit gap relative to fp32 rounding noise, and that noise grows much faster
than the gap as the init scale grows (large weights saturate softmax and inflate activations). So each
kind uses a moderate `initializer_range` (0.1-0.25) plus a heavy-tailed spread of output-embedding row
norms, and a seed chosen so that over PARITY_PROMPTS x 32 greedy steps the smallest top-1 gap is
hundreds of times the fp32-vs-fp64 logprob difference (and the gaps between ranks 2..6, which top-k
logprob comparisons depend on, tens of times), while outputs still vary and depend on the context.
test_checkpoints.py checks all of that, so a change here that loses the margin fails loudly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from tools.bpe import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    build_bpe_tokenizer,
    chat_eos_token_ids,
    write_tokenizer_files,
)

# Token lengths (with the bos the tokenizer prepends) run from 5 to 60; see test_checkpoints.py.
PARITY_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "def add(a, b):\n    return a + b\n\nprint(add(2,",
    "Le petit café au coin de la rue ouvre à sept heures, et",
    "User: What is the tallest mountain in the world?\nAssistant: The tallest mountain is",
    "今天天气很好，我们去公园散步。Then we walked home along the river 🌧️ and talked about the old lighthouse keeper and",
    "Rivers shape the land they flow through. Over thousands of years, water carves valleys, "
    "carries sand and stones downstream, and builds wide deltas where it meets the sea. Floods can be "
    "destructive, but they also spread rich soil across the",
    "Numbers: 3, 14, 159, 2653. Prices: $4.50, €12, £7.25. Emoji: 🎉 👋 😍 🚀. Greek: α β γ. "
    "Then the engineer opened the panel and found",
]

KINDS = (
    "llama",
    "llama-linear",
    "llama-sharded",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "gpt2-noprefix",
    "llama-v4config",
)

# Shared by every Llama-family config below. Vocab size and special ids come from the tokenizer.
_TOKENIZER = build_bpe_tokenizer()
_VOCAB_SIZE = _TOKENIZER.get_vocab_size()
_SPECIAL_IDS = {
    "bos_token_id": _TOKENIZER.token_to_id(BOS_TOKEN),
    "eos_token_id": _TOKENIZER.token_to_id(EOS_TOKEN),
    "pad_token_id": _TOKENIZER.token_to_id(PAD_TOKEN),
}
# Positions used by the parity tests stay far below this; small enough to keep GPT-2's wpe tiny.
_MAX_POSITIONS = 256
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that with head_dim 32 the rotary frequencies fall in all three llama3 regimes
    # (kept, smoothed, divided by `factor`).
    "original_max_position_embeddings": 64,
}


@dataclass(frozen=True)
class _Spec:
    config: Callable[[], PretrainedConfig]
    seed: int
    # Applied after transformers' init: transformers zeroes biases and sets norm weights to 1, which
    # would let an engine that drops a bias or mis-applies a norm weight still match.
    bias_std: float = 0.0
    norm_weight_std: float = 0.0
    # Output-embedding rows are scaled by exp(N(0, s)). With a plain Gaussian init the top two of 4k
    # logits are usually very close; a heavy-tailed spread of row norms (as in trained LMs, where norms
    # track token frequency) widens that gap several-fold without blowing up the activations.
    output_row_log_std: float = 0.5


def _llama_config(initializer_range: float, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        **_SPECIAL_IDS,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


_SPECS: dict[str, _Spec] = {
    "llama": _Spec(
        lambda: _llama_config(0.1, rope_parameters=dict(_LLAMA3_ROPE)),
        seed=2,
        norm_weight_std=0.2,
    ),
    "llama-linear": _Spec(
        lambda: _llama_config(
            0.25,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            tie_word_embeddings=True,
        ),
        seed=0,
        norm_weight_std=0.2,
    ),
    "llama-sharded": _Spec(
        lambda: _llama_config(0.1, num_hidden_layers=3),
        seed=20,
        norm_weight_std=0.2,
    ),
    "mistral": _Spec(
        lambda: MistralConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=_MAX_POSITIONS,
            sliding_window=16,
            initializer_range=0.2,
            tie_word_embeddings=False,
            **_SPECIAL_IDS,
        ),
        seed=0,
        norm_weight_std=0.2,
    ),
    "qwen2": _Spec(
        lambda: Qwen2Config(
            vocab_size=_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=_MAX_POSITIONS,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=True,
            **_SPECIAL_IDS,
        ),
        seed=3,
        bias_std=0.2,
        norm_weight_std=0.2,
    ),
    "qwen3": _Spec(
        lambda: Qwen3Config(
            vocab_size=_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=48,
            max_position_embeddings=_MAX_POSITIONS,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=False,
            **_SPECIAL_IDS,
        ),
        seed=10,
        norm_weight_std=0.2,
    ),
    "gpt2": _Spec(
        lambda: GPT2Config(
            vocab_size=_VOCAB_SIZE,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=_MAX_POSITIONS,
            initializer_range=0.2,
            **_SPECIAL_IDS,
        ),
        seed=9,
        bias_std=0.2,
        norm_weight_std=0.2,
        # wte is tied and GPT-2 adds it to the residual stream unnormalized, so spread-out row norms
        # would dominate the input and collapse the outputs onto a handful of tokens.
        output_row_log_std=0.0,
    ),
}
# Same weights as their base kind; only the files on disk are laid out differently.
_SPECS["gpt2-noprefix"] = _SPECS["gpt2"]
_SPECS["llama-v4config"] = _SPECS["llama"]

_SHARD_SIZE = "600KB"


def make_checkpoint(kind: str, out_dir: Path) -> Path:
    """Write the checkpoint `kind` (one of KINDS) into `out_dir` (created if needed) and return it."""
    if kind not in _SPECS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(kind)
    model.save_pretrained(out_dir, max_shard_size=_SHARD_SIZE if kind == "llama-sharded" else "1GB")
    write_tokenizer_files(_TOKENIZER, out_dir, model_max_length=_MAX_POSITIONS)
    if kind == "gpt2-noprefix":
        _strip_gpt2_prefix(out_dir)
    elif kind == "llama-v4config":
        _rewrite_config_v4_style(out_dir)
    return out_dir


def build_model(kind: str) -> torch.nn.Module:
    """The fp32 transformers model behind checkpoint `kind`, with its seeded random weights."""
    spec = _SPECS[kind]
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(spec.config(), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and spec.bias_std:
                param.normal_(0.0, spec.bias_std)
            elif _is_norm_weight(name) and spec.norm_weight_std:
                param.normal_(1.0, spec.norm_weight_std)
        if spec.output_row_log_std:
            rows = model.get_output_embeddings().weight
            rows.mul_(torch.exp(torch.randn(rows.shape[0], 1) * spec.output_row_log_std))
    model.generation_config = GenerationConfig(
        bos_token_id=_SPECIAL_IDS["bos_token_id"],
        eos_token_id=chat_eos_token_ids(_TOKENIZER),
        pad_token_id=_SPECIAL_IDS["pad_token_id"],
    )
    return model.eval()


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2]
    return name.endswith(".weight") and (leaf.endswith("norm") or leaf.startswith("ln_"))


def _strip_gpt2_prefix(out_dir: Path) -> None:
    # The layout of the original GPT-2 exports: bare GPT2Model keys (`h.0.attn.c_attn.weight`, `wte.weight`)
    # and no lm_head, which is tied to wte.
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items() if name != "lm_head.weight"}
    save_file(renamed, path, metadata={"format": "pt"})


def _rewrite_config_v4_style(out_dir: Path) -> None:
    # transformers 5 writes `rope_parameters` (with rope_theta inside) and `dtype`; 4.x wrote top-level
    # `rope_theta`, `rope_scaling` keyed by "type", and `torch_dtype`. Most published checkpoints are 4.x.
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.46.3"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class GreedyResult:
    prompt_ids: list[int]
    output_ids: list[int]
    # Top-1 minus top-2 logit at each generated step.
    margins: list[float]


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int = 32) -> GreedyResult:
    """transformers' greedy generate (eos ignored) on one unpadded prompt, with the per-step logit margins."""
    with torch.no_grad():
        # eos_token_id=None must be a keyword: inside a GenerationConfig object, None is filled back in
        # from the model's generation_config and generation would stop at eos.
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=_SPECIAL_IDS["pad_token_id"],
            output_logits=True,
            return_dict_in_generate=True,
        )
    output_ids = out.sequences[0, len(prompt_ids) :].tolist()
    assert len(output_ids) == max_new_tokens, "generation stopped early"
    top2 = torch.stack(out.logits).squeeze(1).float().topk(2, dim=-1).values
    return GreedyResult(prompt_ids=list(prompt_ids), output_ids=output_ids, margins=(top2[:, 0] - top2[:, 1]).tolist())


def encode_prompt(prompt: str) -> list[int]:
    """Prompt token ids as the engine sees them: with the bos that the tokenizer's post-processor adds."""
    return _TOKENIZER.encode(prompt).ids


def copy_with_chat_template(src: Path, dst: Path, template: str | None) -> Path:
    """Copy the checkpoint `src` to `dst` with its chat template replaced by `template` (None: removed, so the copy
    has no chat template at all). Returns `dst`."""
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert "chat_template" in config  # the copy must differ from the original only by its template
    if template is None:
        del config["chat_template"]
    else:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    assert not (dst / "chat_templates").exists()
    return dst
