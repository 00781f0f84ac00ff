"""Model loading: HF dialects, bad model directories, and the memory bound while loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, ModelLoadError, UnsupportedArchitectureError
from engine.config import ModelConfig
from engine.models.loader import load_model


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_v4_and_v5_configs_parse_to_the_same_model(make_ckpt):
    v5 = ModelConfig.from_dir(make_ckpt("llama"))
    v4 = ModelConfig.from_dir(make_ckpt("llama-v4config"))
    assert v4.rope == v5.rope and v4.rope.rope_type == "llama3"
    assert v4.checkpoint_dtype == v5.checkpoint_dtype == "float32"


def test_gpt2_with_and_without_prefix_load_identical_weights(make_ckpt):
    a = load_model(ModelConfig.from_dir(make_ckpt("gpt2")), torch.device("cpu"), torch.float32)
    b = load_model(ModelConfig.from_dir(make_ckpt("gpt2-noprefix")), torch.device("cpu"), torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert b.lm_head.weight is b.transformer.wte.weight  # tied


def test_unknown_architecture_is_named(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewForCausalLM.*supported: LlamaForCausalLM"):
        LLM(str(d))


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_files_are_named(make_ckpt, tmp_path, missing):
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.split(".")[0] if missing != "model.safetensors" else "safetensors"):
        LLM(str(d))


def test_missing_shard_is_named(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("llama-sharded"), tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        LLM(str(d))


def test_corrupt_safetensors_is_reported(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(d))


def test_missing_tensor_is_reported(make_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="qkv_proj"):
        LLM(str(d))


def test_model_dir_that_does_not_exist():
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM("/nonexistent/model/dir")


def test_bad_config_json(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(d))


PEAK_RSS_SCRIPT = r"""
import json, sys, torch
from engine.config import ModelConfig
from engine.models.loader import load_model


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


path = sys.argv[1]
# Finish torch's one-off lazy initialisation (numpy bridge, meta-device machinery: ~80 MB whatever the
# model size) before the baseline, so the measurement is what loading this checkpoint costs.
torch.zeros(1).numpy()
with torch.device("meta"):
    torch.nn.Embedding(2, 2)  # the first meta Embedding loads ~75 MB of torch internals
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
before = status_kib("VmRSS")
model = load_model(ModelConfig.from_dir(path), torch.device("cpu"), torch.float32)
peak = status_kib("VmHWM")
print(json.dumps({"peak_kib": peak - before, "params": sum(p.numel() for p in model.parameters())}))
"""


def test_peak_memory_while_loading_stays_near_checkpoint_size(tmp_path):
    """Peak RSS growth while loading a ~200 MB checkpoint stays under 1.3x its size."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 2816,
           "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 8192,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    h, i, kv = 1024, 2816, 512
    tensors = {"model.embed_tokens.weight": torch.randn(8192, h), "lm_head.weight": torch.randn(8192, h),
               "model.norm.weight": torch.ones(h)}
    for layer in range(4):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "self_attn.q_proj.weight": torch.randn(h, h), p + "self_attn.k_proj.weight": torch.randn(kv, h),
            p + "self_attn.v_proj.weight": torch.randn(kv, h), p + "self_attn.o_proj.weight": torch.randn(h, h),
            p + "mlp.gate_proj.weight": torch.randn(i, h), p + "mlp.up_proj.weight": torch.randn(i, h),
            p + "mlp.down_proj.weight": torch.randn(h, i), p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        })
    save_file(tensors, tmp_path / "model.safetensors")
    size = (tmp_path / "model.safetensors").stat().st_size
    numel = sum(t.numel() for t in tensors.values())
    del tensors
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params"] == numel
    # The model itself is the checkpoint's size, so this also proves the loading really happened in memory.
    assert 0.95 * size < result["peak_kib"] * 1024 < 1.3 * size, (
        f"peak {result['peak_kib'] / 1024:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
    )


def test_loaded_weights_do_not_depend_on_the_file(make_ckpt, tmp_path):
    # Weights are read into the engine's own memory: overwriting (or truncating) the checkpoint while
    # serving must not change the model or crash the process.
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    model = load_model(ModelConfig.from_dir(d), torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = d / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(b"\0" * size)
    f.write_bytes(b"")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_corrupt_header_is_reported(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"{garbage"
    f.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt safetensors file .*model.safetensors"):
        LLM(str(d))
