"""The figures the scheduler publishes: what each worker registered, its pool-limited
length, and the step times its StepResults reported."""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.figure_builder import FigureBuilder
from shared.messages import StepTimings
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import step, submit


def _one_request_on_one_worker() -> tuple[SchedulerCore, FakeWorker, FigureBuilder]:
    """A worker whose pool (8 blocks of 16) is shorter than its model, and one request of a
    20-token prompt and 3 output tokens."""
    core = SchedulerCore()
    worker = FakeWorker("w0", num_blocks=8, block_size=16, max_model_len=4096)
    core.add_worker(worker.register(), 0.0)
    assert submit(core, "r1", prompt_len=20, max_tokens=3)
    return core, worker, FigureBuilder(core, stall_after_s=10.0)


def test_worker_figures_carry_its_registration_and_step_times():
    core, worker, figures = _one_request_on_one_worker()
    for _ in range(3):
        step(core, worker)
    figures.on_timings("w0", StepTimings(forward_ms=3.0, total_ms=4.0))
    figures.on_timings("w0", StepTimings(forward_ms=5.0, total_ms=6.0))

    scheduler, workers = figures.interval()
    w0 = workers["w0"]
    assert w0.registered == worker.register()
    assert w0.max_len == 8 * 16, "its pool holds fewer tokens than its model's 4096"
    assert (w0.step_ms, w0.forward_ms) == (5.0, 4.0), "means of the interval's steps"
    assert w0.steps == 3 and w0.tokens_generated == 3 and not w0.stalled
    assert scheduler.workers == 1 and scheduler.finished == {"length": 1} and scheduler.generation_tokens == 3

    _, workers = figures.interval()
    assert workers["w0"].step_ms == 0.0 and workers["w0"].tokens_per_s == 0.0, "no step since the last write"


def test_each_workers_steps_are_counted_by_the_tokens_they_computed():
    """As the service does: a step result's timings come while its step is still in flight."""
    core, worker, figures = _one_request_on_one_worker()
    for _ in range(3):
        plan = core.next_plan("w0", 0.0, 0.0)
        result = worker.execute(plan)
        figures.on_timings("w0", result.timings)
        core.on_step_result(result)

    w0 = figures.worker("w0")
    # The 20-token prefill (bucket le=32), then two decodes of one token (le=1).
    assert w0.iteration_tokens == [2, 0, 0, 1, *[0] * 10] and w0.iteration_tokens_sum == 22
    assert figures.interval()[1]["w0"].iteration_tokens == w0.iteration_tokens, "cumulative, not per interval"
