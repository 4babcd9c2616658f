"""Workers with different block sizes (16 and 32) in one scheduler: the router scores each
worker's prefix cache with hashes for that worker's block size, and a request migrated
from one to the other continues there with no token lost or repeated."""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, expected_tokens, run, step, submit


def test_migration_from_block_size_16_to_32_loses_nothing():
    small, big = FakeWorker("bs16", block_size=16), FakeWorker("bs32", block_size=32)
    core = SchedulerCore(Limits(max_prefill_chunk=32))
    for w in (small, big):
        core.add_worker(w.register(), 0.0)
    lengths = {f"r{i}": 20 + 13 * i for i in range(8)}
    for rid, n in lengths.items():
        submit(core, rid, n, max_tokens=24)
    for _ in range(12):  # every prompt prefilled, a few tokens decoded on each worker
        step(core, small)
        step(core, big)
    moved = [r.request_id for r in core.workers["bs16"].running]
    assert moved and all(core.requests[rid].output_token_ids for rid in moved), "killed mid-decode"
    core.remove_worker("bs16", "killed")
    run(core, [big])
    out = Outputs().collect(core)
    assert set(out.finish) == set(lengths)
    for rid, n in lengths.items():
        assert out.tokens[rid] == expected_tokens(rid, n, 24), rid
        assert out.finish[rid].finish_reason == "length"
    assert core.counters.migrations == len(moved)
    assert core.workers["bs32"].pool.num_used == 0 and not big.rows


def test_router_finds_a_prefix_cached_under_the_other_block_size():
    # "b" (block size 16) comes first, so hashing with the first candidate's block size
    # would miss the prefix cached on "a" (32) and the tie-break by id would pick "b".
    a, b = FakeWorker("a", block_size=32), FakeWorker("b", block_size=16)
    core = SchedulerCore()
    core.add_worker(b.register(), 0.0)
    prefix = list(range(100, 164))  # 2 blocks of 32, 4 of 16
    submit(core, "warm", 0, prompt=prefix + [1], max_tokens=1)
    core.remove_worker("b", "not yet")  # so that "warm" runs on "a"
    core.add_worker(a.register(), 0.0)
    run(core, [a])
    core.add_worker(b.register(), 0.0)
    submit(core, "second", 0, prompt=prefix + [2], max_tokens=1)
    plan = step(core, a)
    assert plan is not None and plan.new_requests[0].request_id == "second"
    assert plan.new_requests[0].num_computed_tokens == 64, "both cached blocks reused"
