"""Which KV blocks belong to whom: tables, reference counts, prefix cache, copy-on-write.

Tensor-free on purpose: this module only does bookkeeping. The model runner
moves the bytes (block copies for copy-on-write, swaps) when the kernel's step
plan tells it to.

Prefix cache: every full block gets a chained digest
``blake2b(parent digest, tenant salt, block tokens)``. A new sequence reuses
the longest run of cached blocks whose digests and tokens match its prompt;
the salt keeps one tenant from probing another's cache. Freed blocks keep
their digest and sit in an LRU free list until a new allocation evicts them.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    id: int
    ref_count: int = 0
    digest: bytes | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class BlockTable:
    """One sequence's blocks, and the digests of its full, computed blocks."""

    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)


@functools.lru_cache(maxsize=1024)
def _salt_key(salt: str) -> bytes:
    """The whole salt as blake2b's key (at most 64 bytes): a tenant and an adapter name
    together may be longer, and cutting them would let two namespaces share KV."""
    raw = salt.encode()
    return raw if len(raw) <= 64 else hashlib.blake2b(raw, digest_size=64).digest()


def block_digest(parent: bytes | None, salt: str, tokens: tuple[int, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16, key=_salt_key(salt))
    h.update(parent or b"root")
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.hits = self.queries = 0  # prefix-cache tokens reused / looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self.free if self.blocks[b].digest is not None)

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.digest is not None:
            if self.cached.get(block.digest) == block_id:
                del self.cached[block.digest]
            block.digest, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def match_prefix(self, table: BlockTable, token_ids: list[int], salt: str) -> int:
        """Attach the longest cached prefix of ``token_ids`` to an empty table.

        Returns the number of tokens whose KV is reused. At least one token is
        always left to compute, so the step that follows yields logits.
        """
        assert not table.blocks
        usable = (len(token_ids) - 1) // self.block_size
        self.queries += len(token_ids)
        if not self.prefix_caching:
            return 0
        parent = None
        for i in range(usable):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            digest = block_digest(parent, salt, tokens)
            block_id = self.cached.get(digest)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._acquire(block_id)
            table.blocks.append(block_id)
            table.digests.append(digest)
            parent = digest
        reused = len(table.blocks) * self.block_size
        self.hits += reused
        return reused

    def allocate(self, table: BlockTable, num_computed: int, num_new: int) -> bool:
        """Make room for ``num_new`` tokens after ``num_computed``; False if out of blocks.

        A shared partial block about to be written is copied first
        (copy-on-write); the copy is queued in ``pending_copies``.
        """
        need = self.blocks_needed(table, num_computed + num_new)
        first = num_computed // self.block_size
        cow = (num_new > 0 and first < len(table.blocks)
               and self.blocks[table.blocks[first]].ref_count > 1)
        if need + cow > self.num_free:
            return False
        if cow:
            old = table.blocks[first]
            table.blocks[first] = self._take()
            self.blocks[old].ref_count -= 1
            self.pending_copies.append((old, table.blocks[first]))
        table.blocks.extend(self._take() for _ in range(need))
        return True

    def commit(self, table: BlockTable, token_ids: list[int], num_computed: int, salt: str) -> None:
        """Register newly completed full blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(num_computed // self.block_size, len(table.blocks))
        for i in range(len(table.digests), full):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = table.digests[-1] if table.digests else None
            digest = block_digest(parent, salt, tokens)
            table.digests.append(digest)
            block = self.blocks[table.blocks[i]]
            if block.digest is None and digest not in self.cached:
                block.digest, block.tokens = digest, tokens
                self.cached[digest] = block.id

    def fork(self, parent: BlockTable) -> BlockTable:
        """A child table sharing every block of ``parent`` (copy-on-write later)."""
        for block_id in parent.blocks:
            self._acquire(block_id)
        return BlockTable(list(parent.blocks), list(parent.digests))

    def release(self, table: BlockTable) -> None:
        """Drop a table's references; tail blocks become the first to be evicted."""
        for block_id in reversed(table.blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.digest is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached: reuse first
                else:
                    self.free[block_id] = None
        table.blocks.clear()
        table.digests.clear()

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
