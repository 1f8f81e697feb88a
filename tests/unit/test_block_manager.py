"""The block manager alone: accounting, reference counts, the chained-hash prefix cache,
eviction under pressure and copy-on-write. No tensors, no model."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmos_kernel.engine.block_manager import BlockManager, BlockTable

BS = 4  # tokens per block


def filled(bm: BlockManager, tokens: list[int], salt: str = "") -> BlockTable:
    """A table as the scheduler leaves it after computing ``tokens`` in one go."""
    table = BlockTable()
    assert bm.allocate(table, 0, len(tokens))
    bm.commit(table, tokens, len(tokens), salt)
    return table


def assert_accounting(bm: BlockManager, tables: list[BlockTable]) -> None:
    """Every block is either free (ref 0) or held, and held exactly by the tables naming it."""
    held = Counter(b for t in tables for b in t.blocks)
    assert len(bm.free) + len(held) == bm.num_blocks
    for block in bm.blocks:
        assert block.ref_count == held[block.id], block
        assert (block.id in bm.free) == (block.ref_count == 0), block


def test_allocation_grows_a_table_block_by_block_and_refuses_past_the_pool():
    bm = BlockManager(num_blocks=4, block_size=BS)
    table = BlockTable()
    assert bm.allocate(table, 0, 5) and len(table.blocks) == 2
    assert bm.allocate(table, 5, 3) and len(table.blocks) == 2  # still fits block 2
    assert bm.allocate(table, 8, 1) and len(table.blocks) == 3
    other = BlockTable()
    assert not bm.allocate(other, 0, 5), "two blocks asked, one free"
    assert other.blocks == [] and bm.num_free == 1, "a refused allocation takes nothing"
    bm.release(table)
    assert table.blocks == [] and bm.num_free == 4
    assert_accounting(bm, [table, other])


def test_same_prefix_and_salt_hits_the_cache_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 112))  # exactly 3 full blocks
    first = filled(bm, prompt, salt="tenant-a")
    kept = list(first.blocks)
    bm.release(first)

    again = BlockTable()
    reused = bm.match_prefix(again, prompt, "tenant-a")
    assert reused == 8, "the last block is recomputed so the step still yields logits"
    assert again.blocks == kept[:2]

    longer = BlockTable()
    assert bm.match_prefix(longer, prompt + [7, 8], "tenant-a") == 12
    assert longer.blocks == kept
    assert bm.hits == 8 + 12 and bm.queries == 12 + 14


def test_another_salt_or_an_earlier_difference_gets_no_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(12))
    bm.release(filled(bm, prompt, salt="tenant-a"))
    assert bm.match_prefix(BlockTable(), prompt, "tenant-b") == 0
    # Same second and third blocks, different first block: the chained digest differs.
    assert bm.match_prefix(BlockTable(), [99] + prompt[1:], "tenant-a") == 0
    # A difference in the second block keeps only the first.
    assert bm.match_prefix(BlockTable(), prompt[:5] + [99] + prompt[6:], "tenant-a") == BS


def test_without_prefix_caching_nothing_is_reused():
    bm = BlockManager(num_blocks=16, block_size=BS, prefix_caching=False)
    prompt = list(range(12))
    bm.release(filled(bm, prompt))
    assert bm.match_prefix(BlockTable(), prompt, "") == 0 and bm.num_cached_free == 0


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(9))
    owner = filled(bm, prompt)
    sharer = BlockTable()
    assert bm.match_prefix(sharer, prompt, "") == 8
    assert [bm.blocks[b].ref_count for b in owner.blocks] == [2, 2, 1]
    bm.release(owner)
    assert [bm.blocks[b].ref_count for b in sharer.blocks] == [1, 1]
    assert_accounting(bm, [owner, sharer])
    bm.release(sharer)
    assert bm.num_free == 16 and bm.num_cached_free == 2


def test_cached_free_blocks_are_evicted_only_under_pressure_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(12))
    bm.release(filled(bm, prompt))  # three cached blocks, one never used
    assert bm.num_free == 4 and bm.num_cached_free == 3

    one = BlockTable()
    assert bm.allocate(one, 0, BS)
    assert bm.num_cached_free == 3, "the never-used block goes first"
    two = BlockTable()
    assert bm.allocate(two, 0, BS)
    assert bm.num_cached_free == 2
    assert bm.match_prefix(BlockTable(), prompt + [0], "") == 8, \
        "the tail block was evicted; the head of the prefix is still cached"
    assert bm.num_free == 0
    assert not bm.allocate(BlockTable(), 0, 1)


def test_a_full_pool_of_cached_blocks_still_serves_new_allocations():
    bm = BlockManager(num_blocks=3, block_size=BS)
    bm.release(filled(bm, list(range(12))))
    fresh = BlockTable()
    assert bm.allocate(fresh, 0, 12)
    assert bm.num_cached_free == 0 and bm.cached == {}
    assert bm.match_prefix(BlockTable(), list(range(12)), "") == 0


def test_writing_into_a_shared_partial_block_copies_it_first():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = filled(bm, list(range(6)))  # blocks: one full, one holding 2 of 4 tokens
    child = bm.fork(parent)
    assert child.blocks == parent.blocks
    assert [bm.blocks[b].ref_count for b in parent.blocks] == [2, 2]

    assert bm.allocate(child, 6, 1)
    shared_full, old_partial = parent.blocks
    assert child.blocks[0] == shared_full and child.blocks[1] != old_partial
    assert bm.take_copies() == [(old_partial, child.blocks[1])]
    assert bm.take_copies() == [], "copies are handed out once"
    assert bm.blocks[old_partial].ref_count == 1 and bm.blocks[shared_full].ref_count == 2
    assert bm.allocate(parent, 6, 1) and bm.take_copies() == [], "no longer shared"
    assert_accounting(bm, [parent, child])


def test_a_shared_block_needs_a_free_one_for_its_copy():
    bm = BlockManager(num_blocks=2, block_size=BS)
    parent = filled(bm, list(range(6)))
    child = bm.fork(parent)
    assert not bm.allocate(child, 6, 1)
    assert child.blocks == parent.blocks and bm.take_copies() == []


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocations, commits, prefix matches, forks and releases: the books always
    balance and the pool is never over-committed."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BS)
        self.live: list[tuple[BlockTable, list[int], int]] = []  # table, tokens, computed

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=20), salt=st.sampled_from("ab"))
    def admit(self, prompt, salt):
        table = BlockTable()
        cached = self.bm.match_prefix(table, prompt, salt)
        assert cached % BS == 0 and cached < len(prompt)
        if self.bm.allocate(table, cached, len(prompt) - cached):
            self.bm.commit(table, prompt, len(prompt), salt)
            self.live.append((table, prompt, len(prompt)))
        else:
            self.bm.release(table)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(1, 6))
    def grow(self, data, extra):
        i = data.draw(st.integers(0, len(self.live) - 1))
        table, tokens, computed = self.live[i]
        if self.bm.allocate(table, computed, extra):
            tokens = tokens + [1] * extra
            self.bm.commit(table, tokens, computed + extra, "a")
            self.live[i] = (table, tokens, computed + extra)
        self.bm.take_copies()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        table, tokens, computed = self.live[data.draw(st.integers(0, len(self.live) - 1))]
        self.live.append((self.bm.fork(table), list(tokens), computed))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):
        table, _, _ = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.bm.release(table)

    @invariant()
    def books_balance(self):
        assert_accounting(self.bm, [t for t, _, _ in self.live])
        for table, _, computed in self.live:
            assert len(table.blocks) * BS >= computed

    @invariant()
    def cache_points_at_blocks_with_that_digest(self):
        for digest, block_id in self.bm.cached.items():
            assert self.bm.blocks[block_id].digest == digest


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=40, stateful_step_count=25,
                                            deadline=None)
