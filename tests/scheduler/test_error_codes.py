"""Every error the core emits carries its ErrorCode (what the gateway maps to an HTTP
status), an abort's reason decides whether it is an error, and the status the core
publishes is a RequestStatus."""

from __future__ import annotations

import pytest

from services.scheduler.core import MAX_STEP_ERRORS, SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import ErrorCode, FinishReason, RequestStatus, SamplingParams, StepResult, SubmitRequest
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, step, submit


def _core(w: FakeWorker, limits: Limits = Limits()) -> SchedulerCore:
    core = SchedulerCore(limits)
    core.add_worker(w.register(), 0.0)
    return core


def _final(core: SchedulerCore, rid: str):
    final = Outputs().collect(core).finish[rid]
    assert core.status_updates[rid]["status"] is (
        RequestStatus.ERROR if final.finish_reason is FinishReason.ERROR else RequestStatus.FINISHED
    )
    return final


def test_too_long_for_every_worker():
    core = _core(FakeWorker("w0", max_model_len=64))
    submit(core, "long", 64)
    final = _final(core, "long")
    assert final.finish_reason is FinishReason.ERROR and final.error_code is ErrorCode.TOO_LONG
    assert "max_model_len" in final.error


def test_queue_timeout():
    w = FakeWorker("w0")
    core = _core(w, Limits(max_num_seqs=1))
    submit(core, "busy", 8, max_tokens=100)
    core.add_request(
        SubmitRequest(
            "late", [5] * 8, SamplingParams(max_tokens=4), "tcp://gateway", 0.0, queue_timeout_s=1.0
        )
    )
    step(core, w)
    assert core.status_updates["busy"]["status"] is RequestStatus.RUNNING
    assert core.status_updates["late"]["status"] is RequestStatus.QUEUED
    core.expire_queued(2.0)
    final = _final(core, "late")
    assert final.error_code is ErrorCode.QUEUE_TIMEOUT and final.error.startswith("queue timeout")


def test_a_request_the_worker_keeps_failing():
    w = FakeWorker("w0")
    core = _core(w)
    submit(core, "r", 8)
    for _ in range(MAX_STEP_ERRORS):
        core.on_step_result(StepResult(core.next_plan("w0", 0.0, 0.0).step_id, "w0", error="boom"))
    final = _final(core, "r")
    assert final.error_code is ErrorCode.WORKER_FAILED and "boom" in final.error
    assert core.workers["w0"].pool.num_used == 0


@pytest.mark.parametrize(
    "reason, code, error",
    [
        ("abort", None, None),
        ("client disconnected", None, "client disconnected"),
        ("stop string", None, "stop string"),
        ("gateway gone", ErrorCode.GATEWAY_GONE, "gateway gone"),
        ("request timeout", ErrorCode.REQUEST_TIMEOUT, "request timeout"),
    ],
)
@pytest.mark.parametrize("when", ["waiting", "in flight", "in a failed step", "on a lost worker"])
def test_abort_reasons(reason, code, error, when):
    w = FakeWorker("w0")
    core = _core(w)
    submit(core, "r", 8, max_tokens=100)
    if when == "waiting":
        core.abort("r", reason)
    else:
        plan = core.next_plan("w0", 0.0, 0.0)
        core.abort("r", reason)  # while its step runs: applied when the step ends
        assert "r" in core.requests
        if when == "on a lost worker":
            core.remove_worker("w0", "killed")
        else:
            core.on_step_result(
                StepResult(plan.step_id, "w0", error="boom")
                if when == "in a failed step"
                else w.execute(plan)
            )
    final = _final(core, "r")
    assert final.finish_reason is FinishReason.ABORT
    assert (final.error_code, final.error) == (code, error)
    assert not core.requests and core.counters.migrations == 0
