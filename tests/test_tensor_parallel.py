"""Tensor parallelism (engine/parallel.py) on CPU: two ranks over gloo, each a process with half of the model.

The reference is the same engine with one rank (whose own parity with transformers is tests/test_hf_parity.py):
greedy tokens must be identical and logprobs within 1e-4, for the five architectures (Qwen2's single KV head is
replicated on both ranks), through chunked prefill, prefix caching and preemption. Loading is checked in bytes: a
rank reads only its part of each tensor. The server with --tensor-parallel-size 2 is tests/test_tensor_parallel_server.py.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from checkpoints import PARITY_PROMPTS
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.errors import ValidationError
from engine.models.common import Shard
from engine.models.loader import load_model
from engine.models.safetensors_io import SafetensorsFile
from server_process import child_pids

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
CPU = torch.device("cpu")


def children() -> set[int]:
    """Live child processes of this test process."""
    return child_pids(os.getpid())


def _engine_args(**overrides) -> dict:
    # A 24-token budget splits the longer prompts into chunks; 12 blocks of 16 tokens cannot hold every sequence at
    # once, so some are preempted and recomputed; the prompts share prefixes, so blocks are found in the cache.
    return dict(max_model_len=192, block_size=16, num_kv_blocks=12, max_num_batched_tokens=24, max_num_seqs=8,
                **overrides)


def _prompts(llm: LLM) -> list[list[int]]:
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PARITY_PROMPTS]
    shared = tok.encode(PARITY_PROMPTS[0] + " " + PARITY_PROMPTS[1])
    return prompts + [shared + tok.encode(" and then"), shared + tok.encode(" but not")]


def _run(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_two_ranks_match_one(kind, make_ckpt):
    path = str(make_ckpt(kind))
    one = LLM(path, **_engine_args())
    prompts = _prompts(one)
    expected = _run(one, prompts)
    before = children()
    two = LLM(path, tensor_parallel_size=2, **_engine_args())
    try:
        assert len(children() - before) == 1  # rank 1's process; rank 0 is this one
        assert two.engine.info.tensor_parallel_size == 2
        got = _run(two, prompts)
        stats = two.engine.stats()
    finally:
        two.shutdown()
    assert children() <= before  # rank 1 has exited
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # the paths named above did run
    for want, out in zip(expected, got):
        w, g = want.outputs[0], out.outputs[0]
        assert g.token_ids == w.token_ids, f"{kind}: greedy ids diverge for a {len(want.prompt_token_ids)}-token prompt"
        for a, b in zip(g.logprobs, w.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top] or _near_tie(b)
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-4 or _near_tie(b)
        for a, b in zip(out.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def _near_tie(lp) -> bool:
    """Top alternatives within fp32 noise of each other may come in either order."""
    values = [v for _, v in lp.top]
    return any(abs(x - y) < 1e-4 for x, y in zip(values, values[1:]))


def test_compiled_ranks_match_one(make_ckpt):
    """Each rank compiles its shard (the all-reduces are opaque ops in the graph) and warms up alone."""
    path = str(make_ckpt("qwen2"))
    one = LLM(path, **_engine_args())
    prompts = _prompts(one)[:4]
    expected = _run(one, prompts)
    two = LLM(path, tensor_parallel_size=2, enforce_eager=False, **_engine_args())
    try:
        assert two.engine.core.runner.compiled is not None
        got = _run(two, prompts)
    finally:
        two.shutdown()
    for want, out in zip(expected, got):
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.outputs[0].logprobs, want.outputs[0].logprobs)) < 1e-4


@pytest.mark.parametrize("speculative", [{"method": "ngram", "num_speculative_tokens": 3},
                                         {"model": "<target>", "num_speculative_tokens": 2}], ids=["ngram", "draft"])
def test_speculative_decoding_on_two_ranks_keeps_greedy_outputs(speculative, make_ckpt):
    """Drafts are verified in the sharded forward (several sampled rows per sequence); a draft model runs whole, on
    rank 0 only (here the target itself drafts, so most drafts are accepted)."""
    path = str(make_ckpt("mistral"))
    if "model" in speculative:
        speculative = {**speculative, "model": path}
    one = LLM(path, max_model_len=192)
    prompts = _prompts(one)[:6]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = one.generate(prompts, params, use_tqdm=False)
    two = LLM(path, max_model_len=192, tensor_parallel_size=2, speculative_config=speculative)
    try:
        got = two.generate(prompts, params, use_tqdm=False)
        stats = two.engine.stats()
    finally:
        two.shutdown()
    assert stats.spec_num_accepted_tokens > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def _checkpoint_bytes(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with SafetensorsFile(file) as f:
            for name in f.keys():
                out[name] = (f.shape(name), math.prod(f.shape(name)) * torch.empty((), dtype=f.dtype(name)).element_size())
    return out


def _read_by_rank(monkeypatch, cfg: ModelConfig, size: int) -> list[int]:
    """Checkpoint bytes each rank's load reads, from the reads themselves."""
    counted: list[int] = []
    close = SafetensorsFile.close

    def counting_close(self):
        counted.append(self.bytes_read)
        close(self)

    monkeypatch.setattr(SafetensorsFile, "close", counting_close)
    totals = []
    for rank in range(size):
        counted.clear()
        load_model(cfg, CPU, torch.float32, shard=Shard(rank, size))
        totals.append(sum(counted))
    return totals


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_each_rank_reads_only_its_part(kind, make_ckpt, monkeypatch):
    """Every sharded tensor is read half by each rank, the replicated ones (norms, positions, a row-parallel layer's
    bias, and Qwen2's one KV head, which both ranks hold) whole: the byte counts are that arithmetic exactly."""
    path = make_ckpt(kind)
    cfg = ModelConfig.from_dir(path)
    tensors = _checkpoint_bytes(path)
    whole = sum(nbytes for _, nbytes in tensors.values())
    replicated = 0
    for name, (shape, nbytes) in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        kv = any(f"{p}_proj" in name for p in "kv") and cfg.num_kv_heads < 2
        row_parallel_bias = name.endswith(("o_proj.bias", "down_proj.bias", "c_proj.bias"))
        if len(shape) == 1 and not name.endswith(("_proj.bias", "c_attn.bias", "c_fc.bias")) or "wpe" in name \
                or row_parallel_bias or kv or name.endswith("attn.bias") and "c_attn" not in name:
            replicated += nbytes
    read = _read_by_rank(monkeypatch, cfg, 2)
    assert read[0] == read[1] == (whole - replicated) // 2 + replicated
    assert read[0] < 0.6 * whole


def test_layout_errors_say_what_would_work(make_ckpt, monkeypatch):
    path = str(make_ckpt("llama"))  # 4 heads, 2 KV heads, intermediate 256, vocabulary 4096
    with pytest.raises(ValidationError, match=r"does not divide the model's 4 attention heads.*sizes that would: "
                                              r"1, 2\b") as e:
        LLM(path, tensor_parallel_size=3)
    assert e.value.param == "tensor_parallel_size"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(ValidationError, match="2 ranks on this node, but this process may use only 1 CPU cores"):
        LLM(path, tensor_parallel_size=2)
    monkeypatch.undo()
    with pytest.raises(ValidationError, match="must be a multiple of nnodes"):
        LLM(path, tensor_parallel_size=2, nnodes=3)
    with pytest.raises(ValidationError, match="nnodes > 1 needs master_port"):
        LLM(path, tensor_parallel_size=2, nnodes=2)
    with pytest.raises(ValidationError, match="distributed_executor_backend must be one of mp, external_launcher"):
        LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray")


_FAIL_RANK_1 = """
import engine.model_runner as runner
import engine.models.loader as loader
from engine.errors import ModelLoadError

_load = loader.load_model


def load_model(cfg, device, dtype, load_format="auto", seed=0, shard=loader.WHOLE):
    if shard.rank == 1:
        raise ModelLoadError("injected: rank 1 cannot read its part")
    return _load(cfg, device, dtype, load_format, seed, shard)


runner.load_model = load_model
"""


def test_a_rank_that_fails_to_load_stops_the_start_and_leaves_no_process(make_ckpt, tmp_path, monkeypatch):
    """Rank 1's load fails (a sitecustomize on the worker's PYTHONPATH patches its loader; this process is untouched):
    the engine does not start, the error names the rank and the reason, no process is left, and the next
    tensor-parallel engine of this process starts."""
    (tmp_path / "sitecustomize.py").write_text(_FAIL_RANK_1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    path = str(make_ckpt("llama"))
    before = children()
    with pytest.raises(RuntimeError, match="rank 1 failed to start: ModelLoadError: injected: rank 1 cannot read"):
        LLM(path, tensor_parallel_size=2)
    assert children() <= before
    monkeypatch.undo()
    llm = LLM(path, tensor_parallel_size=2)
    try:
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()


def test_the_config_reaches_a_worker_whole_as_plain_json(make_ckpt):
    """A worker gets its EngineConfig as JSON (no pickle anywhere): every field survives, and only config classes
    decode."""
    import json

    from engine.engine_args import EngineArgs
    from engine.parallel import decode_config, encode_config

    path = str(make_ckpt("qwen3"))
    config = EngineArgs(path, dtype="bfloat16", max_model_len=128, chat_template="{{ messages }}", tensor_parallel_size=2,
                        speculative_config={"model": path, "num_speculative_tokens": 2}).create_config()
    assert decode_config(json.loads(json.dumps(encode_config(config)))) == config
    with pytest.raises(ValueError, match="not a config class"):
        decode_config({"__config__": "Popen", "args": ["sh"]})


def test_an_engine_dropped_without_shutdown_stops_its_ranks(make_ckpt):
    """`del llm`, as users do: the ranks stop and the group is left, so the next tensor-parallel engine starts."""
    import gc

    path = str(make_ckpt("gpt2"))
    before = children()
    llm = LLM(path, tensor_parallel_size=2)
    first = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    del llm
    gc.collect()
    assert children() <= before
    again = LLM(path, tensor_parallel_size=2)
    try:
        second = again.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    finally:
        again.shutdown()
    assert second[0].outputs[0].token_ids == first[0].outputs[0].token_ids


def test_a_worker_stopped_before_the_logits_gather_ends_the_wait(make_ckpt):
    """Rank 0 waits in the logits gather for a worker that a SIGSTOP caught during its LM head: the gloo wait asks
    check_workers between polls, so it ends with the worker named after about a second (_STOPPED_S), not at gloo's
    ten-minute timeout. (Before, this race made a served stream hang now and then.)"""
    import signal
    import threading

    llm = LLM(str(make_ckpt("llama")), tensor_parallel_size=2)
    group = llm.engine.core.runner.tp
    [worker] = group.workers
    errors: list[BaseException] = []

    def gather():
        try:
            group.gather_logits(torch.zeros(2, 8))
        except BaseException as exc:  # noqa: BLE001 - what the engine thread would see
            errors.append(exc)

    os.kill(worker.pid, signal.SIGSTOP)
    try:
        waiting = threading.Thread(target=gather, daemon=True)
        start = time.monotonic()
        waiting.start()
        waiting.join(20)
        assert not waiting.is_alive(), "rank 0 still waits for a stopped worker"
        assert time.monotonic() - start < 10
        assert len(errors) == 1 and "has been stopped for" in str(errors[0]) and f"pid {worker.pid}" in str(errors[0])
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        llm.engine.shutdown(kill=True)  # the worker sits in a collective rank 0 has left
        llm.shutdown()  # then leave the group, so later engines of this process can form their own


class _StepHeldByAStoppedRank:
    """An engine whose step waits in a collective that never checks the workers, while its worker is stopped: what
    AsyncEngine's worker monitor exists for. Killing the workers (shutdown(kill=True)) makes the step fail."""

    info = type("Info", (), {"tensor_parallel_size": 2})()

    def __init__(self):
        self.stopped, self.killed = threading.Event(), threading.Event()

    def stats(self):
        return None

    def check_health(self):
        if self.stopped.is_set():
            raise RuntimeError("tensor-parallel worker rank 1 (pid 4242) has been stopped for 1.2 s (SIGSTOP?)")

    def has_schedulable_requests(self):
        return True

    def step(self):
        self.stopped.set()
        self.killed.wait(60)
        raise RuntimeError("gloo: connection closed by peer")  # what a killed peer makes the blocked collective say

    def shutdown(self, kill=False):
        self.killed.set()


def test_the_worker_monitor_ends_a_step_held_by_a_stopped_rank():
    from engine.async_engine import AsyncEngine

    stub = _StepHeldByAStoppedRank()
    engine = AsyncEngine(lambda: stub)
    try:
        deadline = time.monotonic() + 10
        while engine.is_healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.is_healthy, "the monitor did not end the engine"
        assert stub.killed.is_set()  # the workers were killed, which unblocks the step
        assert "has been stopped for" in engine.dead_reason  # the first reason stands, not the gloo error after it
    finally:
        engine.shutdown(timeout=5)
