"""The compiled decoder (engine/compilation.py) and the C++ decode attention it turns on (kernels/cpu_decode.py): padded
sizes, results equal to the eager model's, no compiling after start-up, the fall-backs to eager, the switch, and a
server that compiles.

The parity suite also runs whole on the compiled path: `make test` runs it a second time with
ATTNSERVE_ENFORCE_EAGER=0 (the Makefile's COMPILED_TESTS), which covers the other architectures.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.compilation import bucket_sizes, padded_to_bucket
from engine.errors import ValidationError
from kernels import cpu_decode
from server_process import ServerProcess


def test_bucket_sizes_cover_every_count_with_bounded_padding():
    sizes = bucket_sizes(2048)
    assert sizes == sorted(set(sizes)) and sizes[0] == 2 and sizes[-1] == 2048
    assert sizes[:15] == list(range(2, 17))
    for n in range(1, 2049):
        padded = padded_to_bucket(n, sizes)
        assert padded >= n
        assert padded - n <= max(1, n // 8), (n, padded)  # at most 12.5% padding past 16, one row below
    assert len(sizes) == 71  # 15 sizes up to 16, 8 per doubling to 2048
    assert bucket_sizes(300)[-2:] == [288, 300]  # the budget itself is the last size
    assert bucket_sizes(1) == [2]
    with pytest.raises(ValueError, match="exceed the largest compiled size 300"):
        padded_to_bucket(301, bucket_sizes(300))


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_compiled_equals_eager_and_never_recompiles(make_ckpt):
    path = str(make_ckpt("llama"))
    compiled = LLM(path, max_model_len=128, max_num_batched_tokens=64, enforce_eager=False)
    runner = compiled.engine.core.runner
    assert runner.compiled is not None
    assert runner.compiled.token_buckets[-1] == 64
    assert isinstance(runner.backend.decode_kernel, cpu_decode.NativeDecode)  # decodes read the cache in place
    eager = LLM(path, max_model_len=128, max_num_batched_tokens=64, enforce_eager=True)
    assert eager.engine.core.runner.compiled is None and eager.engine.core.runner.backend.decode_kernel is None
    # 24 prompts through a 64-token budget: chunked prefills, mixed steps and decode batches of many sizes.
    prompts = random_prompts(24, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    with torch._dynamo.config.patch(error_on_recompile=True):  # every size was compiled and run at start-up
        got = compiled.generate(prompts, params, use_tqdm=False)
    want = eager.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert lg.token_id == lw.token_id and abs(lg.logprob - lw.logprob) < 1e-4
            assert [t for t, _ in lg.top] == [t for t, _ in lw.top]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(lg.top, lw.top, strict=True))
    assert compiled.engine.core.pool.num_free == compiled.engine.core.pool.num_blocks


def test_a_failed_compile_falls_back_to_eager_with_one_warning(make_ckpt, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="engine.compilation"):
        llm = LLM(str(make_ckpt("llama")), max_model_len=64, enforce_eager=False)
    assert llm.engine.core.runner.compiled is None
    warnings = [r for r in caplog.records if r.name == "engine.compilation"]
    assert len(warnings) == 1
    assert "torch.compile failed (RuntimeError: no C++ compiler); the model runs eagerly" in warnings[0].getMessage()
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_failed_decode_kernel_leaves_decodes_on_the_gather_path(make_ckpt, monkeypatch, caplog):
    def broken(self, *args):
        raise RuntimeError("the kernel broke")

    monkeypatch.setattr(cpu_decode.NativeDecode, "__call__", broken)
    with caplog.at_level(logging.WARNING, logger="engine.model_runner"):
        llm = LLM(str(make_ckpt("llama")), max_model_len=64, enforce_eager=False)
    runner = llm.engine.core.runner
    assert runner.compiled is not None and runner.backend.decode_kernel is None
    assert any("decode attention kernel failed (RuntimeError: the kernel broke)" in r.getMessage()
               for r in caplog.records)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize(("value", "eager"), [("1", True), ("true", True), ("0", False), ("no", False), ("", False)])
def test_the_environment_sets_the_default_and_an_explicit_argument_wins(value, eager, monkeypatch, make_ckpt):
    from engine.engine_args import EngineArgs

    monkeypatch.setenv("ATTNSERVE_ENFORCE_EAGER", value)
    path = str(make_ckpt("llama"))
    assert EngineArgs(path, device="cpu").create_config().enforce_eager is eager
    assert EngineArgs(path, device="cpu", enforce_eager=not eager).create_config().enforce_eager is (not eager)


def test_a_bad_environment_value_is_named(monkeypatch, make_ckpt):
    from engine.engine_args import EngineArgs

    monkeypatch.setenv("ATTNSERVE_ENFORCE_EAGER", "maybe")
    with pytest.raises(ValidationError, match="ATTNSERVE_ENFORCE_EAGER must be 1/true/yes or 0/false/no, got 'maybe'"):
        EngineArgs(str(make_ckpt("llama")), device="cpu").create_config()


def test_the_server_compiles_at_start_up_and_streams(make_ckpt):
    path = make_ckpt("llama")
    with ServerProcess(path, "--served-model-name", "test-model", "--max-model-len", "128", env={"ATTNSERVE_ENFORCE_EAGER": "0"}) as server:
        with server.client() as client:
            body = {"model": "test-model", "prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        assert "torch.compile: the decoder is compiled and warmed up" in server.log()
