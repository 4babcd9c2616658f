"""Starvation bounds, measured in steps and in a step-cost model rather than wall time (a
timed test would flake). A step's cost is modelled as C0 + C1 * tokens_in_step, as on a
real worker: a fixed per-step overhead plus work proportional to the tokens.

Documented bounds (README, "Fairness"):
- A long generation under a flood of short requests runs one decode every step once
  admitted, so it needs the same number of steps as alone; its time grows at most by the
  ratio of the costliest step to the cheapest, (C0 + C1*B) / (C0 + C1), B = token budget.
- A short request arriving during a long prompt's prefill is admitted at the next step,
  which holds at most `max_prefill_chunk` tokens of the long prompt.
"""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, submit

C0, C1 = 1.0, 1 / 64
LIMITS = Limits(max_num_seqs=16, max_num_batched_tokens=256, max_prefill_chunk=64, aging_seconds=10.0)


def _cost(plan) -> float:
    return C0 + C1 * sum(plan.num_scheduled_tokens.values())


def _run_long(flood_per_step: int, long_priority: int = 0) -> dict:
    """Figures of the long request, which arrives at step 10 of the flood: steps and
    modelled time from admission to finish, and which shorts were admitted before it."""
    w = FakeWorker("w0", num_blocks=4096)
    core = SchedulerCore(LIMITS)
    core.add_worker(w.register(), 0.0)
    now, n, admitted_at, steps = 0.0, 0, None, 0
    shorts_before, overtaken_by = set(), []
    out = Outputs()
    for i in range(10_000):
        for _ in range(flood_per_step):
            submit(core, f"short{n}", 24, max_tokens=4, arrival=now)
            n += 1
        if i == 10:
            submit(core, "long", 300, max_tokens=200, arrival=now, priority=long_priority)
            shorts_before = {f"short{k}" for k in range(n)}
            arrived = now
        plan = core.next_plan("w0", now, now)
        if plan is None:
            continue
        new = [r.request_id for r in plan.new_requests]
        if i >= 10 and admitted_at is None:
            ahead = new[: new.index("long")] if "long" in new else new  # batch order = admission order
            overtaken_by += [rid for rid in ahead if rid not in shorts_before]
            if "long" in new:
                admitted_at = now
        core.on_step_result(w.execute(plan))
        now += _cost(plan)
        steps += admitted_at is not None
        if "long" in out.collect(core).finish:
            return dict(
                steps=steps, time=now - admitted_at, wait=admitted_at - arrived, overtaken_by=overtaken_by
            )
    raise AssertionError("the long request never finished")


def test_long_generation_is_not_starved_by_a_flood_of_short_ones():
    alone = _run_long(flood_per_step=0)
    # 6 arrivals per step is more than 16 slots can serve (~3 per step): the queue of
    # short requests grows without end.
    flood = _run_long(flood_per_step=6)
    assert flood["overtaken_by"] == [], "no later arrival is admitted before it"
    assert flood["steps"] <= alone["steps"], "once admitted it decodes every step"
    bound = (C0 + C1 * LIMITS.max_num_batched_tokens) / (C0 + C1)
    assert flood["time"] <= bound * alone["time"], (flood["time"] / alone["time"], bound)


def test_low_priority_long_request_gets_in_through_aging():
    equal = _run_long(flood_per_step=6)
    low = _run_long(flood_per_step=6, long_priority=2)
    assert low["overtaken_by"], "more important later arrivals do go first..."
    # ...but after 2 aging periods (priority 2 -> 0) it is ahead of every newcomer: it
    # waits at most priority * aging_seconds longer than an equal-priority request.
    assert low["wait"] <= equal["wait"] + 2 * LIMITS.aging_seconds


def test_short_request_waits_at_most_one_chunk_behind_a_long_prefill():
    w = FakeWorker("w0", num_blocks=4096)
    core = SchedulerCore(LIMITS)
    core.add_worker(w.register(), 0.0)
    submit(core, "long-prompt", 4000, max_tokens=1)
    for _ in range(3):
        plan = core.next_plan("w0", 0.0, 0.0)
        core.on_step_result(w.execute(plan))
    submit(core, "short", 10, max_tokens=1)
    plan = core.next_plan("w0", 0.0, 0.0)
    assert plan.num_scheduled_tokens["short"] == 10, "admitted at the very next step"
    assert plan.num_scheduled_tokens["long-prompt"] <= LIMITS.max_prefill_chunk
    core.on_step_result(w.execute(plan))
    assert "short" in Outputs().collect(core).finish, "its first (and only) token came from that step"
