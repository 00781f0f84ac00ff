"""The test checkpoints (and where the default model is found) are what they claim to be, checked against transformers.

The engine's parity tests trust these files, so this pins down their layout (sharding, tied weights,
key prefixes, config style), that transformers loads them cleanly, and that their greedy outputs have
a clear margin and actually depend on the features each kind exists to exercise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import KINDS, PARITY_PROMPTS, build_model, encode_prompt, hf_greedy
from engine import default_model
from engine.default_model import default_model_dir
from engine.errors import ModelLoadError
from tools.bpe import build_bpe_tokenizer

# Kinds with their own weights; the others re-lay-out one of these on disk.
BASE_KINDS = ("llama", "llama-linear", "llama-sharded", "mistral", "qwen2", "qwen3", "gpt2")
NEW_TOKENS = 32


def load(path: Path, **config_overrides) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, **config_overrides
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def weight_names(path: Path) -> set[str]:
    names: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def logits(model: torch.nn.Module, prompt: str = PARITY_PROMPTS[-1]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([encode_prompt(prompt)])).logits


def greedy_outputs(model: torch.nn.Module) -> list[list[int]]:
    return [hf_greedy(model, encode_prompt(p), NEW_TOKENS).output_ids for p in PARITY_PROMPTS]


def test_parity_prompts_cover_short_to_long() -> None:
    lengths = [len(encode_prompt(p)) for p in PARITY_PROMPTS]
    assert len(PARITY_PROMPTS) >= 8
    assert min(lengths) == 5 and max(lengths) <= 60
    assert len(set(lengths)) == len(lengths)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_loads_and_matches_built_model(make_ckpt, kind: str) -> None:
    path = make_ckpt(kind)
    model = load(path)
    torch.testing.assert_close(logits(model), logits(build_model(kind)), rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer(PARITY_PROMPTS[0]).input_ids == encode_prompt(PARITY_PROMPTS[0])
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [1, 4]


def test_llama_layout(make_ckpt) -> None:
    path = make_ckpt("llama")
    config = config_json(path)
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is False
    assert "lm_head.weight" in weight_names(path)


def test_llama_linear_is_tied(make_ckpt) -> None:
    path = make_ckpt("llama-linear")
    config = config_json(path)
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weight_names(path)


def test_llama_sharded_has_index_and_shards(make_ckpt) -> None:
    path = make_ckpt("llama-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == weight_names(path)


def test_mistral_sliding_window_changes_outputs(make_ckpt) -> None:
    path = make_ckpt("mistral")
    assert config_json(path)["sliding_window"] == 16
    # The window must matter, or an engine that ignores it would still pass parity.
    assert greedy_outputs(load(path)) != greedy_outputs(load(path, sliding_window=None))


def test_qwen2_is_mqa_with_qkv_bias(make_ckpt) -> None:
    path = make_ckpt("qwen2")
    assert config_json(path)["num_key_value_heads"] == 1
    names = weight_names(path)
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_qwen3_has_qk_norm_and_wide_heads(make_ckpt) -> None:
    path = make_ckpt("qwen3")
    config = config_json(path)
    assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= weight_names(path)


def test_gpt2_layouts(make_ckpt) -> None:
    prefixed = weight_names(make_ckpt("gpt2"))
    bare = weight_names(make_ckpt("gpt2-noprefix"))
    assert all(name.startswith("transformer.") for name in prefixed)
    assert not any(name.startswith("transformer.") for name in bare)
    assert "lm_head.weight" not in prefixed | bare
    assert not any(name.endswith((".attn.bias", ".attn.masked_bias")) for name in bare)
    assert bare == {name.removeprefix("transformer.") for name in prefixed}


def test_v4_config_style_loads_like_v5(make_ckpt) -> None:
    v4, v5 = config_json(make_ckpt("llama-v4config")), config_json(make_ckpt("llama"))
    assert "rope_parameters" not in v4 and "dtype" not in v4
    assert v4["torch_dtype"] == "float32"
    assert v4["rope_theta"] == v5["rope_parameters"]["rope_theta"]
    assert v4["rope_scaling"]["type"] == "llama3" and "rope_type" not in v4["rope_scaling"]
    # transformers keeps the legacy "type" key next to the "rope_type" it derives, so compare what it
    # computes from the config, not the dicts. (Identical logits are checked in the load test.)
    old_style, new_style = load(make_ckpt("llama-v4config")), load(make_ckpt("llama"))
    assert old_style.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(old_style.model.rotary_emb.inv_freq, new_style.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_llama_rope_scaling_changes_outputs(make_ckpt) -> None:
    path = make_ckpt("llama")
    default_rope = {"rope_type": "default", "rope_theta": config_json(path)["rope_parameters"]["rope_theta"]}
    assert greedy_outputs(load(path)) != greedy_outputs(load(path, rope_parameters=default_rope))


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_greedy_margins_are_clear_of_fp32_noise(make_ckpt, kind: str) -> None:
    model = load(make_ckpt(kind))
    model64 = copy.deepcopy(model).double()
    top1_gap, top6_gap, noise = float("inf"), float("inf"), 0.0
    outputs = []
    for prompt in PARITY_PROMPTS:
        result = hf_greedy(model, encode_prompt(prompt), NEW_TOKENS)
        outputs.append(result.output_ids)
        top1_gap = min(top1_gap, *result.margins)
        # The whole sequence in one pass, fp32 vs fp64, gives the rounding noise on this exact path.
        seq = torch.tensor([result.prompt_ids + result.output_ids[:-1]])
        start = len(result.prompt_ids) - 1
        with torch.no_grad():
            ref = torch.log_softmax(model64(seq).logits[0, start:], -1)
            fp32 = torch.log_softmax(model(seq).logits[0, start:].double(), -1)
        noise = max(noise, (ref - fp32).abs().max().item())
        top = ref.topk(6, dim=-1).values
        top6_gap = min(top6_gap, (top[:, :-1] - top[:, 1:]).min().item())
    assert top1_gap > 1e-3 and top1_gap > 100 * noise, (top1_gap, noise)
    # Top-5 logprob comparisons also need ranks 2..6 to stay in order.
    assert top6_gap > 10 * noise, (top6_gap, noise)
    # Not degenerate: each prompt produces several distinct tokens, and prompts differ.
    assert min(len(set(out)) for out in outputs) >= 5
    assert len({tuple(out) for out in outputs}) == len(outputs)


# The built-in demo model's location (its contents are tested in tests/test_demo_model.py).


def test_default_model_is_the_committed_demo_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(default_model.DEMO_MODEL_ENV, raising=False)
    assert default_model_dir() == Path(__file__).resolve().parents[1] / "models" / "demo"
    monkeypatch.setenv(default_model.DEMO_MODEL_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="--model DIR"):  # the error names where it looked and the way out
        default_model_dir()
    (tmp_path / "config.json").write_text("{}")
    assert default_model_dir() == tmp_path


def test_tokenizer_round_trips_and_splits_multibyte_characters() -> None:
    tokenizer = build_bpe_tokenizer()
    text = "naïve café — 今天天气很好 🎉👨‍👩‍👧 Ωμέγα, and an unseen script: ᚠᚢᚦ ꦲꦏ"
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.decode(encoding.ids) == text
    # Some tokens hold only part of a character's UTF-8 bytes, so they do not decode on their own.
    assert any("\ufffd" in tokenizer.decode([i]) for i in encoding.ids)
    assert tokenizer.encode("<|im_start|>user").ids[1] == tokenizer.token_to_id("<|im_start|>")
