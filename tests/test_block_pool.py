"""Block pool: allocation, freeing and exhaustion."""

import pytest

from engine.kv_cache import BlockPool, blocks_for


def test_allocate_and_free_round_trip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and set(a).isdisjoint(b)
    assert pool.num_free == 0 and pool.usage == 1.0
    pool.free(a)
    assert pool.num_free == 3 and pool.usage == pytest.approx(5 / 8)
    c = pool.allocate(3)
    assert sorted(c) == sorted(a)  # freed blocks are reused
    pool.free(b)
    pool.free(c)
    assert pool.num_free == 8 and pool.usage == 0.0


def test_exhaustion_raises_and_leaves_pool_intact():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(MemoryError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_zero_blocks_rejected():
    with pytest.raises(ValueError):
        BlockPool(0)


@pytest.mark.parametrize("tokens,block_size,expected", [(1, 16, 1), (16, 16, 1), (17, 16, 2), (0, 16, 0), (5, 1, 5)])
def test_blocks_for(tokens, block_size, expected):
    assert blocks_for(tokens, block_size) == expected
