"""The Triton kernels (KV write, split-KV decode, paged extend), through the Triton interpreter on CPU
or compiled on a GPU, each against its torch reference (kernel_oracles.py) and against naive float64
attention over the sequence's contiguous history. Caches are poisoned with NaN everywhere no live token
sits, and outputs are pre-filled with NaN, so a stray read or an unwritten row fails loudly."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import accumulate

import pytest
import torch

pytest.importorskip("triton")

from kernel_oracles import paged_decode_reference, paged_extend_reference, write_kv_reference  # noqa: E402
from kernels.triton_common import interpreter_enabled  # noqa: E402
from kernels.triton_decode import MAX_SPLITS, choose_num_splits, paged_decode_attention  # noqa: E402
from kernels.triton_extend import paged_extend_attention  # noqa: E402
from kernels.triton_kv_write import write_kv_triton  # noqa: E402

# Triton settles compiled-vs-interpreted when it is first imported, which happens during collection
# (torch._dynamo imports it). So the kernels run here on a GPU, or on CPU when this process started
# with TRITON_INTERPRET=1; otherwise test_triton_interpreter.py reruns these files in a child process.
if interpreter_enabled():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("no GPU, and triton is not in interpreter mode: test_triton_interpreter.py runs these",
                allow_module_level=True)


@dataclass
class PagedBatch:
    """Sequences with `cached` tokens of history and `new` tokens this step, in a shuffled paged cache.
    Tensors live on DEVICE, except the per-sequence histories (CPU, for the float64 reference)."""

    shapes: list[tuple[int, int]]  # (cached, new) per sequence
    q: torch.Tensor  # [num_new_tokens, heads, dim]
    k_new: torch.Tensor  # [num_new_tokens, kv_heads, dim]
    v_new: torch.Tensor
    keys: list[torch.Tensor]  # per sequence, the whole history [cached + new, kv_heads, dim]
    values: list[torch.Tensor]
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, dim], NaN outside live tokens
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padding points at a poisoned block
    slot_mapping: torch.Tensor  # [num_new_tokens] int64

    @property
    def query_lens(self) -> list[int]:
        return [n for _, n in self.shapes]

    @property
    def context_lens(self) -> list[int]:
        return [c + n for c, n in self.shapes]

    def seq_lens(self) -> torch.Tensor:
        return int32(self.context_lens)

    def query_start(self) -> torch.Tensor:
        return int32([0, *accumulate(self.query_lens)])


def int32(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=DEVICE)


def make_batch(
    shapes: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, block_size: int,
    dtype: torch.dtype = torch.float32, seed: int = 0, write_new: bool = True, data_seed: int | None = None,
) -> PagedBatch:
    """write_new: the new tokens' K/V are already in the cache (as the attention kernels expect);
    otherwise their slots hold NaN until a KV write fills them. seed draws the block tables, data_seed
    (default: seed) the tensors."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    needed = [-(-(c + n) // block_size) for c, n in shapes]
    num_blocks = sum(needed) + 8  # spare blocks stay poisoned
    # Block 0 stays unused: a masked-off block-table load that defaulted to 0 would read poison.
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    unused = 0
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables, slots, keys, values = [], [], [], []
    for (cached, new), count in zip(shapes, needed):
        blocks = [free.pop() for _ in range(count)]
        tables.append(blocks)
        k = torch.randn(cached + new, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(cached + new, kv_heads, dim, generator=gen).to(dtype)
        keys.append(k)
        values.append(v)
        for pos in range(cached + new):
            block, offset = blocks[pos // block_size], pos % block_size
            if pos < cached or write_new:
                k_cache[block, offset], v_cache[block, offset] = k[pos], v[pos]
            if pos >= cached:
                slots.append(block * block_size + offset)
    width = max(needed) + 1
    total_new = sum(n for _, n in shapes)
    return PagedBatch(
        shapes=shapes,
        q=torch.randn(total_new, heads, dim, generator=gen).to(dtype).to(DEVICE),
        k_new=torch.cat([k[c:] for (c, _), k in zip(shapes, keys)]).to(DEVICE),
        v_new=torch.cat([v[c:] for (c, _), v in zip(shapes, values)]).to(DEVICE),
        keys=keys,
        values=values,
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=torch.tensor([t + [unused] * (width - len(t)) for t in tables], device=DEVICE),
        slot_mapping=torch.tensor(slots, device=DEVICE),
    )


def naive_attention(q, keys, values, start, window, scale):
    """float64 softmax attention of q [n, H, D] at positions start.. over keys/values [ctx, Hkv, D]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(start, start + q.shape[0]).unsqueeze(1)
    k_pos = torch.arange(k.shape[0]).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def expected_rows(batch: PagedBatch, scale: float, window: int | None) -> torch.Tensor:
    """Naive float64 attention for every new token, in row order (CPU)."""
    rows, start, q = [], 0, batch.q.cpu()
    for (cached, new), k, v in zip(batch.shapes, batch.keys, batch.values):
        rows.append(naive_attention(q[start : start + new], k, v, cached, window, scale))
        start += new
    return torch.cat(rows)


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 to ~1e-5 relative, half precision to 1e-2 (design.md)."""
    tol = 1e-5 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().to(expected.dtype), expected.cpu(), atol=tol, rtol=tol)


GQA = [(4, 4), (6, 2), (4, 1)]  # MHA, 3:1 (a group that is not a power of two), MQA
BLOCK_SIZES = [1, 4, 16, 64]


# ---- decode -----------------------------------------------------------------------------------------


def check_decode(batch: PagedBatch, window: int | None, num_splits: int, block_n: int = 16) -> None:
    scale = 1 / math.sqrt(batch.q.shape[-1])
    seqs = int32(range(len(batch.shapes)))
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens(), batch.query_start(), seqs)
    out = torch.full_like(batch.q, float("nan"))
    paged_decode_attention(out, batch.q, *args, scale, window, num_splits, block_n=block_n)
    assert_matches(out, paged_decode_reference(batch.q, *args, scale, window))
    assert_matches(out, expected_rows(batch, scale, window))


# Contexts of 1, of exactly one block, and not a multiple of the block size.
DECODE_CONTEXTS = [1, 4, 16, 23, 61]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_decode_matches_references(block_size, heads, kv_heads):
    batch = make_batch([(c - 1, 1) for c in DECODE_CONTEXTS], heads, kv_heads, 16, block_size, seed=block_size + heads)
    check_decode(batch, window=None, num_splits=1)
    check_decode(batch, window=5, num_splits=3)


@pytest.mark.parametrize("num_splits", [2, 5, MAX_SPLITS])
def test_decode_splits_including_empty_ones(num_splits):
    # 16-key tiles: with 16 splits most splits of every sequence are empty, and the 1-token context has
    # a single non-empty split whatever the count.
    batch = make_batch([(c - 1, 1) for c in DECODE_CONTEXTS], 8, 2, 32, 4, seed=num_splits)
    check_decode(batch, window=None, num_splits=num_splits)
    # A window shorter than a tile: the attended span sits at the end of the context.
    check_decode(batch, window=3, num_splits=num_splits)


def test_decode_default_tiles_large_blocks_and_odd_head_dim():
    # 128-token blocks: several 64-key tiles per block.
    batch = make_batch([(c - 1, 1) for c in [1, 70, 130, 300]], 4, 2, 48, 128, seed=7)
    check_decode(batch, window=None, num_splits=4, block_n=64)
    check_decode(batch, window=100, num_splits=2, block_n=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype):
    batch = make_batch([(c - 1, 1) for c in DECODE_CONTEXTS], 8, 2, 32, 16, dtype=dtype, seed=3)
    check_decode(batch, window=None, num_splits=1)
    check_decode(batch, window=9, num_splits=4)


def test_decode_writes_only_the_decode_rows():
    # Decode rows among other tokens: the kernel finds each row through query_start and leaves the rest.
    batch = make_batch([(5, 3), (9, 1), (0, 2), (20, 1)], 4, 2, 16, 4, seed=11)
    out = torch.full_like(batch.q, float("nan"))
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens(), batch.query_start(), int32([1, 3]))
    paged_decode_attention(out, batch.q, *args, 0.25, None, 2, block_n=16)
    expected = expected_rows(batch, 0.25, None)
    decode_rows = [3, 6]
    assert_matches(out[decode_rows], expected[decode_rows])
    others = [r for r in range(out.shape[0]) if r not in decode_rows]
    assert out[others].isnan().all()


def test_split_heuristic():
    # Few sequences on a large GPU: split up to the maximum, but no split under MIN_KEYS_PER_SPLIT keys.
    assert choose_num_splits(1, 8, 32768, num_sms=132) == MAX_SPLITS
    assert choose_num_splits(1, 8, 300, num_sms=132) == 3
    # Enough programs without splitting.
    assert choose_num_splits(256, 8, 32768, num_sms=132) == 1
    assert choose_num_splits(0, 8, 0, num_sms=132) == 1
    assert choose_num_splits(4, 2, 1, num_sms=132) == 1


# ---- extend -----------------------------------------------------------------------------------------

# First chunks, chunks with history, a one-token prompt, lengths that are not multiples of the block
# size, and a chunk longer than a query tile.
EXTEND_SHAPES = [(0, 7), (13, 2), (5, 20), (33, 4), (0, 1), (3, 70)]


def check_extend(batch: PagedBatch, window: int | None, block_n: int = 16) -> None:
    scale = 1 / math.sqrt(batch.q.shape[-1])
    seqs = int32(range(len(batch.shapes)))
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens(), batch.query_start(), seqs)
    out = torch.full_like(batch.q, float("nan"))
    paged_extend_attention(out, batch.q, *args, max(batch.query_lens), scale, window, block_n=block_n)
    reference = paged_extend_reference(batch.q, *args, scale, window)
    assert_matches(out, torch.cat([reference[s] for s in range(len(batch.shapes))]))
    assert_matches(out, expected_rows(batch, scale, window))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_extend_matches_references(block_size, heads, kv_heads):
    batch = make_batch(EXTEND_SHAPES, heads, kv_heads, 16, block_size, seed=block_size * 3 + heads)
    check_extend(batch, window=None)
    check_extend(batch, window=6)


def test_extend_default_tiles_and_odd_head_dim():
    # A 90-token first chunk spans three query tiles (32 tokens x 2 heads = 64 rows); 32-token blocks,
    # two per 64-key tile.
    batch = make_batch([(0, 90), (70, 30)], 4, 2, 48, 32, seed=5)
    check_extend(batch, window=None, block_n=64)
    check_extend(batch, window=40, block_n=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extend_half_precision(dtype):
    batch = make_batch(EXTEND_SHAPES, 8, 2, 32, 16, dtype=dtype, seed=9)
    check_extend(batch, window=None)
    check_extend(batch, window=6)


# ---- KV write ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_index_copy(block_size, dtype):
    batch = make_batch([(3, 5), (0, 1), (17, 9)], 4, 2, 24, block_size, dtype=dtype, seed=block_size, write_new=False)
    # k/v as the model hands them over: views into one fused projection (token stride > heads * dim).
    fused = torch.randn(batch.k_new.shape[0], 3, 2, 24).to(dtype).to(DEVICE)
    k, v = fused[:, 1], fused[:, 2]
    slots = batch.slot_mapping.clone()
    slots[2] = -1  # a padding token: skipped
    got_k, got_v = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_triton(got_k, got_v, k, v, slots)
    want_k, want_v = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_reference(want_k, want_v, k, v, slots)
    torch.testing.assert_close(got_k, want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(got_v, want_v, atol=0, rtol=0, equal_nan=True)
    heads, dim = got_k.shape[-2:]
    assert got_k.view(-1, heads, dim)[batch.slot_mapping[2]].isnan().all()  # the skipped slot kept its poison
    torch.testing.assert_close(got_v.view(-1, heads, dim)[slots[3:]], v[3:], atol=0, rtol=0)
