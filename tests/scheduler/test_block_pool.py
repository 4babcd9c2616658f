"""The scheduler's logical block pool: allocation, LRU eviction of freed cached blocks,
prefix matching and chained block hashes, plus a stateful test against a naive model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.scheduler.block_pool import BlockPool, NoFreeBlocks, hash_blocks

BS = 4


def fake_hash(i: int) -> bytes:
    """A block hash made from `i`: distinct for distinct `i`, as real ones are."""
    return i.to_bytes(16, "little")


# ---------------------------------------------------------------- allocate / free


def test_allocate_and_free_counts():
    pool = BlockPool(8, BS)
    assert (pool.num_free, pool.num_used, pool.usage) == (8, 0, 0.0)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert len(set(a + b)) == 5
    assert (pool.num_free, pool.num_used, pool.usage) == (3, 5, 5 / 8)
    pool.free(a)
    assert (pool.num_free, pool.num_used) == (6, 2)
    pool.free(b)
    assert (pool.num_free, pool.num_used) == (8, 0)
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_no_free_blocks_leaves_state_unchanged():
    pool = BlockPool(4, BS)
    held = pool.allocate(2)
    pool.cache_block(held[0], fake_hash(1))
    pool.free(held)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(5)
    assert pool.num_free == 4
    assert pool.match_prefix([fake_hash(1)]) == [held[0]]  # nothing was evicted
    # The same allocation order as if the failed call never happened.
    assert pool.allocate(4) == [2, 3, held[1], held[0]]
    pool.check_invariants()


def test_free_of_free_block_is_an_error():
    pool = BlockPool(2, BS)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(AssertionError):
        pool.free(b)


# ---------------------------------------------------------------- LRU order


def test_eviction_is_least_recently_freed_first():
    pool = BlockPool(6, BS)
    r1, r2, r3 = pool.allocate(2), pool.allocate(2), pool.allocate(2)
    pool.free(r2)
    pool.free(r1)
    pool.free(r3)
    # A request's blocks go back tail first: r2 = [2, 3] is queued as 3, 2.
    assert pool.allocate(6) == [r2[1], r2[0], r1[1], r1[0], r3[1], r3[0]]


def test_never_used_blocks_queue_ahead_of_freed_ones():
    pool = BlockPool(4, BS)
    a = pool.allocate(1)
    pool.free(a)
    assert pool.allocate(4) == [1, 2, 3, a[0]]


def test_request_tail_is_evicted_before_its_prefix():
    pool = BlockPool(3, BS)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, fake_hash(i))
    pool.free(blocks)
    hashes = [fake_hash(0), fake_hash(1), fake_hash(2)]
    assert pool.match_prefix(hashes) == blocks
    pool.allocate(1)  # evicts the tail block
    assert pool.match_prefix(hashes) == blocks[:2]
    pool.allocate(1)
    assert pool.match_prefix(hashes) == blocks[:1]


# ---------------------------------------------------------------- prefix cache


def test_freed_cached_block_is_found_until_evicted():
    pool = BlockPool(2, BS)
    (b,) = pool.allocate(1)
    pool.cache_block(b, fake_hash(7))
    assert pool.match_prefix([fake_hash(7)]) == [b]
    pool.free([b])
    assert pool.match_prefix([fake_hash(7)]) == [b]
    pool.allocate(1)  # the never-used block: b survives
    assert pool.match_prefix([fake_hash(7)]) == [b]
    assert pool.allocate(1) == [b]  # evicted and reused
    assert pool.match_prefix([fake_hash(7)]) == []
    pool.check_invariants()


def test_match_prefix_stops_at_first_miss_and_changes_no_refcount():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(3)
    pool.cache_block(blocks[0], fake_hash(0))
    pool.cache_block(blocks[2], fake_hash(2))
    assert pool.match_prefix([fake_hash(0), fake_hash(1), fake_hash(2)]) == [blocks[0]]
    assert pool.match_prefix([fake_hash(2)]) == [blocks[2]]
    assert pool.match_prefix([]) == []
    assert pool.num_used == 3


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(3, BS)
    (b,) = pool.allocate(1)
    pool.cache_block(b, fake_hash(1))
    pool.free([b])
    assert pool.num_free == 3
    pool.touch(pool.match_prefix([fake_hash(1)]))
    assert (pool.num_free, pool.num_used) == (2, 1)
    assert b not in pool.allocate(2)  # no longer in the free queue
    assert pool.match_prefix([fake_hash(1)]) == [b]  # and still cached
    pool.check_invariants()


def test_shared_blocks_return_to_free_queue_after_last_free():
    pool = BlockPool(4, BS)
    a = pool.allocate(2)
    for i, b in enumerate(a):
        pool.cache_block(b, fake_hash(i))
    pool.free(a)
    req1 = pool.match_prefix([fake_hash(0), fake_hash(1)])
    pool.touch(req1)
    req2 = pool.match_prefix([fake_hash(0), fake_hash(1)])
    pool.touch(req2)
    assert req1 == req2 == a and pool.num_used == 2
    pool.free(req1)
    assert pool.num_used == 2
    with pytest.raises(NoFreeBlocks):
        pool.allocate(3)
    pool.free(req2)
    assert (pool.num_used, pool.num_free) == (0, 4)
    pool.check_invariants()


def test_cache_block_keeps_the_first_mapping():
    pool = BlockPool(4, BS)
    a, b = pool.allocate(2)
    pool.cache_block(a, fake_hash(5))
    pool.cache_block(b, fake_hash(5))  # same content computed twice: the first stays
    pool.cache_block(a, fake_hash(5))  # re-registering is harmless
    assert pool.match_prefix([fake_hash(5)]) == [a]
    pool.free([b])
    pool.check_invariants()
    pool.free([a])
    assert pool.match_prefix([fake_hash(5)]) == [a]


def test_prefix_caching_disabled():
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    (b,) = pool.allocate(1)
    pool.cache_block(b, fake_hash(1))
    assert pool.match_prefix([fake_hash(1)]) == []
    pool.free([b])
    assert pool.match_prefix([fake_hash(1)]) == []
    pool.check_invariants()


def test_hit_counters():
    pool = BlockPool(4, BS)
    pool.record_prefix_query(32, 16)
    pool.record_prefix_query(8, 0)
    assert (pool.prefix_queries, pool.prefix_hits) == (40, 16)


# ---------------------------------------------------------------- hash_blocks


def test_hash_blocks_hashes_only_full_blocks():
    assert hash_blocks([1, 2, 3], BS) == []
    hs = hash_blocks(list(range(11)), BS)
    assert len(hs) == 2
    assert all(isinstance(h, bytes) and len(h) >= 16 for h in hs)
    assert hash_blocks(list(range(8)), BS) == hs  # the partial tail changes nothing


def test_hash_blocks_chain():
    tokens = list(range(16))
    base = hash_blocks(tokens, BS)
    changed = hash_blocks([99] + tokens[1:], BS)
    assert all(a != b for a, b in zip(base, changed))  # block 0 changes every later hash
    changed_late = hash_blocks(tokens[:8] + [99] + tokens[9:], BS)
    assert changed_late[:2] == base[:2] and changed_late[2] != base[2] and changed_late[3] != base[3]
    # Same block content at a different position hashes differently (parent differs).
    rep = hash_blocks([1, 2, 3, 4] * 2, BS)
    assert rep[0] != rep[1]
    assert hash_blocks(tokens, BS) == base  # deterministic


def test_hash_blocks_token_boundaries_are_unambiguous():
    assert hash_blocks([1, 23, 4, 5], BS) != hash_blocks([12, 3, 4, 5], BS)
    assert hash_blocks([256, 0, 0, 0], BS) != hash_blocks([0, 1, 0, 0], BS)
    # Large vocabularies: ids differing only above the low bytes must not collide.
    assert hash_blocks([256, 0, 0, 0], BS) != hash_blocks([0, 0, 0, 0], BS)
    assert hash_blocks([151_000, 0, 0, 0], BS) != hash_blocks([151_000 % 65536, 0, 0, 0], BS)


def test_hash_blocks_salt_isolation():
    tokens = list(range(8))
    plain = hash_blocks(tokens, BS)
    a = hash_blocks(tokens, BS, salt="tenant-a")
    b = hash_blocks(tokens, BS, salt="tenant-b")
    empty = hash_blocks(tokens, BS, salt="")
    for h in range(2):
        assert len({plain[h], a[h], b[h], empty[h]}) == 4
    assert hash_blocks(tokens, BS, salt="tenant-a") == a
    # In the pool: a block cached under one salt is not matched under another.
    pool = BlockPool(4, BS)
    blocks = pool.allocate(2)
    for blk, h in zip(blocks, a):
        pool.cache_block(blk, h)
    assert pool.match_prefix(a) == blocks
    assert pool.match_prefix(b) == [] and pool.match_prefix(plain) == []


@given(st.lists(st.integers(0, 2**31), max_size=40), st.sampled_from([None, "s"]), st.data())
@settings(max_examples=100, deadline=None)
def test_hash_blocks_prior_extension_equals_recomputation(tokens, salt, data):
    full = hash_blocks(tokens, BS, salt=salt)
    cut = data.draw(st.integers(0, len(tokens)))
    prior = hash_blocks(tokens[:cut], BS, salt=salt)
    assert hash_blocks(tokens, BS, salt=salt, prior=prior) == full


def test_hash_blocks_prior_is_returned_unchanged_and_validated():
    fake = [b"x" * 16]
    out = hash_blocks(list(range(8)), BS, prior=fake)
    assert out[0] == fake[0] and len(out) == 2
    with pytest.raises(ValueError):
        hash_blocks([1, 2, 3], BS, prior=fake)


# ---------------------------------------------------------------- stateful model test


class _NaivePool:
    """An obviously-correct O(n) reference: a list as the free queue."""

    def __init__(self, n):
        self.free_q = list(range(n))
        self.ref = [0] * n
        self.h2b, self.b2h = {}, {}

    def allocate(self, n):
        if n > len(self.free_q):
            return None
        out, self.free_q = self.free_q[:n], self.free_q[n:]
        for b in out:
            self.ref[b] = 1
            if b in self.b2h:
                del self.h2b[self.b2h.pop(b)]
        return out

    def free(self, blocks):
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_q.append(b)

    def match(self, hashes):
        out = []
        for h in hashes:
            if h not in self.h2b:
                break
            out.append(self.h2b[h])
        return out

    def touch(self, blocks):
        for b in blocks:
            if self.ref[b] == 0:
                self.free_q.remove(b)
            self.ref[b] += 1

    def cache(self, b, h):
        if h not in self.h2b:
            self.h2b[h], self.b2h[b] = b, h


N_BLOCKS = 12
hash_ids = st.integers(0, 5)  # few distinct hashes so matches and collisions are common


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(N_BLOCKS, BS)
        self.model = _NaivePool(N_BLOCKS)
        self.requests: list[list[int]] = []

    @rule(n=st.integers(0, N_BLOCKS + 2))
    def allocate(self, n):
        expected = self.model.allocate(n)
        if expected is None:
            before = self.pool.num_free
            with pytest.raises(NoFreeBlocks):
                self.pool.allocate(n)
            assert self.pool.num_free == before
        else:
            assert self.pool.allocate(n) == expected
            self.requests.append(expected)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.requests) - 1))
        blocks = self.requests.pop(i)
        self.pool.free(blocks)
        self.model.free(blocks)

    @rule(hashes=st.lists(hash_ids, max_size=4), extra=st.integers(0, 2))
    def match_and_touch(self, hashes, extra):
        hs = [fake_hash(h) for h in hashes]
        matched = self.pool.match_prefix(hs)
        assert matched == self.model.match(hs)
        self.pool.touch(matched)
        self.model.touch(matched)
        # A new request: the cached prefix plus freshly allocated blocks, as the scheduler does.
        new = self.model.allocate(extra)
        if new is None:
            with pytest.raises(NoFreeBlocks):
                self.pool.allocate(extra)
            new = []
        else:
            assert self.pool.allocate(extra) == new
        self.requests.append(matched + new)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), h=hash_ids)
    def cache(self, data, h):
        blocks = data.draw(st.sampled_from(self.requests))
        if not blocks:
            return
        b = data.draw(st.sampled_from(blocks))
        if b in self.model.b2h and self.model.b2h[b] != fake_hash(h):
            return  # a block's content, hence its hash, never changes
        self.pool.cache_block(b, fake_hash(h))
        self.model.cache(b, fake_hash(h))

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        held = {b for r in self.requests for b in r}
        assert self.pool.num_used == len(held)
        assert self.pool.num_free == len(self.model.free_q)
        for h, b in self.model.h2b.items():
            assert self.pool.match_prefix([h]) == [b]

    def teardown(self):
        for r in self.requests:
            self.pool.free(r)
        self.pool.check_invariants()
        assert self.pool.num_free == N_BLOCKS and self.pool.num_used == 0


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase
