"""The scheduler's logical KV block pool for one worker: free block ids, refcounts, and a
prefix cache of full blocks keyed by chained hashes. Pure bookkeeping; the worker owns the
physical KV tensors and only ever sees the block ids handed out here.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

_DIGEST_SIZE = 16  # bytes; a collision would serve another request's KV, so keep it wide


class NoFreeBlocks(Exception):
    """More blocks were asked for than are free (nothing was allocated)."""


def _seed(salt: str | None) -> bytes:
    # The tag byte keeps salt=None apart from salt="" and from every other salt.
    data = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8")
    return hashlib.blake2b(b"conveyor-prefix-v1" + data, digest_size=_DIGEST_SIZE).digest()


def hash_blocks(
    token_ids: Sequence[int], block_size: int, salt: str | None = None, prior: Sequence[bytes] = ()
) -> list[bytes]:
    """Chained hashes of every FULL block of token_ids: hash_i = blake2b(hash_{i-1} or the
    salt's seed, tokens of block i), so different salts (cache_salt) never share blocks.
    The result starts with `prior`, the hashes of the first blocks computed before."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full = len(token_ids) // block_size
    if len(prior) > num_full:
        raise ValueError(
            f"prior has {len(prior)} hashes but token_ids has only {num_full} full blocks of {block_size}"
        )
    hashes = list(prior)
    parent = hashes[-1] if hashes else _seed(salt)
    pack = struct.Struct(f"<{block_size}q").pack  # fixed width: token boundaries are unambiguous
    for i in range(len(hashes), num_full):
        block = token_ids[i * block_size : (i + 1) * block_size]
        h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE)
        h.update(pack(*block))
        parent = h.digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """Block ids 0..num_blocks-1, each either referenced (refcount > 0) or in the free queue.

    The free queue is ordered least-recently-freed first; allocation takes from its head.
    A freed block keeps its hash, so match_prefix can still find it and touch() can revive
    it, until allocate() evicts it:

        allocate ─▶ [ref > 0] ──free (ref→0)──▶ free queue tail ··· head ──allocate──▶
                         ▲                            │ (hash kept)        (hash dropped)
                         └────── touch (cached) ──────┘
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._refcount = [0] * self.num_blocks
        # NOTE: an OrderedDict used as an O(1) LRU queue: head = least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self._block_to_hash: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        """Allocatable now: never-used plus cached-but-unreferenced blocks."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1, from the head of the free queue (evicting cached ones)."""
        assert n >= 0, n
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._block_to_hash.pop(block_id, None)
            if block_hash is not None:
                del self._hash_to_block[block_hash]
            self._refcount[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each of a request's blocks, given in request order. Those
        reaching 0 join the free queue in REVERSE order: its tail is evicted before its prefix."""
        refcount = self._refcount
        for block_id in reversed(block_ids):
            assert refcount[block_id] > 0, f"block {block_id} freed with refcount 0"
            refcount[block_id] -= 1
            if refcount[block_id] == 0:
                self._free[block_id] = None

    def match_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest run of cached blocks matching block_hashes from the start.
        Changes no refcount; call touch() on the blocks actually reused."""
        if not self.enable_prefix_caching:
            return []
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """One more reference to each reused cached block; one at refcount 0 leaves the free queue."""
        refcount = self._refcount
        for block_id in block_ids:
            if refcount[block_id] == 0:
                # A free block without a hash may already hold someone else's KV.
                assert block_id in self._block_to_hash, f"touched uncached free block {block_id}"
                del self._free[block_id]
            refcount[block_id] += 1

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a now-full, computed block under its hash, unless another block has it
        already (two requests computed the same prefix at once): that one stays."""
        if not self.enable_prefix_caching or block_hash in self._hash_to_block:
            return
        assert self._refcount[block_id] > 0, f"caching free block {block_id}"
        assert block_id not in self._block_to_hash, f"block {block_id} already cached"
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash

    def record_prefix_query(self, queried_tokens: int, hit_tokens: int) -> None:
        assert 0 <= hit_tokens <= queried_tokens, (hit_tokens, queried_tokens)
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def check_invariants(self) -> None:
        """O(num_blocks) consistency check, for tests."""
        for block_id, ref in enumerate(self._refcount):
            assert ref >= 0, (block_id, ref)
            assert (ref == 0) == (block_id in self._free), (block_id, ref)
        assert len(self._free) + sum(r > 0 for r in self._refcount) == self.num_blocks
        assert all(0 <= b < self.num_blocks for b in self._free)
        assert len(self._hash_to_block) == len(self._block_to_hash)
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_to_hash.get(block_id) == block_hash, (block_id, block_hash)
        if not self.enable_prefix_caching:
            assert not self._hash_to_block
