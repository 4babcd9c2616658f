"""A request aborted while its step runs, when that step then fails: it ends once, as aborted,
and never runs again (it was once finished but left on the waiting list, admitted again, and its
tokens came after its final output)."""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import StepResult
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, run, submit


def test_an_abort_during_a_failed_step_ends_the_request_once():
    w = FakeWorker("w0")
    core = SchedulerCore(Limits())
    core.add_worker(w.register(), 0.0)
    submit(core, "aborted", 8, max_tokens=20)
    submit(core, "kept", 8, max_tokens=5)
    plan = core.next_plan("w0", 0.0, 0.0)
    assert set(plan.num_scheduled_tokens) == {"aborted", "kept"}
    core.abort("aborted")  # arrives while its step runs...
    core.on_step_result(StepResult(plan.step_id, w.worker_id, {}, error="boom"))  # ...which fails
    out = Outputs().collect(core)
    assert out.finish["aborted"].finish_reason == "abort" and out.tokens["aborted"] == []
    assert all(r.request_id != "aborted" for r in core.waiting)

    run(core, [w])  # Outputs.collect asserts no output comes after a request's finish
    out.collect(core)
    assert out.tokens["aborted"] == [] and out.finish["kept"].finish_reason == "length"
    assert all("aborted" not in p.num_scheduled_tokens for p in w.plans)
    assert core.workers["w0"].pool.num_used == 0
