"""What the scheduler publishes about the system (written and read by redis_protocol.py),
as typed records, and the one rule of whether it can serve (`health`): the gateway's
/health and 503s and `python -m conveyor status --check` all use it.
"""

from __future__ import annotations

import msgspec

from shared.messages import RegisterWorker

STALE_AFTER_S = 5.0  # rewritten about every second: figures older than this mean their writer is gone
STARTUP_FAILURE_TTL_S = 600  # how long a worker's failure to start is shown (it may be fixed since)
# vLLM's buckets of tokens per engine step (vllm:iteration_tokens_total); WorkerFigures counts steps in them.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class SchedulerFigures(msgspec.Struct, kw_only=True):
    """A scheduler's gauges and counters (since it started), or their sum over several
    (`combined`). In Redis one JSON per scheduler name (`redis-cli hget conveyor:schedulers NAME`)."""

    updated_at: float  # wall-clock time of this write
    waiting: int = 0
    running: int = 0
    queued_tokens: int = 0  # tokens of requests not yet scheduled (the gateway's 429 bound)
    workers: int = 0
    stalled_workers: int = 0
    preemptions: int = 0
    migrations: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    steps_per_s: float = 0.0
    tokens_per_s: float = 0.0
    step_errors: int = 0
    finished: dict[str, int] = {}  # finish reason -> requests
    spec_drafts: int = 0  # speculative decoding: decodes checked with proposed tokens
    spec_draft_tokens: int = 0  # tokens proposed
    spec_accepted_tokens: int = 0  # of which accepted


class WorkerFigures(msgspec.Struct, kw_only=True):
    """One worker: what it registered, what the scheduler holds for it, how it performs."""

    registered: RegisterWorker
    max_len: int  # the longest request it holds (WorkerState.max_len): what the gateway validates against
    updated_at: float
    kv_usage: float = 0.0  # share of its KV blocks in use
    running: int = 0  # (requests wait for all workers at once: SchedulerFigures.waiting)
    steps: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0
    step_ms: float = 0.0  # mean worker-side time of its steps since the last write
    forward_ms: float = 0.0  # of which the forward pass
    step_in_flight_s: float = 0.0  # how long its current step has been running
    stalled: bool = False  # that step runs longer than the scheduler's stall_after
    spec_drafts: int = 0  # speculative decoding on this worker, as in SchedulerFigures
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # Its steps since the scheduler started, by the tokens each computed: a count per
    # ITERATION_TOKENS_BUCKETS bound (n <= bound, above the one before), then one for larger
    # steps; and the tokens of them all. [] before its first step.
    iteration_tokens: list[int] = []
    iteration_tokens_sum: int = 0


class ErrorRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One of the scheduler's recent errors (a capped list in Redis, newest first)."""

    error: str
    time: float
    worker: str | None = None
    step_id: int | None = None


class StartupFailure(msgspec.Struct, kw_only=True):
    """Why a worker could not start (a configuration error, its exit code 2), as it logged it."""

    error: str
    time: float


class SystemStatus(msgspec.Struct, kw_only=True):
    """Everything `read_status` returns, in one round trip."""

    scheduler: SchedulerFigures | None  # every live scheduler's figures `combined`; None: none written yet
    workers: dict[str, WorkerFigures]
    errors: list[ErrorRecord]
    queue_length: int  # entries in the request stream: queued or running
    pending: int  # of which read by the scheduler and not yet acknowledged
    schedulers: dict[str, SchedulerFigures] = {}  # each scheduler's own, by name (those gone included)
    startup_failures: dict[
        str, StartupFailure
    ] = {}  # by worker_id, old ones too (startup_failures: the recent)


def combined(schedulers: list[SchedulerFigures]) -> SchedulerFigures | None:
    """The sum of the figures of the schedulers that are live, judged against the newest
    write (a stopped scheduler's figures stay in Redis, as nothing removes them, and only
    grow stale); `updated_at` is the newest. One scheduler's figures are returned as they are."""
    if not schedulers:
        return None
    newest = max(s.updated_at for s in schedulers)
    live = [s for s in schedulers if newest - s.updated_at <= STALE_AFTER_S]
    if len(live) == 1:
        return live[0]
    total = {
        name: sum(getattr(s, name) for s in live)
        for name in SchedulerFigures.__struct_fields__
        if name not in ("updated_at", "finished")
    }
    finished: dict[str, int] = {}
    for s in live:
        for reason, n in s.finished.items():
            finished[reason] = finished.get(reason, 0) + n
    return SchedulerFigures(updated_at=newest, finished=finished, **total)


def serving_workers(status: SystemStatus, now: float) -> dict[str, WorkerFigures]:
    """Workers whose figures are fresh and whose step is not stalled."""
    return {
        wid: w for wid, w in status.workers.items() if not w.stalled and now - w.updated_at <= STALE_AFTER_S
    }


def health(status: SystemStatus, now: float, scheduler_only: bool = False) -> str | None:
    """Why nothing can be served right now, or None when it can: a live scheduler and
    (unless `scheduler_only`) at least one worker that is fresh and not stalled. With no
    such worker, the reason ends with why workers could not start lately, if any could not."""
    s = status.scheduler
    if s is None:
        return "no scheduler has published its figures yet (is the scheduler running?)"
    age = now - s.updated_at
    if age > STALE_AFTER_S:
        return f"the scheduler's figures are {age:.1f} s old (more than {STALE_AFTER_S:g} s): is it running?"
    if scheduler_only:
        return None
    if not status.workers:
        return "; ".join(["no worker is registered with the scheduler", *startup_failures(status, now)])
    if not serving_workers(status, now):
        stalled = ", ".join(
            f"{wid} (step running {w.step_in_flight_s:.0f} s)"
            for wid, w in sorted(status.workers.items())
            if w.stalled
        )
        return "; ".join(
            [
                f"every worker is stalled: {stalled}" if stalled else "no worker has fresh figures",
                *startup_failures(status, now),
            ]
        )
    return None


def startup_failures(status: SystemStatus, now: float) -> list[str]:
    """Why workers could not start lately, one line per distinct error ("worker w-1 failed to
    start: ..."); a worker registered since is left out."""
    workers_by_error: dict[str, list[str]] = {}
    for wid, failure in sorted(status.startup_failures.items()):
        if wid not in status.workers and now - failure.time <= STARTUP_FAILURE_TTL_S:
            workers_by_error.setdefault(failure.error, []).append(wid)
    return [
        f"worker{'s' if len(wids) > 1 else ''} {', '.join(wids)} failed to start: {error}"
        for error, wids in workers_by_error.items()
    ]
