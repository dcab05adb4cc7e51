import pytest

from orca_compile.runtime.block_manager import KVBlockManager


def test_allocation_is_all_or_nothing_and_exact():
    bm = KVBlockManager(num_blocks=5, block_size=4)
    assert bm.allocate("a", 9)  # 3 blocks
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 2
    assert bm.allocate("a", 12)  # still 3 blocks
    assert bm.num_used_blocks == 3
    assert not bm.allocate("b", 12)  # needs 3, only 2 free: nothing moves
    assert bm.num_free_blocks == 2 and not bm.holds("b")
    assert bm.allocate("b", 8)
    assert bm.num_free_blocks == 0
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    bm.check()
    assert bm.free("a") == 3 and bm.num_free_blocks == 3
    assert bm.free("a") == 0  # freeing twice returns nothing and breaks nothing
    bm.check()
    assert bm.allocate("c", 12) and bm.num_free_blocks == 0
    bm.check()


def test_check_catches_a_double_owned_block():
    bm = KVBlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", 2)
    bm._tables["b"] = list(bm.block_table("a"))  # simulate a bug: one block in two tables
    with pytest.raises(AssertionError):
        bm.check()


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0)])
def test_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        KVBlockManager(num_blocks, block_size)
