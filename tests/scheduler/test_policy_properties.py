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


class _Run:
    """The scheduler and its fake workers (w0 from the start), driven one op at a time; what
    it did: the prompts' lengths, the requests aborted while they existed, every output."""

    def __init__(self, num_blocks: int, chunk: int):
        self.core = SchedulerCore(Limits(max_num_seqs=6, max_num_batched_tokens=96, max_prefill_chunk=chunk))
        self.num_blocks = num_blocks
        self.fakes: dict[str, FakeWorker] = {}
        self.in_flight: dict[str, object] = {}
        self.prompts: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.out = Outputs()
        self.join("w0")

    def join(self, wid: str) -> None:
        if wid not in self.core.workers:
            self.fakes[wid] = FakeWorker(
                wid, num_blocks=self.num_blocks, block_size=BLOCK_SIZES[wid], max_model_len=2048
            )
            self.core.add_worker(self.fakes[wid].register(), 0.0)

    def deliver(self, wid: str, fail: bool = False) -> None:
        plan = self.in_flight.pop(wid, None)
        if plan is None or wid not in self.core.workers:
            return
        result = StepResult(plan.step_id, wid, error="boom") if fail else self.fakes[wid].execute(plan)
        self.core.on_step_result(result)

    def arrive(self, n: int, max_tokens: int, priority: int, shares: bool, salt: str | None) -> None:
        rid = f"r{len(self.prompts)}"
        prompt = SHARED_PREFIX + list(range(n)) if shares else [7000 + i for i in range(n)]
        self.prompts[rid] = len(prompt)
        assert submit(
            self.core,
            rid,
            0,
            prompt=prompt,
            max_tokens=max_tokens,
            priority=priority,
            salt=salt,
            arrival=float(len(self.prompts)),
        )

    def apply(self, o: tuple) -> None:
        kind = o[0]
        if kind == "arrive":
            self.arrive(*o[1:])
        elif kind == "send" and o[1] in self.core.workers and o[1] not in self.in_flight:
            plan = self.core.next_plan(o[1], 0.0, 0.0)
            if plan is not None:
                self.in_flight[o[1]] = plan
        elif kind in ("deliver", "fail"):
            self.deliver(o[1], fail=kind == "fail")
        elif kind == "abort":
            rid = f"r{o[1]}"
            if rid in self.core.requests:
                self.aborted.add(rid)
            self.core.abort(rid)
        elif kind == "kill":
            self.in_flight.pop(o[1], None)
            self.core.remove_worker(o[1], "killed")
        elif kind == "join":
            self.join(o[1])
        self.out.collect(self.core)

    def settle(self) -> None:
        """A worker exists, in-flight steps land, then everything runs to the end."""
        self.join("w0")
        for wid in list(self.in_flight):
            self.deliver(wid)
        for _ in range(5000):
            progressed = False
            for wid in list(self.core.workers):
                plan = self.core.next_plan(wid, 1e6, 0.0)
                if plan is not None:
                    self.core.on_step_result(self.fakes[wid].execute(plan))
                    progressed = True
            if not progressed:
                break
        self.out.collect(self.core)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=80), num_blocks=st.integers(8, 40), chunk=st.integers(1, 64))
def test_every_block_freed_and_every_request_finished_once(ops, num_blocks, chunk):
    run = _Run(num_blocks, chunk)
    for o in ops:
        run.apply(o)
    run.settle()

    core, out = run.core, run.out
    assert not core.requests and core.num_waiting() == 0 and core.num_running() == 0
    assert set(out.finish) == set(run.prompts), "every request finished exactly once"
    for wid, w in core.workers.items():
        w.pool.check_invariants()
        assert w.pool.num_used == 0 and w.pool.num_free == num_blocks
        assert not run.fakes[wid].rows, "the worker was told to drop every row"
    for rid, final in out.finish.items():
        if final.finish_reason == "length":
            n = len(out.tokens[rid])
            assert out.tokens[rid] == expected_tokens(rid, run.prompts[rid], n)
        assert final.finish_reason in ("length", "abort", "error")
        assert (final.finish_reason == "error") == (final.error_code is not None), "every error has its code"
        if final.finish_reason == "abort":
            assert rid in run.aborted
