"""The Triton attention backend against the SDPA reference backend: mixed steps (decodes and prefill
chunks with history together) over random block tables, and end to end, greedy generation through
LLM(attention_backend="triton") against the SDPA backend with chunked prefill."""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from engine import LLM, SamplingParams  # noqa: E402
from kernels.backend import get_attention_backend  # noqa: E402
from kernels.interface import BatchLayout  # noqa: E402
from kernels.kv_write import write_kv  # noqa: E402
from kernels.triton_backend import TritonBackend  # noqa: E402
# Skips this module too where the kernels cannot run in this process.
from test_triton_kernels import DEVICE, PagedBatch, assert_matches, expected_rows, make_batch  # noqa: E402


def layout_of(batch: PagedBatch) -> BatchLayout:
    return BatchLayout(batch.query_lens, batch.context_lens, batch.block_tables, batch.slot_mapping,
                       batch.k_cache.shape[1])


def random_shapes(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """(cached, new): decodes, first chunks and chunks with history, shuffled together."""
    return [(rng.randint(0, 40), rng.choice([1, 1, rng.randint(2, 24)])) for _ in range(count)]


def run_backends(batch: PagedBatch, window: int | None, triton: TritonBackend | None = None):
    """Both backends on their own copy of the cache; returns (triton out, sdpa out, triton's caches)."""
    triton = triton or TritonBackend()
    sdpa = get_attention_backend("sdpa", DEVICE)
    scale = 1 / math.sqrt(batch.q.shape[-1])
    triton_cache = (batch.k_cache.clone(), batch.v_cache.clone())
    # SDPA gathers padded key positions too and only masks their scores (0 * NaN = NaN), so it gets
    # finite garbage where the Triton kernels get NaN.
    sdpa_cache = (batch.k_cache.nan_to_num(7.0), batch.v_cache.nan_to_num(-7.0))
    outs = [
        backend.forward(batch.q, batch.k_new, batch.v_new, *cache, backend.plan(layout_of(batch)), scale, window)
        for backend, cache in ((triton, triton_cache), (sdpa, sdpa_cache))
    ]
    return outs[0], outs[1], triton_cache


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 7])
def test_mixed_step_matches_sdpa(block_size, heads, kv_heads, window):
    rng = random.Random(block_size * 100 + heads * 10 + kv_heads)
    batch = make_batch(random_shapes(rng, 7), heads, kv_heads, 16, block_size, seed=rng.randrange(1000),
                       write_new=False)
    out, reference, (k_cache, v_cache) = run_backends(batch, window)
    assert_matches(out, reference.double())
    assert_matches(out, expected_rows(batch, 1 / math.sqrt(16), window))
    # The step's K/V landed at their slots, and nothing else changed.
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv(k_ref, v_ref, batch.k_new, batch.v_new, batch.slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0, equal_nan=True)


def test_split_kv_decodes_in_a_mixed_step(monkeypatch):
    # Short splits so that this small step's decodes do split (and some splits are empty).
    monkeypatch.setattr(TritonBackend, "min_keys_per_split", 4)
    batch = make_batch([(30, 1), (2, 9), (0, 1), (45, 1), (17, 6)], 8, 2, 32, 4, seed=1, write_new=False)
    backend = TritonBackend()
    assert backend.plan(layout_of(batch)).num_splits(2) > 1
    out, reference, _ = run_backends(batch, 9, backend)
    assert_matches(out, reference.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_step_matches_naive(dtype):
    batch = make_batch([(20, 1), (0, 12), (9, 5), (3, 1)], 8, 2, 32, 16, dtype=dtype, seed=2, write_new=False)
    out, _, _ = run_backends(batch, None)
    assert out.dtype == dtype
    assert_matches(out, expected_rows(batch, 1 / math.sqrt(32), None))


def test_metadata_serves_every_layer():
    # plan() once, forward() per layer: a second layer with its own cache and inputs reuses the metadata.
    shapes = [(12, 1), (0, 6), (7, 3)]
    # Same block tables and slots (as in the engine), different K/V and queries.
    layers = [make_batch(shapes, 4, 2, 16, 4, seed=3, write_new=False, data_seed=s) for s in (3, 4)]
    backend = TritonBackend()
    metadata = backend.plan(layout_of(layers[0]))
    for batch in layers:
        out = backend.forward(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, metadata, 0.25, None)
        assert_matches(out, expected_rows(batch, 0.25, None))


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)


def random_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# Llama (GQA 2:1), Mistral (16-token sliding window), Qwen2 (MQA 4:1, qkv bias), Qwen3 (head_dim 48,
# q/k norms), GPT-2 (MHA, learned positions), over a few block sizes.
@pytest.mark.parametrize("kind,block_size", [("llama", 4), ("mistral", 4), ("qwen2", 16), ("qwen3", 1), ("gpt2", 16)])
def test_generation_matches_sdpa(kind, block_size, make_ckpt, monkeypatch):
    """Chunks of at most 16 tokens: prompts past the first chunk attend over cached history, mixed with
    other sequences' decodes; Mistral's window cuts into both."""
    monkeypatch.setattr(TritonBackend, "min_keys_per_split", 8)  # split-KV on these short contexts too
    path = str(make_ckpt(kind))
    prompts = random_prompts(3, seed=5, lo=18, hi=40)
    common = dict(device=DEVICE.type, dtype="float32", max_model_len=128, max_num_batched_tokens=16,
                  block_size=block_size)
    fast_out, reference_out = (
        [o.outputs[0] for o in LLM(path, attention_backend=b, **common).generate(prompts, GREEDY, use_tqdm=False)]
        for b in ("triton", "sdpa")
    )
    for fast, reference in zip(fast_out, reference_out, strict=True):
        assert fast.token_ids == reference.token_ids
        for a, b in zip(fast.logprobs, reference.logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
