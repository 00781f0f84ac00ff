"""The C++ decode attention kernel (kernels/cpu_decode.py, kernels/csrc/paged_decode.cpp) against a float64
reference over each sequence's contiguous history: every CPU dtype, head sizes on the vector path (multiples of 16)
and off it, block sizes that are and are not multiples of 16, MHA/GQA/MQA, sliding windows, contexts from one key to
20,000, tables scattered over the pool; and its build cache, its refusals and a failed build."""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch

from kernels import cpu_decode
from kernels.sdpa import SdpaBackend


def reference(q, k_cache, v_cache, tables, lens, scale, window):
    """q [B, H, D]; the float64 softmax attention of each sequence's query over its keys, read block by block."""
    out = []
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    for b, ctx in enumerate(lens.tolist()):
        blocks = tables[b, : -(-ctx // block_size)]
        keys = k_cache[blocks].reshape(-1, kv_heads, k_cache.shape[3])[:ctx].double()
        values = v_cache[blocks].reshape(-1, kv_heads, v_cache.shape[3])[:ctx].double()
        first = 0 if window is None else max(0, ctx - window)
        keys, values = keys[first:], values[first:]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].double(), keys) * scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(out)


def random_case(seed, seqs, heads, kv_heads, dim, block_size, max_ctx, dtype):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [rng.randint(1, max_ctx) for _ in range(seqs)]
    width = max(-(-n // block_size) for n in lens)
    num_blocks = seqs * width + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = torch.tensor([[free.pop() for _ in range(width)] for _ in range(seqs)])  # unused columns too: padding
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    q = torch.randn(seqs, heads, dim).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens)


_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # the output's own rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "window"),
    [
        (8, 8, 64, 16, None),  # MHA, the vector path
        (8, 2, 64, 16, 7),  # GQA, a window shorter than a block
        (8, 1, 128, 32, None),  # MQA, 128-wide heads, blocks of two 16-key groups
        (4, 2, 16, 8, 50),  # the smallest vector head, blocks smaller than a group of 16 keys
        (6, 3, 40, 24, None),  # a head size off the vector path, blocks of 24
        (2, 1, 80, 1, 5),  # one key per block
    ],
)
def test_matches_the_reference(dtype, heads, kv_heads, dim, block_size, window):
    for seed, seqs in enumerate((1, 3, 37)):  # one sequence: its KV heads are split between threads
        q, k_cache, v_cache, tables, lens = random_case(seed, seqs, heads, kv_heads, dim, block_size, 300, dtype)
        out = cpu_decode.NativeDecode()(q, k_cache, v_cache, tables, lens, dim**-0.5, window)
        assert out.dtype == dtype and out.shape == q.shape
        want = reference(q, k_cache, v_cache, tables, lens, dim**-0.5, window)
        torch.testing.assert_close(out.double(), want, atol=_TOLERANCE[dtype], rtol=_TOLERANCE[dtype])


def test_long_contexts_and_large_scores():
    # 20,000 and 7,001 keys; a large scale makes the softmax peaked, so the running maximum moves and rescales often.
    torch.manual_seed(0)
    lens = torch.tensor([20000, 7001])
    tables = torch.randperm(2 * 1250).view(2, 1250)
    k_cache, v_cache = torch.randn(2 * 1250, 16, 2, 64), torch.randn(2 * 1250, 16, 2, 64)
    q = torch.randn(2, 8, 64)
    for scale in (0.125, 4.0):
        out = cpu_decode.NativeDecode()(q, k_cache, v_cache, tables, lens, scale, None)
        want = reference(q, k_cache, v_cache, tables, lens, scale, None)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_one_thread_gives_the_same_result():
    q, k_cache, v_cache, tables, lens = random_case(3, 5, 8, 4, 64, 16, 200, torch.float32)
    kernel = cpu_decode.NativeDecode()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k_cache, v_cache, tables, lens, 0.125, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, kernel(q, k_cache, v_cache, tables, lens, 0.125, None))  # same loops, same order


def test_bad_inputs_are_refused_before_the_kernel_reads_memory():
    q, k_cache, v_cache, tables, lens = random_case(1, 3, 4, 2, 16, 4, 30, torch.float32)
    kernel = cpu_decode.NativeDecode()
    bad = tables.clone()
    bad[1, 0] = k_cache.shape[0]
    with pytest.raises(IndexError, match=f"outside the cache's {k_cache.shape[0]} blocks"):
        kernel(q, k_cache, v_cache, bad, lens, 0.5, None)
    too_long = lens.clone()
    too_long[2] = tables.shape[1] * 4 + 1
    with pytest.raises(IndexError, match="context length is outside"):
        kernel(q, k_cache, v_cache, tables, too_long, 0.5, None)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernel(q.double(), k_cache, v_cache, tables, lens, 0.5, None)
    with pytest.raises(ValueError, match="contiguous caches"):
        kernel(q, k_cache.transpose(0, 1), v_cache.transpose(0, 1), tables, lens, 0.5, None)
    with pytest.raises(ValueError, match="does not fit"):
        kernel(q[:2], k_cache, v_cache, tables, lens, 0.5, None)
    # Still serving after the refusals.
    out = kernel(q, k_cache, v_cache, tables, lens, 0.5, None)
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, tables, lens, 0.5, None), atol=2e-5,
                               rtol=2e-5)


def test_the_build_is_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_CACHE_DIR", str(tmp_path))
    cpu_decode.load_library.cache_clear()
    try:
        cpu_decode.load_library()
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
        mtime = built[0].stat().st_mtime_ns
        cpu_decode.load_library.cache_clear()
        cpu_decode.load_library()
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [mtime]  # loaded, not rebuilt
        monkeypatch.setattr(cpu_decode, "FLAGS", [*cpu_decode.FLAGS, "-DATTNSERVE_OTHER_BUILD"])
        cpu_decode.load_library.cache_clear()
        cpu_decode.load_library()
        assert len(list((tmp_path / "kernels").iterdir())) == 2  # other flags: another build
    finally:
        cpu_decode.load_library.cache_clear()


def test_a_failed_build_leaves_the_gather_path_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATTNSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "FLAGS", [*cpu_decode.FLAGS, "-fno-such-option-anywhere"])
    cpu_decode.load_library.cache_clear()
    try:
        backend = SdpaBackend()
        with caplog.at_level(logging.WARNING, logger="kernels.sdpa"):
            assert backend.compile_decode() is False
        assert backend.decode_kernel is None
        messages = [r.getMessage() for r in caplog.records if r.name == "kernels.sdpa"]
        assert len(messages) == 1 and "C++ decode attention kernel is unavailable" in messages[0]
        assert "-fno-such-option-anywhere" in messages[0]  # the compiler's own complaint is passed on
        assert os.listdir(tmp_path / "kernels") == []  # nothing half-built is left to load later
    finally:
        cpu_decode.load_library.cache_clear()


def test_an_unwritable_cache_directory_falls_back_to_the_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNSERVE_CACHE_DIR", str(blocker))  # kernels/ cannot be made under a file
    monkeypatch.setattr(cpu_decode.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_decode.load_library.cache_clear()
    try:
        cpu_decode.load_library()
        built = list((tmp_path / "tmp").glob("attnserve-*/kernels/*.so"))
        assert len(built) == 1
        q, k_cache, v_cache, tables, lens = random_case(2, 2, 4, 4, 64, 16, 40, torch.float32)
        out = cpu_decode.NativeDecode()(q, k_cache, v_cache, tables, lens, 0.125, None)
        torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, tables, lens, 0.125, None),
                                   atol=2e-5, rtol=2e-5)
    finally:
        cpu_decode.load_library.cache_clear()


@pytest.mark.parametrize("dim", [64, 40])  # the vector path and the plain one
def test_scores_far_below_zero_in_a_part_filled_block(dim):
    """Every score -88.7 or below (where exp(-score) overflows a float) and 5 keys in a 16-key block: the block's
    empty lanes must weigh exactly nothing, not NaN. Equal keys: the output is the mean of the values."""
    torch.manual_seed(0)
    k_cache, v_cache = torch.zeros(3, 16, 1, dim), torch.randn(3, 16, 1, dim)
    k_cache[1, :5, 0, 0] = 1.0
    for score in (-88.7, -89.4, -300.0, -443.96, -1e4):  # -89.4 and -443.96: 2^n with an all-ones exponent
        q = torch.zeros(1, 2, dim)
        q[0, :, 0] = score  # score = q . k * scale, scale 1
        out = cpu_decode.NativeDecode()(q, k_cache, v_cache, torch.tensor([[1]]), torch.tensor([5]), 1.0, None)
        assert torch.isfinite(out).all(), score
        torch.testing.assert_close(out[0], v_cache[1, :5, 0].mean(0).expand(2, dim), atol=1e-5, rtol=1e-5)
