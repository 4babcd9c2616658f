"""The scheduler's state machine: requests and workers in, step plans and client outputs
out. No sockets, no Redis, no clock: the service feeds it events with the time and drains
what it produced, so hand-made step results test it. A request finishes exactly once
(each error with its ErrorCode); a worker that leaves or dies hands its requests back,
tokens kept, to continue on another. add_request puts a request in the waiting list;
every move after that goes through transitions.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.scheduler import transitions
from services.scheduler.block_pool import BlockPool
from services.scheduler.policy import Limits, schedule
from services.scheduler.request import Request, check_stop
from services.scheduler.request_outputs import (
    CoreError,
    StatusFields,
    final_output,
    final_status,
    refused_output,
    tokens_output,
)
from services.scheduler.step_plan import build_plan
from services.scheduler.worker_state import InFlightStep, WorkerState
from shared.messages import (
    ErrorCode,
    FinishReason,
    RegisterWorker,
    RequestOutput,
    RequestStatus,
    StepPlan,
    StepResult,
    SubmitRequest,
    TokenLogprobs,
)

log = logging.getLogger(__name__)

MAX_STEP_ERRORS = 3  # a request in this many failed steps ends with an error
# Abort reasons that are errors; any other ("abort", "client disconnected", "stop string") is plain.
ABORT_ERRORS = {"gateway gone": ErrorCode.GATEWAY_GONE, "request timeout": ErrorCode.REQUEST_TIMEOUT}


@dataclass
class Counters:
    preemptions: int = 0
    migrations: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    # Speculative decoding, as vLLM's spec-decode counters: decodes checked with proposals,
    # the tokens proposed, and those accepted.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # Prefix-cache figures of workers that are gone, so the published totals never shrink.
    retired_prefix_queries: int = 0
    retired_prefix_hits: int = 0


class SchedulerCore:
    def __init__(self, limits: Limits = Limits(), enable_prefix_caching: bool = True):
        self.limits = limits
        self.enable_prefix_caching = enable_prefix_caching
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.workers: dict[str, WorkerState] = {}
        self.waiting: list[Request] = []  # queued for whichever worker admits them (policy.py)
        self.counters = Counters()
        self._step_id = 0
        self._aborts: dict[str, str] = {}  # request_id -> reason, applied between steps
        self._errors_by_request: dict[str, int] = {}
        # What the service drains after each event:
        self.outputs: list[tuple[str, RequestOutput]] = []  # (reply_to, output)
        self.finished: list[Request] = []
        self.status_updates: dict[str, StatusFields] = {}
        self.errors: list[CoreError] = []

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, msg: SubmitRequest, entry_id: str = "") -> bool:
        """Queue a request. A refused one (False) gets its INVALID_REQUEST output here, to
        its own reply_to; its entry is the caller's to acknowledge."""
        refused = (
            f"duplicate request_id {msg.request_id!r}: a request with this id is already running"
            if msg.request_id in self.requests
            else "empty prompt"
            if not msg.prompt_token_ids
            else None
        )
        if refused is not None:
            log.warning("request %r refused: %s", msg.request_id, refused)
            self.errors.append({"error": f"request {msg.request_id!r} refused: {refused}"})
            self.outputs.append((msg.reply_to, refused_output(msg, refused)))
            return False
        req = Request(msg, entry_id)
        self.requests[req.request_id] = req
        self.counters.prompt_tokens += len(req.prompt_token_ids)
        self.waiting.append(req)
        self.status_updates[req.request_id] = {"status": RequestStatus.QUEUED}
        self._refuse_unservable([req])  # only the new one: the others were checked already
        return True

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Now, or if the request is in a step in flight right after its result (dropping its
        token). Unknown ids are ignored: the request may have finished already."""
        req = self.requests.get(request_id)
        if req is None:
            return
        w = self.workers.get(req.worker_id) if req.worker_id else None
        self._aborts[request_id] = reason
        if w is None or w.in_flight is None or request_id not in w.in_flight.scheduled:
            self._finish_aborted(req, w)

    def _finish_aborted(self, req: Request, w: WorkerState | None) -> None:
        reason = self._aborts[req.request_id]
        self._finish(
            req, FinishReason.ABORT, w, ABORT_ERRORS.get(reason), None if reason == "abort" else reason
        )

    # ---- workers --------------------------------------------------------------------------
    def add_worker(self, reg: RegisterWorker, now: float) -> None:
        if reg.worker_id in self.workers:  # registered again: it restarted and holds nothing
            self.remove_worker(reg.worker_id, "re-registered")
        pool = BlockPool(reg.num_blocks, reg.block_size, self.enable_prefix_caching)
        self.workers[reg.worker_id] = WorkerState(info=reg, pool=pool, last_seen=now)
        log.info(
            "worker %s joined: %d blocks of %d tokens, max_model_len %d",
            reg.worker_id,
            reg.num_blocks,
            reg.block_size,
            reg.max_model_len,
        )
        spec = self.limits.speculative
        if spec is not None and spec.method == "draft_model" and not reg.draft_model:  # NOTE: never silently
            log.warning(
                "worker %s has no draft model (its speculative_config is not the scheduler's): "
                "no speculative decoding on it",
                reg.worker_id,
            )
        self._refuse_unservable()

    def remove_worker(self, worker_id: str, reason: str) -> None:
        """The worker is gone (left, died, re-registered): requeue all it had. Their tokens
        so far were already streamed; the next worker recomputes and continues."""
        w = self.workers.pop(worker_id, None)
        if w is None:
            return
        self.counters.retired_prefix_queries += w.pool.prefix_queries
        self.counters.retired_prefix_hits += w.pool.prefix_hits
        moved = list(w.running)
        log.warning("worker %s removed (%s): %d requests requeued", worker_id, reason, len(moved))
        for req in moved:
            if req.request_id in self._aborts:  # it was waiting for this worker's step to end
                self._finish_aborted(req, None)
                continue
            self.counters.migrations += 1
            transitions.migrate(self.waiting, req)
            self.status_updates[req.request_id] = {"status": RequestStatus.QUEUED}
        self._refuse_unservable()

    # ---- stepping -------------------------------------------------------------------------
    def next_plan(self, worker_id: str, now: float, monotonic: float) -> StepPlan | None:
        """The worker's next step, or None if it has nothing to do (or one in flight)."""
        w = self.workers.get(worker_id)
        if w is None or w.in_flight is not None:
            return None
        d = schedule(w, self.limits, now, self.waiting, [o for o in self.workers.values() if o is not w])
        self.counters.preemptions += len(d.preempted)
        for req in d.preempted:
            log.info(
                "preempted %s on %s (blocks exhausted; %d tokens to recompute)",
                req.request_id,
                worker_id,
                req.num_tokens,
            )
            self.status_updates[req.request_id] = {
                "status": RequestStatus.QUEUED,
                "worker": worker_id,
                "preempted": 1,
            }
        for req in d.admitted:
            self.status_updates[req.request_id] = {"status": RequestStatus.RUNNING, "worker": worker_id}
        if not d.scheduled and not w.to_drop:
            return None
        self._step_id += 1
        plan = build_plan(self._step_id, w, d)
        w.in_flight = InFlightStep(plan.step_id, dict(d.scheduled), monotonic, d.drafts, d.draft_counts)
        return plan

    def on_step_result(self, result: StepResult) -> None:
        w = self.workers.get(result.worker_id)
        if w is None or w.in_flight is None or w.in_flight.step_id != result.step_id:
            log.warning(
                "ignored step result %d from %s: no such step in flight", result.step_id, result.worker_id
            )
            return
        step, w.in_flight = w.in_flight, None
        self.counters.steps += 1
        w.steps += 1
        if result.error:
            self._step_failed(w, step, result.error)
            return
        by_id = {r.request_id: r for r in w.running}
        if self.limits.speculative is not None:
            w.observe_step_cost(step, by_id, result.timings)
        for rid, n in step.scheduled.items():
            req = by_id.get(rid)
            if req is None:  # finished or moved meanwhile
                continue
            if step.proposed(rid):
                self._verified(w, req, step, result)
                continue
            transitions.computed(w, req, n)
            if rid in self._aborts:
                self._finish_aborted(req, w)
                continue
            chunk = result.prompt_logprobs.get(rid)
            if chunk is not None and req.needs_prompt_logprobs:
                req.add_prompt_logprobs(chunk)
            token = result.sampled_token_ids.get(rid)
            if token is None:
                continue
            lp = result.logprobs.get(rid)
            self._emit(w, req, [token], [lp] if lp else [])

    def _verified(self, w: WorkerState, req: Request, step: InFlightStep, result: StepResult) -> None:
        """A decode checked with proposals (ours, or the worker's draft model's): the accepted
        ones, then the model's own token, are its output; the cache holds its last token and
        the accepted ones."""
        rid = req.request_id
        drafts = step.drafts.get(rid) or result.draft_token_ids.get(rid, [])
        token = result.sampled_token_ids.get(rid)
        accepted = result.accepted_token_ids.get(rid, [])
        if token is None or len(drafts) != step.proposed(rid) or accepted != drafts[: len(accepted)]:
            # a worker bug: recompute the request
            self._step_failed(
                w,
                InFlightStep(result.step_id, {rid: 1}, 0.0),
                f"request {rid!r}: the verified tokens {accepted} are not a prefix of the "
                f"{step.proposed(rid)} proposed {drafts}",
            )
            return
        req.acceptance.record(len(drafts), len(accepted))
        if rid in step.draft_counts:
            w.draft_acceptance.record(len(drafts), len(accepted))
        self.counters.spec_drafts += 1
        self.counters.spec_draft_tokens += len(drafts)
        self.counters.spec_accepted_tokens += len(accepted)
        w.spec_drafts += 1
        w.spec_draft_tokens += len(drafts)
        w.spec_accepted_tokens += len(accepted)
        tokens = [*accepted, token]
        req.output_token_ids.extend(tokens)  # first: computed() hashes the blocks they fill
        transitions.computed(w, req, len(tokens))
        del req.output_token_ids[-len(tokens) :]
        if rid in self._aborts:
            self._finish_aborted(req, w)
            return
        lps = [*result.accepted_logprobs.get(rid, []), *([lp] if (lp := result.logprobs.get(rid)) else [])]
        self._emit(w, req, tokens, lps)

    def _emit(self, w: WorkerState, req: Request, tokens: list[int], logprobs: list[TokenLogprobs]) -> None:
        """Appends a step's tokens to `req` one by one, as far as its stop rules let it,
        and sends them in one output (its last, with the finish, when one stops it)."""
        start = len(req.output_token_ids)
        reason = None
        for token in tokens:
            req.output_token_ids.append(token)
            w.tokens_generated += 1
            self.counters.generation_tokens += 1
            reason = check_stop(req, w.info.eos_token_ids, w.max_len)
            if reason is not None:
                break
        out = tokens_output(req, start, logprobs)
        if reason is None:
            self.outputs.append((req.reply_to, out))
        else:
            self._finish(req, reason, w, tokens_out=out)

    def check_workers(self, monotonic: float, heartbeat_timeout: float, step_timeout: float) -> list[str]:
        """Drop workers that stopped answering; returns their ids."""
        dead = []
        for w in list(self.workers.values()):
            silent = monotonic - w.last_seen > heartbeat_timeout
            stuck = w.in_flight is not None and monotonic - w.in_flight.sent_at > step_timeout
            if silent or stuck:
                dead.append(w.worker_id)
                self.remove_worker(w.worker_id, "no heartbeat" if silent else "step timed out")
        return dead

    # ---- internals ------------------------------------------------------------------------
    def _refuse_unservable(self, requests: list[Request] | None = None) -> None:
        """Waiting `requests` (default: all, as after a worker came or went) too long for every
        worker there is end with TOO_LONG: no point waiting for one (with no worker at all,
        they wait for the first)."""
        if not self.workers:
            return
        longest = max(w.max_len for w in self.workers.values())
        for req in [r for r in (self.waiting if requests is None else requests) if r.num_tokens >= longest]:
            self._finish(
                req,
                FinishReason.ERROR,
                None,
                ErrorCode.TOO_LONG,
                f"{req.num_tokens} tokens exceed every worker's max_model_len",
            )

    def _step_failed(self, w: WorkerState, step: InFlightStep, error: str) -> None:
        """Nothing of the step can be trusted: every request in it is recomputed from its
        tokens (on this worker again), or ends with the error after MAX_STEP_ERRORS; one
        aborted during the step ends now."""
        self.counters.step_errors += 1
        log.error("step %d on %s failed: %s", step.step_id, w.worker_id, error)
        self.errors.append({"worker": w.worker_id, "step_id": step.step_id, "error": error})
        for req in [r for r in w.running if r.request_id in step.scheduled]:
            n = self._errors_by_request[req.request_id] = self._errors_by_request.get(req.request_id, 0) + 1
            if n >= MAX_STEP_ERRORS:
                self._finish(
                    req,
                    FinishReason.ERROR,
                    w,
                    ErrorCode.WORKER_FAILED,
                    f"the worker failed this request {n} times: {error}",
                )
            else:
                transitions.requeue(w, self.waiting, req, preempted=False)
                if req.request_id in self._aborts:
                    # NOTE: it is waiting now, not on `w`: finished with w=None, which takes it
                    # off the waiting list (else it would be admitted again, finished).
                    self._finish_aborted(req, None)

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        w: WorkerState | None,
        error_code: ErrorCode | None = None,
        error: str | None = None,
        tokens_out: RequestOutput | None = None,
    ) -> None:
        transitions.finish(w, self.waiting, req, reason, error_code, error)
        self.requests.pop(req.request_id, None)
        self._aborts.pop(req.request_id, None)
        self._errors_by_request.pop(req.request_id, None)
        self.counters.finished[reason.value] = self.counters.finished.get(reason.value, 0) + 1
        self.outputs.append((req.reply_to, final_output(req, tokens_out)))
        self.finished.append(req)
        self.status_updates[req.request_id] = final_status(req)

    def expire_queued(self, now: float) -> None:
        """End requests that waited past their queue timeout without ever being scheduled."""
        for req in list(self.waiting):
            limit = req.queue_timeout_s
            if limit is not None and req.first_scheduled_time is None and now - req.arrival_time > limit:
                self._finish(
                    req,
                    FinishReason.ERROR,
                    None,
                    ErrorCode.QUEUE_TIMEOUT,
                    f"queue timeout: waited {now - req.arrival_time:.1f} s for a slot (limit {limit:g} s)",
                )

    # ---- figures --------------------------------------------------------------------------
    def queued_tokens(self) -> int:
        """Tokens of waiting requests: the prefill work not started yet (for overload 429s)."""
        return sum(r.num_tokens for r in self.waiting)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def prefix_cache_totals(self) -> tuple[int, int]:
        """(queried, hit) prompt tokens since start, over every worker there ever was."""
        pools = [w.pool for w in self.workers.values()]
        return (
            self.counters.retired_prefix_queries + sum(p.prefix_queries for p in pools),
            self.counters.retired_prefix_hits + sum(p.prefix_hits for p in pools),
        )

    def num_running(self) -> int:
        return sum(len(w.running) for w in self.workers.values())
