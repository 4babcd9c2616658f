"""Property: whatever the interleaving of arrivals, steps, aborts, failed steps and worker
losses, on workers of block sizes 16 and 32, once the dust settles every block is free
again, every request finished exactly once, and every request that ran to its length
produced exactly its own tokens."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import StepResult
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, expected_tokens, submit

WORKERS = ("w0", "w1")
BLOCK_SIZES = {"w0": 16, "w1": 32}  # requests migrate between them
SHARED_PREFIX = list(range(500, 548))  # 3 blocks some prompts start with

op = st.one_of(
    st.tuples(
        st.just("arrive"),
        st.integers(1, 90),
        st.integers(1, 12),
        st.integers(0, 2),
        st.booleans(),
        st.sampled_from([None, "t1"]),
    ),
    st.tuples(st.just("send"), st.sampled_from(WORKERS)),
    st.tuples(st.just("send"), st.sampled_from(WORKERS)),
    st.tuples(st.just("deliver"), st.sampled_from(WORKERS)),
    st.tuples(st.just("deliver"), st.sampled_from(WORKERS)),
    st.tuples(st.just("fail"), st.sampled_from(WORKERS)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("kill"), st.sampled_from(WORKERS)),
    st.tuples(st.just("join"), st.sampled_from(WORKERS)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=80), num_blocks=st.integers(8, 40), chunk=st.integers(1, 64))
def test_every_block_freed_and_every_request_finished_once(ops, num_blocks, chunk):
    core = SchedulerCore(Limits(max_num_seqs=6, max_num_batched_tokens=96, max_prefill_chunk=chunk))
    fakes: dict[str, FakeWorker] = {}
    in_flight: dict[str, object] = {}
    prompts: dict[str, int] = {}
    aborted: set[str] = set()
    out = Outputs()

    def join(wid):
        if wid not in core.workers:
            fakes[wid] = FakeWorker(
                wid, num_blocks=num_blocks, block_size=BLOCK_SIZES[wid], max_model_len=2048
            )
            core.add_worker(fakes[wid].register(), 0.0)

    def deliver(wid, fail=False):
        plan = in_flight.pop(wid, None)
        if plan is None or wid not in core.workers:
            return
        result = StepResult(plan.step_id, wid, error="boom") if fail else fakes[wid].execute(plan)
        core.on_step_result(result)

    join("w0")
    for o in ops:
        kind = o[0]
        if kind == "arrive":
            _, n, max_tokens, priority, shares, salt = o
            rid = f"r{len(prompts)}"
            prompt = SHARED_PREFIX + list(range(n)) if shares else [7000 + i for i in range(n)]
            prompts[rid] = len(prompt)
            assert submit(
                core,
                rid,
                0,
                prompt=prompt,
                max_tokens=max_tokens,
                priority=priority,
                salt=salt,
                arrival=float(len(prompts)),
            )
        elif kind == "send" and o[1] in core.workers and o[1] not in in_flight:
            plan = core.next_plan(o[1], 0.0, 0.0)
            if plan is not None:
                in_flight[o[1]] = plan
        elif kind in ("deliver", "fail"):
            deliver(o[1], fail=kind == "fail")
        elif kind == "abort":
            rid = f"r{o[1]}"
            if rid in core.requests:
                aborted.add(rid)
            core.abort(rid)
        elif kind == "kill":
            in_flight.pop(o[1], None)
            core.remove_worker(o[1], "killed")
        elif kind == "join":
            join(o[1])
        out.collect(core)

    # Settle: a worker exists, in-flight steps land, then everything runs to the end.
    join("w0")
    for wid in list(in_flight):
        deliver(wid)
    for _ in range(5000):
        progressed = False
        for wid in list(core.workers):
            plan = core.next_plan(wid, 1e6, 0.0)
            if plan is not None:
                core.on_step_result(fakes[wid].execute(plan))
                progressed = True
        if not progressed:
            break
    out.collect(core)

    assert not core.requests and core.num_waiting() == 0 and core.num_running() == 0
    assert set(out.finish) == set(prompts), "every request finished exactly once"
    for wid, w in core.workers.items():
        w.pool.check_invariants()
        assert w.pool.num_used == 0 and w.pool.num_free == num_blocks
        assert not fakes[wid].rows, "the worker was told to drop every row"
    for rid, final in out.finish.items():
        if final.finish_reason == "length":
            n = len(out.tokens[rid])
            assert out.tokens[rid] == expected_tokens(rid, prompts[rid], n)
        assert final.finish_reason in ("length", "abort", "error")
        assert (final.finish_reason == "error") == (final.error_code is not None), "every error has its code"
        if final.finish_reason == "abort":
            assert rid in aborted
