"""One waiting list for all workers (policy.py): a request is bound to a worker when one
admits it, so it never waits behind one worker's long requests while another has room; a
worker prefers the waiting requests whose prefix it has cached, within their priority."""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, run, step, submit


def _core(limits: Limits, *workers: FakeWorker) -> SchedulerCore:
    core = SchedulerCore(limits)
    for w in workers:
        core.add_worker(w.register(), 0.0)
    return core


def test_a_waiting_request_goes_to_the_first_worker_with_room():
    """Each worker holds one request: w1 a long one, w2 a short one. The requests behind
    them are taken by w2 as each short one ends, while w1 is still busy."""
    w1, w2 = FakeWorker("w1"), FakeWorker("w2")
    core = _core(Limits(max_num_seqs=1), w1, w2)
    submit(core, "long", 8, max_tokens=60)
    assert step(core, w1).new_requests[0].request_id == "long"
    submit(core, "short", 8, max_tokens=3)
    assert step(core, w2).new_requests[0].request_id == "short"
    for i in range(3):
        submit(core, f"next{i}", 8, max_tokens=3)
    assert core.num_waiting() == 3 and core.queued_tokens() == 24
    admitted = {}
    for _ in range(30):
        for w in (w1, w2):
            plan = step(core, w)
            for new in plan.new_requests if plan else []:
                admitted[new.request_id] = w.worker_id
    assert admitted == {f"next{i}": "w2" for i in range(3)}, "none waited behind the long request"
    assert core.requests["long"].worker_id == "w1"


def test_a_worker_prefers_requests_with_its_cached_prefix_within_a_priority_level():
    w1, w2 = FakeWorker("w1"), FakeWorker("w2")
    core = _core(Limits(max_num_seqs=1), w1, w2)
    shared = list(range(100, 164))  # four full blocks
    submit(core, "warm", 0, max_tokens=1, prompt=shared + [1])
    run(core, [w1])  # w1 now caches the shared prefix
    submit(core, "other", 0, max_tokens=1, prompt=list(range(500, 565)), arrival=0.0)
    submit(core, "same-prefix", 0, max_tokens=1, prompt=shared + [2], arrival=1.0)
    submit(core, "urgent", 0, max_tokens=1, prompt=list(range(700, 765)), arrival=2.0, priority=-1)
    seen = len(w1.plans)
    run(core, [w1])  # one at a time (max_num_seqs 1)
    order = [r.request_id for plan in w1.plans[seen:] for r in plan.new_requests]
    # Priority first; then, at the same level, the one whose prefix w1 holds passes an older one.
    assert order == ["urgent", "same-prefix", "other"]
    assert core.requests == {}


def test_requests_too_long_for_every_worker_end_and_the_rest_wait_for_one_that_fits():
    short, longer = FakeWorker("short", max_model_len=64), FakeWorker("long", max_model_len=4096)
    core = _core(Limits(), short)
    outputs = Outputs()
    submit(core, "big", 100, max_tokens=4)
    assert outputs.collect(core).finish["big"].error_code.value == "too_long"
    core = _core(Limits())
    submit(core, "big", 100, max_tokens=4)  # no worker yet: it waits for one
    core.add_worker(longer.register(), 0.0)
    core.add_worker(short.register(), 0.0)
    assert step(core, short) is None, "too long for this worker: left to the other"
    assert step(core, longer).new_requests[0].request_id == "big"


def test_a_preempted_or_migrated_request_continues_on_whichever_worker_has_room():
    w1, w2 = FakeWorker("w1"), FakeWorker("w2")
    core = _core(Limits(max_num_seqs=2), w1, w2)
    submit(core, "a", 8, max_tokens=20)
    step(core, w1)
    core.remove_worker("w1", "died")
    assert core.num_waiting() == 1 and core.requests["a"].worker_id is None
    plan = step(core, w2)
    assert [r.request_id for r in plan.new_requests] == ["a"] and core.counters.migrations == 1
    outputs = Outputs()
    run(core, [w2])
    assert len(outputs.collect(core).tokens["a"]) == 20


def test_a_burst_is_shared_between_idle_workers_in_one_pass():
    """The worker that plans first takes its share, not the whole burst; a worker past its
    share still takes what no less busy worker can hold."""
    w1, w2 = FakeWorker("w1"), FakeWorker("w2", max_model_len=64)
    core = _core(Limits(), w1, w2)
    for i in range(20):
        submit(core, f"r{i}", 8, max_tokens=4)
    firsts = {w.worker_id: len(step(core, w).new_requests) for w in (w1, w2)}
    assert firsts == {"w1": 10, "w2": 10}
    for i in range(6):
        submit(core, f"long{i}", 80, max_tokens=4)  # too long for w2
    plan = step(core, w1)
    assert sorted(r.request_id for r in plan.new_requests) == [f"long{i}" for i in range(6)]
