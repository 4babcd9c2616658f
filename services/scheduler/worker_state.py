"""What the scheduler knows about one worker: its logical block pool, the requests
running on it, the rows it must drop, and the step in flight (requests wait in one list
for all workers: core.waiting).

Each worker has at most one step in flight; all workers step concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.block_pool import BlockPool
from services.scheduler.request import Request
from services.scheduler.speculation import WORKER_DECAY, Acceptance, StepCost
from shared.messages import RegisterWorker, StepTimings


@dataclass
class InFlightStep:
    step_id: int
    scheduled: dict[str, int]  # request_id -> tokens scheduled (a decode's proposed tokens included)
    sent_at: float  # monotonic
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request_id -> tokens proposed
    draft_counts: dict[str, int] = field(
        default_factory=dict
    )  # request_id -> tokens its draft model proposes

    def proposed(self, request_id: str) -> int:
        return len(self.drafts.get(request_id, ())) + self.draft_counts.get(request_id, 0)


@dataclass(eq=False)
class WorkerState:
    info: RegisterWorker
    pool: BlockPool
    # Most important first (priority, then arrival) as policy.schedule sorts it each step,
    # so that preemption takes from the end; admissions append between sorts.
    running: list[Request] = field(default_factory=list)
    to_drop: list[str] = field(default_factory=list)  # rows the next plan tells it to drop
    in_flight: InFlightStep | None = None
    last_seen: float = 0.0  # monotonic time of its last message or heartbeat
    # figures
    steps: int = 0
    tokens_generated: int = 0
    spec_drafts: int = 0  # decodes it verified with proposals
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    step_cost: StepCost = field(default_factory=StepCost)  # its decode steps' time, fitted (speculation.py)
    # Its draft model's acceptance over all its requests; idle: steps without proposals.
    draft_acceptance: Acceptance = field(default_factory=lambda: Acceptance(decay=WORKER_DECAY))

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def drafts_itself(self) -> bool:
        """It has a draft model (speculative decoding's method draft_model)."""
        return bool(self.info.draft_model)

    @property
    def max_len(self) -> int:
        """Longest request it can hold: its model's limit, or its whole KV pool if smaller (a
        request that outgrew the pool would preempt itself forever)."""
        return min(self.info.max_model_len, self.info.num_blocks * self.info.block_size)

    def stalled(self, monotonic: float, stall_after_s: float) -> bool:
        """Its step has run longer than stall_after_s: it serves nobody meanwhile."""
        return self.in_flight is not None and monotonic - self.in_flight.sent_at > stall_after_s

    def observe_step_cost(self, step: InFlightStep, by_id: dict[str, Request], timings: StepTimings) -> None:
        """A step whose every row decoded (with or without proposals) tells its step cost
        (speculation.py); prefill chunks would tell the cost of attention over prompts. A
        draft model's passes are timed apart: they cost per pass, not per token verified.
        `by_id`: its running requests by id."""
        if timings.draft_passes:
            self.step_cost.observe_draft(timings.draft_ms / timings.draft_passes)
        ms = timings.total_ms - timings.draft_ms
        if ms <= 0.0:
            return
        for rid, n in step.scheduled.items():
            req = by_id.get(rid)
            if req is None or req.num_tokens - req.num_computed_tokens != 1 or n != 1 + step.proposed(rid):
                return
        self.step_cost.observe(sum(step.scheduled.values()), ms)
