"""The scheduler's figures, built from SchedulerCore for shared/redis_protocol.py to write:
rates over the interval since the last write, each worker's step times as its StepResults
reported them, and how many tokens its steps computed (vLLM's iteration_tokens_total).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from services.scheduler.core import SchedulerCore
from shared.figure_records import ITERATION_TOKENS_BUCKETS, SchedulerFigures, WorkerFigures
from shared.messages import StepTimings


@dataclass
class FigureBuilder:
    core: SchedulerCore
    stall_after_s: float
    _since: float = field(default_factory=time.monotonic)  # start of the current interval
    _steps_at: int = 0
    _tokens_at: int = 0
    _worker_tokens_at: dict[str, int] = field(default_factory=dict)
    _times: dict[str, list[StepTimings]] = field(default_factory=dict)  # each worker's steps in the interval
    _step_sizes: dict[str, list[int]] = field(default_factory=dict)  # WorkerFigures.iteration_tokens
    _step_tokens: dict[str, int] = field(default_factory=dict)

    def on_timings(self, worker_id: str, timings: StepTimings) -> None:
        """A step result came from the worker; called before the core takes it, so the step
        it answers is still the worker's step in flight (NOTE: the service's order)."""
        self._times.setdefault(worker_id, []).append(timings)
        w = self.core.workers.get(worker_id)
        if w is None or w.in_flight is None:
            return
        n = sum(w.in_flight.scheduled.values())
        sizes = self._step_sizes.setdefault(worker_id, [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))
        sizes[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, n)] += 1
        self._step_tokens[worker_id] = self._step_tokens.get(worker_id, 0) + n

    def worker(self, worker_id: str, elapsed_s: float = 1.0) -> WorkerFigures:
        w, now = self.core.workers[worker_id], time.monotonic()
        busy_s = now - w.in_flight.sent_at if w.in_flight else 0.0
        times = self._times.get(worker_id, [])
        tokens_at = self._worker_tokens_at.get(worker_id, 0)
        if tokens_at > w.tokens_generated:
            tokens_at = 0  # it registered again since: its counts started over
        return WorkerFigures(
            registered=w.info,
            max_len=w.max_len,
            updated_at=round(time.time(), 3),
            kv_usage=round(w.pool.usage, 4),
            running=len(w.running),
            steps=w.steps,
            tokens_generated=w.tokens_generated,
            tokens_per_s=round((w.tokens_generated - tokens_at) / elapsed_s, 2),
            step_ms=round(sum(t.total_ms for t in times) / len(times), 2) if times else 0.0,
            forward_ms=round(sum(t.forward_ms for t in times) / len(times), 2) if times else 0.0,
            step_in_flight_s=round(busy_s, 2),
            stalled=w.stalled(now, self.stall_after_s),
            spec_drafts=w.spec_drafts,
            spec_draft_tokens=w.spec_draft_tokens,
            spec_accepted_tokens=w.spec_accepted_tokens,
            iteration_tokens=list(self._step_sizes.get(worker_id, [])),
            iteration_tokens_sum=self._step_tokens.get(worker_id, 0),
        )

    def interval(self) -> tuple[SchedulerFigures, dict[str, WorkerFigures]]:
        """The figures of the interval that ends now; the next one starts."""
        mono = time.monotonic()
        elapsed = max(mono - self._since, 1e-9)
        core, c = self.core, self.core.counters
        queries, hits = core.prefix_cache_totals()
        workers = {wid: self.worker(wid, elapsed) for wid in core.workers}
        scheduler = SchedulerFigures(
            updated_at=round(time.time(), 3),
            waiting=core.num_waiting(),
            running=core.num_running(),
            queued_tokens=core.queued_tokens(),
            workers=len(workers),
            stalled_workers=sum(1 for w in workers.values() if w.stalled),
            preemptions=c.preemptions,
            migrations=c.migrations,
            prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens,
            prefix_queries=queries,
            prefix_hits=hits,
            steps_per_s=round((c.steps - self._steps_at) / elapsed, 2),
            tokens_per_s=round((c.generation_tokens - self._tokens_at) / elapsed, 2),
            step_errors=c.step_errors,
            finished=dict(c.finished),
            spec_drafts=c.spec_drafts,
            spec_draft_tokens=c.spec_draft_tokens,
            spec_accepted_tokens=c.spec_accepted_tokens,
        )
        self._since, self._steps_at, self._tokens_at = mono, c.steps, c.generation_tokens
        self._worker_tokens_at = {wid: w.tokens_generated for wid, w in core.workers.items()}
        self._times.clear()
        return scheduler, workers
