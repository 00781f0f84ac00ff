"""--load-format dummy: a model from config.json alone with seeded random weights, never a weight file; the demo
model's tokenizer standing in for a missing tokenizer.json; the published benchmark shapes in benchmarks/configs."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer

from engine import LLM, ModelLoadError, SamplingParams, default_model
from engine.config import ModelConfig
from engine.default_model import default_model_dir
from engine.models.common import RMSNorm
from engine.models.dummy import tokenizer_for
from engine.models.loader import build_meta_model, load_model
from server_process import ServerProcess

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
CPU = torch.device("cpu")


def config_only(make_ckpt, kind: str, dst: Path, *extra: str) -> Path:
    """A directory with the config.json of test checkpoint `kind` (plus the named files), and no weights."""
    dst.mkdir()
    for name in ("config.json", *extra):
        shutil.copy(make_ckpt(kind) / name, dst / name)
    return dst


def test_config_only_directory_generates_finite_output(make_ckpt, tmp_path, caplog):
    model_dir = config_only(make_ckpt, "llama", tmp_path / "m")
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(model_dir), load_format="dummy", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    # The text's ids in the stand-in (the demo model's 8192-token tokenizer) fit this model's 4096.
    outs = llm.generate([[5, 6, 7, 8], "def main():\n    return"], params, use_tqdm=False)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    for out in outs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 6 and all(0 <= t < vocab for t in completion.token_ids)
        for lp in completion.logprobs:
            assert math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top)
    # The start-up log says the weights are random, and why the tokenizer is not the model's.
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "weights are RANDOM" in warnings and "seed 0" in warnings
    assert "the demo model's tokenizer" in warnings and "for benchmarks only" in warnings


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
def test_dummy_weights_are_made_on_the_device_in_the_dtype(make_ckpt, tmp_path, kind):
    cfg = ModelConfig.from_dir(config_only(make_ckpt, kind, tmp_path / kind))
    model = load_model(cfg, CPU, torch.bfloat16, load_format="dummy", seed=1)
    for name, param in model.named_parameters():
        assert param.device == CPU and param.dtype == torch.bfloat16, name
        assert torch.isfinite(param).all(), name
    for module in model.modules():
        if isinstance(module, (RMSNorm, torch.nn.LayerNorm)):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
        if getattr(module, "bias", None) is not None:
            assert not module.bias.any()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert all(0.01 < float(p.float().std()) < 0.03 for p in matrices)  # N(0, 0.02)


def test_tied_embeddings_stay_one_tensor(make_ckpt, tmp_path):
    gpt2 = ModelConfig.from_dir(config_only(make_ckpt, "gpt2", tmp_path / "g"))
    assert gpt2.tie_word_embeddings
    model = load_model(gpt2, CPU, torch.float32, load_format="dummy")
    assert model.lm_head.weight is model.transformer.wte.weight
    qwen = ModelConfig.from_dir(CONFIGS / "qwen3-0.6b")
    small = dataclasses.replace(qwen, num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=256,
                                sliding_windows=(None,))
    model = load_model(small, CPU, torch.float32, load_format="dummy")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_same_seed_same_weights_and_the_global_rng_untouched(make_ckpt, tmp_path):
    cfg = ModelConfig.from_dir(config_only(make_ckpt, "llama", tmp_path / "m"))
    rng_before = torch.random.get_rng_state()
    a = load_model(cfg, CPU, torch.float32, load_format="dummy", seed=7).state_dict()
    b = load_model(cfg, CPU, torch.float32, load_format="dummy", seed=7).state_dict()
    c = load_model(cfg, CPU, torch.float32, load_format="dummy", seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_weight_files_are_never_opened_under_dummy(make_ckpt, tmp_path, monkeypatch):
    model_dir = config_only(make_ckpt, "llama", tmp_path / "m", "tokenizer.json", "tokenizer_config.json")
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    # auto reads the checkpoint and refuses the corrupt file ...
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(model_dir), device="cpu")

    # ... dummy does not even open it.
    def opened(*args, **kwargs):
        raise AssertionError("a weight file was opened under load_format=dummy")

    monkeypatch.setattr("engine.models.loader.SafetensorsFile", opened)
    llm = LLM(str(model_dir), load_format="dummy", device="cpu")
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_the_directory_tokenizer_wins_and_the_fallback_is_dummy_only(make_ckpt, tmp_path, caplog):
    with_tokenizer = config_only(make_ckpt, "llama", tmp_path / "t", "tokenizer.json", "tokenizer_config.json")
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(with_tokenizer), load_format="dummy", device="cpu")
    assert "the demo model's tokenizer" not in caplog.text
    # The directory's tokenizer keeps its eos; the stand-in drops the demo model's.
    assert llm.get_tokenizer().eos_token_id is not None
    # Without dummy a missing tokenizer.json is an error, as before: the stand-in is for benchmarks only.
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        LLM(str(config_only(make_ckpt, "llama", tmp_path / "bare")), device="cpu")


def test_the_fallback_warning_names_the_tokenizer_really_used(make_ckpt, tmp_path, caplog):
    """The stand-in is the demo model's tokenizer, read from its checkpoint, not the model directory's (the test
    checkpoints' smaller BPE): the warning says so, with the size of the tokenizer it really returns."""
    cfg = ModelConfig.from_dir(config_only(make_ckpt, "llama", tmp_path / "m"))
    with caplog.at_level(logging.WARNING, logger="engine.models.dummy"):
        tokenizer = tokenizer_for(cfg, "dummy")
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "engine.models.dummy"]
    reference_file = default_model_dir() / "tokenizer.json"
    reference = RawTokenizer.from_file(str(reference_file))
    text = "def main():\n    print('héllo, wörld')"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids
    size = reference.get_vocab_size(with_added_tokens=True)
    assert f"the demo model's tokenizer ({reference_file}, {size} tokens)" in warning, warning
    own_size = RawTokenizer.from_file(str(make_ckpt("llama") / "tokenizer.json")).get_vocab_size()
    assert own_size != size and f"{own_size} tokens" not in warning, warning
    # The demo's eos ids mean nothing to this model: only its own config.json's end a sequence.
    assert tokenizer.eos_token_ids == frozenset()


def test_the_fallback_needs_the_demo_model(make_ckpt, tmp_path, monkeypatch):
    cfg = ModelConfig.from_dir(config_only(make_ckpt, "llama", tmp_path / "m"))
    monkeypatch.setenv(default_model.DEMO_MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match=r"no tokenizer.json in .*the demo model's tokenizer, is not at .*nowhere"):
        tokenizer_for(cfg, "dummy")


def test_serve_with_load_format_dummy_answers_a_completion(make_ckpt, tmp_path):
    model_dir = config_only(make_ckpt, "llama", tmp_path / "m")
    with ServerProcess(model_dir, "--load-format", "dummy", "--device", "cpu", "--max-model-len", "128",
                       "--disable-log-stats") as server:
        with server.client() as client:
            resp = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4, "temperature": 0,
                                                        "ignore_eos": True})
        log = server.log()
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
    assert "weights are RANDOM" in log and "the demo model's tokenizer" in log


# Totals of the published checkpoints: Qwen3-0.6B 0.6B (0.44B without its tied embedding), Llama 3 8B 8.03B.
PUBLISHED = {
    "qwen3-0.6b": dict(architecture="Qwen3ForCausalLM", params=596_049_920, non_embedding=440_467_456,
                       heads=(16, 8, 128), vocab=151_936, layers=28, tied=True),
    "llama-3-8b": dict(architecture="LlamaForCausalLM", params=8_030_261_248, non_embedding=7_504_924_672,
                       heads=(32, 8, 128), vocab=128_256, layers=32, tied=False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_benchmark_configs_have_the_published_shapes(name):
    want = PUBLISHED[name]
    cfg = ModelConfig.from_dir(CONFIGS / name)
    assert cfg.architecture == want["architecture"] and cfg.tie_word_embeddings == want["tied"]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == want["heads"]
    assert cfg.vocab_size == want["vocab"] and cfg.num_layers == want["layers"]
    assert sorted(p.name for p in (CONFIGS / name).iterdir()) == ["config.json"]
    model = build_meta_model(cfg)  # shapes only: nothing is allocated
    total = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    assert total == want["params"]
    assert total - model.model.embed_tokens.weight.numel() == want["non_embedding"]
    assert all(p.device.type == "meta" for p in model.parameters())
