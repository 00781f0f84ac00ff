"""The SDPA attention backend against a naive per-sequence reference (float64 softmax attention over
each sequence's contiguous history), over random block tables, ragged lengths, GQA and windows; with its
decodes on the gather + SDPA path and on the C++ kernel that reads the cache in place (kernels/cpu_decode.py,
which tests/test_cpu_decode.py checks on its own)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kernels.cpu_decode import NativeDecode
from kernels.backend import available_backends, get_attention_backend
from kernels.interface import BatchLayout, segment_offsets


def reference(q, keys, values, start, window, scale):
    """q [n, H, D] at positions start..start+n-1; keys/values [ctx, Hkv, D] (the whole history)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(heads // kv_heads, dim=1)
    v = values.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qpos = torch.arange(start, start + q.shape[0]).unsqueeze(1)
    kpos = torch.arange(k.shape[0]).unsqueeze(0)
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


_SHAPES = [(b, h, w) for b in (1, 4, 16) for h in ((4, 4), (8, 2), (6, 1)) for w in (None, 5)]


@pytest.mark.parametrize(
    "block_size,heads_kv,window,compiled",
    [(*shape, compiled) for shape in _SHAPES for compiled in (False, True)],
)
def test_matches_naive_attention(block_size, heads_kv, window, compiled):
    heads, kv_heads = heads_kv
    rng = random.Random(block_size * 100 + heads * 10 + kv_heads)
    torch.manual_seed(rng.randrange(1000))
    dim, num_blocks = 16, 400
    # A mix of decodes, first chunks and later chunks (cached history plus new tokens).
    shapes = [(rng.randint(0, 30), rng.choice([1, 1, rng.randint(2, 12)])) for _ in range(7)]
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, histories = [], [], []
    for cached, new in shapes:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(blocks)
        keys, values = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
        histories.append((keys, values))
        for pos in range(total):
            slot = blocks[pos // block_size] * block_size + pos % block_size
            if pos < cached:  # already in the cache from earlier steps
                k_cache.view(-1, kv_heads, dim)[slot] = keys[pos]
                v_cache.view(-1, kv_heads, dim)[slot] = values[pos]
            else:
                slots.append(slot)
    width = max(map(len, tables))
    layout = BatchLayout(
        query_lens=[n for _, n in shapes],
        context_lens=[c + n for c, n in shapes],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots),
        block_size=block_size,
    )
    q = torch.randn(sum(n for _, n in shapes), heads, dim)
    new_k = torch.cat([k[c:] for (c, _), (k, _) in zip(shapes, histories)])
    new_v = torch.cat([v[c:] for (c, _), (_, v) in zip(shapes, histories)])
    scale = 1 / math.sqrt(dim)

    backend = get_attention_backend("sdpa", torch.device("cpu"))
    assert backend.compile_decode(enable=compiled) == compiled
    assert isinstance(backend.decode_kernel, NativeDecode) == compiled
    metadata = backend.plan(layout)
    assert (metadata.decode is not None) == compiled
    out = backend.forward(q, new_k, new_v, k_cache, v_cache, metadata, scale, window)

    row = 0
    for (cached, new), (keys, values) in zip(shapes, histories):
        expected = reference(q[row : row + new], keys, values, cached, window, scale)
        torch.testing.assert_close(out[row : row + new].double(), expected, atol=1e-5, rtol=1e-5)
        row += new
    # The step's keys and values landed in the cache at their slots.
    torch.testing.assert_close(k_cache.view(-1, kv_heads, dim)[layout.slot_mapping], new_k)


def test_segment_offsets():
    seg, off = segment_offsets(torch.tensor([3, 1, 2]))
    assert seg.tolist() == [0, 0, 0, 1, 2, 2] and off.tolist() == [0, 1, 2, 0, 0, 1]


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; available: sdpa"):
        get_attention_backend("nope", torch.device("cpu"))
    assert "sdpa" in available_backends()
