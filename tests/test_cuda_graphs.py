"""CUDA graphs for decode steps.

Without a GPU: the captured-size ladder, when graphs are off (CPU, enforce_eager, the sdpa backend),
the padding rows the step buffers build, and the padded decode path run eagerly (the same buffers and,
for Triton, the same split count a graph is captured with), which must give the tokens and logprobs
of the unpadded run and touch no real sequence's KV. The Triton variant runs in a child process
under the Triton interpreter. With a GPU: graphs against eager end to end, replays after the cache
was reused, and the capture log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import MAX_CAPTURE_SIZE, capture_sizes, cuda_graphs_unavailable, padded_size
from engine.sequence import Sequence
from engine.step_inputs import StepInputs
from kernels.backend import get_attention_backend

CUDA = torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def staggered(n: int, logprobs: int = 2) -> list[SamplingParams]:
    """Greedy, with lengths that differ, so that the decode batch shrinks through sizes that pad."""
    return [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True, logprobs=logprobs)
            for i in range(n)]


def assert_same(a, b, tol: float = 1e-4):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
            assert lx.token_id == ly.token_id and abs(lx.logprob - ly.logprob) < tol


def generate(llm: LLM, prompts, params) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


# ---- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_seqs,expected", [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (16, [1, 2, 4, 8, 16]),
    (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 32, 48, 64]),
    (256, [1, 2, 4, 8, *range(16, 257, 16)]),
    (1000, [1, 2, 4, 8, *range(16, MAX_CAPTURE_SIZE + 1, 16)]),
])
def test_capture_sizes(max_seqs, expected):
    assert capture_sizes(max_seqs) == expected


def test_capture_sizes_reject_an_empty_ladder():
    with pytest.raises(ValueError, match="at least 1"):
        capture_sizes(0)


def test_padded_size_is_the_next_captured_size():
    sizes = capture_sizes(40)  # 1, 2, 4, 8, 16, 32, 40
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 33, 40)] == [1, 2, 4, 8, 8, 16, 32, 40, 40]
    assert padded_size(41, sizes) is None


# ---- when graphs are off -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


def test_cpu_never_captures(llama):
    llm = LLM(str(llama), max_model_len=64)
    runner = llm.engine.core.runner
    assert runner.graphs is None and runner.decode_sizes == []
    assert cuda_graphs_unavailable(llm.engine.core.config, runner.backend) == "the device is cpu, not CUDA"


def test_enforce_eager_and_sdpa_never_capture(llama):
    config = LLM(str(llama), max_model_len=64).engine.core.config
    # A config only: nothing runs on it. (The suite's engines are eager by default, tests/conftest.py.)
    on_cuda = dataclasses.replace(config, device=CUDA, enforce_eager=False)
    sdpa = get_attention_backend("sdpa", torch.device("cpu"))
    assert cuda_graphs_unavailable(dataclasses.replace(on_cuda, enforce_eager=True), sdpa) == "enforce_eager is set"
    assert "sdpa attention backend" in cuda_graphs_unavailable(on_cuda, sdpa)
    pytest.importorskip("triton")
    from kernels.triton_backend import TritonBackend

    assert cuda_graphs_unavailable(on_cuda, TritonBackend()) is None
    assert cuda_graphs_unavailable(dataclasses.replace(on_cuda, enforce_eager=True), TritonBackend()) is not None


# ---- the padding rows --------------------------------------------------------------------------------


def decoding(seq_id: int, prompt_len: int, computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(seq_id, f"r{seq_id}", 0, list(range(100 + seq_id, 100 + seq_id + prompt_len)),
                   SamplingParams(),
                   max_tokens=100)
    seq.num_computed_tokens, seq.block_ids = computed, blocks
    return seq


def test_step_inputs_pad_with_harmless_rows():
    bs, padding_block = 4, 50
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_blocks_per_seq=6, block_size=bs,
                        padding_block=padding_block, device=torch.device("cpu"))
    # A prefill chunk with history (tokens 5..9 of 12), then two decodes.
    chunk, d1, d2 = decoding(0, 12, 5, [7, 3, 9]), decoding(1, 6, 5, [11, 12]), decoding(2, 9, 8, [4, 8, 20])
    batch = inputs.prepare([(chunk, 5), (d1, 1), (d2, 1)], [4, 5, 6], num_rows=3)
    positions = [5, 6, 7, 8, 9, 5, 8]
    tables = {0: [7, 3, 9], 1: [11, 12], 2: [4, 8, 20]}
    owner = [0] * 5 + [1, 2]
    assert batch.positions.tolist() == positions
    assert batch.input_ids.tolist() == [105, 106, 107, 108, 109, 106, 110]
    assert batch.slot_mapping.tolist() == [tables[s][p // bs] * bs + p % bs for s, p in zip(owner, positions)]
    assert batch.seq_lens.tolist() == [10, 6, 9] and batch.query_start.tolist() == [0, 5, 6, 7]
    assert batch.logits_rows.tolist() == [4, 5, 6]

    # Three decodes padded to eight: five one-token rows at position 0 on the padding block.
    batch = inputs.prepare([(d1, 1), (d2, 1), (decoding(3, 2, 1, [30]), 1)], [0, 1, 2], num_rows=8)
    assert batch.num_seqs == 3 and batch.num_rows == 8
    assert batch.input_ids.tolist() == [106, 110, 104] + [0] * 5
    assert batch.positions.tolist() == [5, 8, 1] + [0] * 5
    assert batch.slot_mapping.tolist() == [12 * bs + 1, 20 * bs + 0, 30 * bs + 1] + [padding_block * bs] * 5
    assert batch.seq_lens.tolist() == [6, 9, 2] + [1] * 5
    assert batch.query_start.tolist() == list(range(9))
    assert batch.block_tables[3:, 0].tolist() == [padding_block] * 5
    tables = batch.block_tables
    assert tables.shape == (8, 3) and tables[0, :2].tolist() == [11, 12] and tables[1].tolist() == [4, 8, 20]
    assert tables[2, 0] == 30
    assert batch.query_lens == [1] * 8 and batch.context_lens == [6, 9, 2, 1, 1, 1, 1, 1]
    # A graph is captured over the whole preallocated rows, which therefore keep their addresses.
    assert batch.block_tables.data_ptr() == inputs.block_tables.device.data_ptr()
    with pytest.raises(ValueError, match="cannot pad"):
        inputs.prepare([(d1, 1), (d2, 1)], [0, 1], num_rows=1)


# ---- the padded decode path, eagerly -----------------------------------------------------------------


def run_padded_and_plain(path, prompts, params, **engine_args):
    """(plain outputs, padded outputs, plain LLM, padded LLM, padded sizes seen)."""
    engine_args.setdefault("num_kv_blocks", 64)  # small caches, compared whole below
    plain = LLM(str(path), **engine_args)
    padded = LLM(str(path), **engine_args)
    runner = padded.engine.core.runner
    runner.decode_sizes = capture_sizes(engine_args["max_num_seqs"])
    seen = []
    real = runner._padded_decode

    def spy(batch):
        seen.append((batch.num_seqs, batch.num_rows))
        return real(batch)

    runner._padded_decode = spy
    return generate(plain, prompts, params), generate(padded, prompts, params), plain, padded, seen


def assert_real_blocks_match(plain: LLM, padded: LLM):
    """Padding rows wrote only the padding block: every real block holds what the plain run wrote."""
    n = plain.engine.core.runner.num_blocks
    for (k_a, v_a), (k_b, v_b) in zip(plain.engine.core.runner.kv_caches, padded.engine.core.runner.kv_caches):
        torch.testing.assert_close(k_b[:n], k_a[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_b[:n], v_a[:n], atol=1e-5, rtol=1e-5)
    assert plain.engine.core.runner.kv_caches[0][0][n].abs().sum() == 0  # never padded, never written


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral"])
def test_padded_decode_matches_unpadded(kind, make_ckpt):
    path = make_ckpt(kind)
    prompts = random_prompts(7, seed=1)
    plain_out, padded_out, plain, padded, seen = run_padded_and_plain(
        path, prompts, staggered(7), max_model_len=128, max_num_seqs=6)
    assert any(rows > seqs for seqs, rows in seen), seen  # the path under test did pad
    assert {rows for _, rows in seen} <= set(capture_sizes(6))
    assert_same(plain_out, padded_out)
    assert_real_blocks_match(plain, padded)


def test_padded_decode_with_sampling_knobs(llama):
    # Seeded sampling with every filter: the sampler sees the real rows only, so the draws are the same.
    prompts = random_prompts(5, seed=2)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                             presence_penalty=0.3, seed=7 + i, max_tokens=4 + i, ignore_eos=True, logprobs=1)
              for i in range(5)]
    plain_out, padded_out, *_ = run_padded_and_plain(llama, prompts, params, max_model_len=128, max_num_seqs=8)
    assert_same(plain_out, padded_out)


# ---- through the Triton backend, under its interpreter --------------------------------------------


def _interpreter() -> bool:
    try:
        from kernels.triton_common import interpreter_enabled
    except ImportError:
        return False
    return interpreter_enabled()


INTERPRETED = ["test_triton_padded_decode_uses_graph_metadata", "test_triton_capture_and_replay_with_stand_in_graphs"]
in_interpreter = pytest.mark.skipif(not _interpreter(), reason=(
    "runs in a child process under the Triton interpreter (test_triton_paths_under_the_interpreter)"))


def test_triton_paths_under_the_interpreter():
    """Triton settles interpreted vs compiled at its first import (during collection), so the Triton
    tests of this file run in a child pytest with TRITON_INTERPRET=1, as tests/test_triton_interpreter.py does."""
    pytest.importorskip("triton")
    if _interpreter():
        pytest.skip("this process runs them itself")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the graph tests below run these paths compiled and captured")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"{__file__}::{t}" for t in INTERPRETED)],
        cwd=Path(__file__).parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=900,
    )
    report = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0 and f"{len(INTERPRETED)} passed" in child.stdout, report


def _short_splits(monkeypatch):
    from kernels.triton_backend import TritonBackend

    # Short splits and many "SMs", so that the fixed split count of the graph metadata is well above 1.
    monkeypatch.setattr(TritonBackend, "min_keys_per_split", 8)
    monkeypatch.setattr(TritonBackend, "num_sms_off_cuda", 64)
    return TritonBackend


TRITON = dict(max_model_len=128, max_num_seqs=4, attention_backend="triton", dtype="float32")


@in_interpreter
def test_triton_padded_decode_uses_graph_metadata(make_ckpt, monkeypatch):
    """A padded decode batch is planned as for capture (split count from the batch size and
    max_model_len, whole-row block tables) and still matches the unpadded run."""
    backend_cls = _short_splits(monkeypatch)
    plans = []
    real = backend_cls.plan_graph_decode

    def spy(self, *args):
        plans.append(metadata := real(self, *args))
        return metadata

    monkeypatch.setattr(backend_cls, "plan_graph_decode", spy)
    prompts = random_prompts(4, seed=3, lo=3, hi=20)
    plain_out, padded_out, plain, padded, seen = run_padded_and_plain(make_ckpt("llama"), prompts, staggered(4),
                                                                      **TRITON)
    assert any(rows > seqs for seqs, rows in seen), seen
    kv_heads = plain.engine.core.config.model.num_kv_heads
    assert plans and all(m.max_decode_context == 128 for m in plans)
    assert max(m.num_splits(kv_heads) for m in plans) > 1
    assert_same(plain_out, padded_out)
    assert_real_blocks_match(plain, padded)


@in_interpreter
def test_triton_capture_and_replay_with_stand_in_graphs(make_ckpt, monkeypatch, caplog):
    """The start-up capture and the replays, with torch.cuda's graph API replaced by stand-ins that
    "capture" the forward run inside the capture context and "replay" by running it again."""
    import engine.model_runner as model_runner

    _short_splits(monkeypatch)
    path, prompts = make_ckpt("llama"), random_prompts(4, seed=8, lo=3, hi=20)
    plain_out = generate(LLM(str(path), num_kv_blocks=64, **TRITON), prompts, staggered(4))

    capturing, pools, captured, replays = [], [], [], []

    class StandInGraph:
        def __init__(self):
            self.body = None

        def pool(self):
            return f"pool of graph {id(self)}"

        def replay(self):
            replays.append(self)
            self.body()

    @contextlib.contextmanager
    def capture(graph, pool=None):
        pools.append(pool)
        capturing.append(graph)
        yield
        capturing.pop()

    real_forward = model_runner.ModelRunner._decode_logits

    def decode_logits(self, size, metadata):
        if capturing:
            captured.append(size)
            capturing[-1].body = lambda: self.graphs.logits[:size].copy_(real_forward(self, size, metadata))
        return real_forward(self, size, metadata)

    free = iter([10 * 2**30, 9.5 * 2**30])
    for name, value in [("CUDAGraph", StandInGraph), ("graph", capture), ("synchronize", lambda *a: None),
                        ("empty_cache", lambda: None), ("mem_get_info", lambda *a: (next(free), 80 * 2**30)),
                        ("device", lambda device: contextlib.nullcontext())]:
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(model_runner.ModelRunner, "_decode_logits", decode_logits)
    monkeypatch.setattr(model_runner, "cuda_graphs_unavailable", lambda config, backend: None)
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        graphed = LLM(str(path), num_kv_blocks=64, **TRITON)
    runner = graphed.engine.core.runner
    assert runner.decode_sizes == [1, 2, 4] and sorted(runner.graphs.graphs) == [1, 2, 4]
    assert captured == [4, 2, 1]  # largest first
    first_pool = runner.graphs.graphs[4].pool()
    assert pools == [None, first_pool, first_pool]  # one shared pool
    assert all(m.max_decode_context == 128 for m in runner.graphs.metadata.values())
    messages = [r.getMessage() for r in caplog.records]
    assert any("captured 3 decode batch sizes (1 to 4)" in m and "0.50 GiB" in m for m in messages), messages

    assert_same(plain_out, generate(graphed, prompts, staggered(4)))
    assert {g for g in replays} <= set(runner.graphs.graphs.values()) and len(replays) > 3


# ---- on a GPU ----------------------------------------------------------------------------------------


def cuda_llm(path, **kw) -> LLM:
    return LLM(str(path), device="cuda", dtype="float32", max_model_len=256, **kw)


@needs_gpu
def test_graphs_match_eager(llama, caplog):
    pytest.importorskip("triton")
    prompts = random_prompts(19, seed=4)  # batches of 19 and less: padded to 32, 16, 8, ...
    params = staggered(19)
    eager = cuda_llm(llama, max_num_seqs=32, enforce_eager=True)
    assert eager.engine.core.runner.graphs is None
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        graphed = cuda_llm(llama, max_num_seqs=32)
    runner = graphed.engine.core.runner
    assert runner.graphs is not None and sorted(runner.graphs.graphs) == capture_sizes(32)
    assert any("CUDA graphs: captured 6 decode batch sizes" in r.getMessage() and "GiB" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    replays = []
    real = runner.graphs.replay
    runner.graphs.replay = lambda size: (replays.append(size), real(size))[1]
    assert_same(generate(eager, prompts, params), generate(graphed, prompts, params), tol=1e-3)
    assert replays and set(replays) <= set(capture_sizes(32))


@needs_gpu
def test_graphs_replay_correctly_after_the_cache_is_reused(llama):
    pytest.importorskip("triton")
    # A pool of 24 blocks of 16 tokens: later batches reuse (and overwrite) the blocks of earlier ones.
    common = dict(max_num_seqs=8, block_size=16, num_kv_blocks=24, enable_prefix_caching=False)
    graphed, eager = cuda_llm(llama, **common), cuda_llm(llama, enforce_eager=True, **common)
    assert graphed.engine.core.runner.graphs is not None
    for seed in (5, 6, 7):
        prompts = random_prompts(8, seed=seed, lo=10, hi=40)
        assert_same(generate(eager, prompts, staggered(8)), generate(graphed, prompts, staggered(8)), tol=1e-3)
    assert graphed.engine.core.pool.num_free == 24


@needs_gpu
def test_sdpa_on_cuda_does_not_capture_and_says_why(llama, caplog):
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        llm = cuda_llm(llama, max_num_seqs=4, attention_backend="sdpa")
    assert llm.engine.core.runner.graphs is None and llm.engine.core.runner.decode_sizes == []
    assert any("CUDA graphs off" in r.getMessage() and "sdpa" in r.getMessage() for r in caplog.records)
