"""The scheduling policy: which requests run in a worker's next step, and how many tokens
each. `schedule` applies its decision (blocks, admissions, preemptions) to the worker's
state and the waiting list through transitions.py; besides, it sorts the worker's running
list and updates the speculation's acceptance bookkeeping (speculation.py). No sockets,
no Redis, no clock.

One step = one token budget (max_num_batched_tokens) and at most max_num_seqs requests:

  1. Running requests first, most important first: a decode takes 1 token, an unfinished
     prefill takes its next chunk (at most max_prefill_chunk). When blocks run out, the
     least important running request is preempted (blocks freed, recomputed later with
     the tokens it generated) — never an error.
  2. Then waiting requests, while budget, sequence slots and blocks last. There is one
     waiting list for all workers: a request is bound to a worker when one admits it, so
     it never waits behind one worker's long requests while another has room. A worker
     admits in priority order with aging; among the first ADMIT_WINDOW of them, those of
     the same (aged) priority with more of their prefix cached on this worker first. A
     new request reuses the longest chain of cached prefix blocks; one whose next prefix
     block another request is computing right now waits for it (a step or two) rather
     than computing the same blocks again. One that asks for prompt logprobs reuses
     nothing (as in vLLM): they are computed over its whole prompt.

Speculative decoding (Limits.speculative): a decoding request takes up to k proposed tokens
after its last one, as many as pay by its recent acceptance and the worker's measured step
cost (speculation.py), counted in the step's budget; the worker checks them all in the
step's pass. N-gram prompt lookup finds them here in the request's own text; a draft model
is the worker's, which drafts as many as the plan asks (none on a worker without one).
Proposals get blocks only while every running request could still get one: they never
cause a preemption. None are made while the worker runs more requests than
`disable_by_batch_size`.

Priority: lower `priority` first, then earlier arrival. Aging lowers a waiting request's
effective priority by one level every `aging_seconds`, so nobody waits forever behind a
flood of more important work. Because a running request is decoded every step and only
the least important one is preempted, a long generation is not starved by short ones. A
prefix hit lets a request pass only those of its own priority level within the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.scheduler import transitions
from services.scheduler.request import Request
from services.scheduler.worker_state import WorkerState
from shared.messages import RequestStatus
from shared.speculative import SpeculativeConfig

# How far down the waiting list a worker looks for requests whose prefix it has cached (a
# prefix match per request looked at, each step): past it, strict priority and age order.
ADMIT_WINDOW = 32


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512  # caps one request's share, so a long prompt never takes a whole step
    aging_seconds: float = 10.0
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding


@dataclass
class Decision:
    scheduled: dict[str, int] = field(default_factory=dict)  # request_id -> tokens, in batch order
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request_id -> proposed tokens
    draft_counts: dict[str, int] = field(default_factory=dict)  # request_id -> tokens the worker drafts


def waiting_key(now: float, aging_seconds: float) -> Callable[[Request], tuple[int, float]]:
    """Sort key of a waiting request: (aged priority, arrival), lowest first."""

    def key(req: Request) -> tuple[int, float]:
        waited = max(0.0, now - req.arrival_time)
        return (req.priority - int(waited // aging_seconds), req.arrival_time)

    return key


def schedule(
    w: WorkerState, limits: Limits, now: float, waiting: list[Request], others: Sequence[WorkerState] = ()
) -> Decision:
    """The worker's next step; it admits from `waiting`, the list all workers share."""
    d = Decision()
    budget = limits.max_num_batched_tokens
    w.running.sort(key=lambda r: (r.priority, r.arrival_time))  # most important first

    spec = limits.speculative
    drafting = spec is not None and spec.method == "draft_model"
    speculating = (
        spec is not None
        and (spec.disable_by_batch_size is None or len(w.running) <= spec.disable_by_batch_size)
        and (w.drafts_itself or not drafting)
    )
    theta = (
        w.step_cost.threshold(sum(r.num_tokens - r.num_computed_tokens == 1 for r in w.running), drafting)
        if speculating
        else 1.0
    )
    i = 0
    while i < len(w.running) and budget > 0:
        req = w.running[i]
        n = _tokens_to_run(req, budget, limits)
        if speculating and n == 1:
            assert spec is not None
            n += _propose(w, req, spec, budget, theta, d)
        while not transitions.grow(w, req, req.num_computed_tokens + n):
            victim = w.running[-1]  # least important; never one already scheduled (index < i)
            transitions.requeue(w, waiting, victim, preempted=True)  # recomputed later, tokens kept
            d.preempted.append(victim)
            if victim is req:
                break
        if req.status is not RequestStatus.RUNNING:
            break  # it preempted itself: everything after it is gone too
        d.scheduled[req.request_id] = n
        budget -= n
        i += 1

    if speculating and drafting:
        w.draft_acceptance.idle = 0 if d.draft_counts else w.draft_acceptance.idle + 1
    # A step that had to preempt admits nobody: the freed blocks go to running requests.
    if not d.preempted:
        _admit_waiting(w, d, budget, limits, now, waiting, others)
    return d


def _admit_waiting(
    w: WorkerState,
    d: Decision,
    budget: int,
    limits: Limits,
    now: float,
    waiting: list[Request],
    others: Sequence[WorkerState],
) -> None:
    """Admits while budget, slots and blocks last. Past its fair share of the requests (all
    running and waiting over all workers), `w` leaves a request to a less busy worker that
    can hold it: the worker that plans first does not take a whole burst while the others,
    planning in the same loop pass, take none."""
    share = -(-(len(waiting) + len(w.running) + sum(len(o.running) for o in others)) // (1 + len(others)))

    def full() -> bool:
        return budget <= 0 or len(w.running) >= limits.max_num_seqs

    if full() or not waiting:
        return
    bs, caching = w.pool.block_size, w.pool.enable_prefix_caching
    computing = _prefix_blocks_being_computed(w) if caching else set()
    for req in _candidates(w, waiting, limits, now):
        if full():
            break
        # A request that needs prompt logprobs computes its whole prompt (see
        # Request.needs_prompt_logprobs): it neither waits for a prefix nor takes one.
        whole = req.needs_prompt_logprobs
        if caching and computing and not whole and _waits_for_prefix(w, req, computing):
            continue  # its prefix is being computed right now: it will hit the cache in a step or two
        if len(w.running) >= share and any(
            len(o.running) < len(w.running) and req.num_tokens < o.max_len for o in others
        ):
            continue  # another worker takes it
        # At least the last token is always computed: its logits are what we sample from.
        hit = [] if whole else w.pool.match_prefix(_usable_hashes(req, bs))
        n = min(req.num_tokens - len(hit) * bs, budget, limits.max_prefill_chunk)
        if not transitions.admit(w, waiting, req, hit, len(hit) * bs + n, now):
            break  # the most important waiting request does not fit: don't let others pass it
        if caching:
            computing.update(req.block_hashes_for(bs)[req.num_cached_blocks :])
        d.admitted.append(req)
        d.scheduled[req.request_id] = n
        budget -= n


def _candidates(w: WorkerState, waiting: list[Request], limits: Limits, now: float) -> list[Request]:
    """The waiting requests `w` can hold, best first for it: by aged priority and arrival;
    within the first ADMIT_WINDOW, more of the prefix cached here first at each level."""
    key = waiting_key(now, limits.aging_seconds)
    fits = sorted((r for r in waiting if r.num_tokens < w.max_len), key=key)
    if not w.pool.enable_prefix_caching or len(fits) < 2:
        return fits
    bs = w.pool.block_size

    def cached_here(r: Request) -> int:
        return 0 if r.needs_prompt_logprobs else len(w.pool.match_prefix(_usable_hashes(r, bs)))

    window = sorted(fits[:ADMIT_WINDOW], key=lambda r: (key(r)[0], -cached_here(r), key(r)[1]))
    return window + fits[ADMIT_WINDOW:]


def _prefix_blocks_being_computed(w: WorkerState) -> set[bytes]:
    """Hashes of full prompt blocks that running requests are still prefilling."""
    bs, pending = w.pool.block_size, set()
    for r in w.running:
        if r.num_computed_tokens < len(r.prompt_token_ids):
            pending.update(r.block_hashes_for(bs)[r.num_computed_tokens // bs :])
    return pending


def _waits_for_prefix(w: WorkerState, req: Request, computing: set[bytes]) -> bool:
    """True if the first block `req` would have to compute is one another request is
    computing now: admitting it this step would compute the same prefix twice."""
    usable = _usable_hashes(req, w.pool.block_size)
    hit = len(w.pool.match_prefix(usable))
    return hit < len(usable) and usable[hit] in computing


def _propose(
    w: WorkerState, req: Request, spec: SpeculativeConfig, budget: int, theta: float, d: Decision
) -> int:
    """How many tokens are proposed after a decoding request's last one, with blocks for
    them, put in `d` (the tokens found by prompt lookup, or how many the worker drafts); 0
    when none would pay (see speculation.py) or there is no room (tokens, budget or blocks)."""
    out = len(req.output_token_ids)
    if out == 0:
        return 0
    room = min(
        spec.num_speculative_tokens,
        budget - 1,
        req.sampling.max_tokens - out - 1,
        w.max_len - req.num_tokens - 1,
    )
    if spec.method == "draft_model":  # the worker's draft: its acceptance there says most
        req.acceptance.start_from(w.draft_acceptance.p)
        room = req.acceptance.wanted(room, theta, w.draft_acceptance.may_probe(theta))
    else:
        room = req.acceptance.wanted(room, theta)
    if room <= 0:
        return 0
    drafts = req.acceptance.propose(req.all_token_ids, room, spec) if spec.method == "ngram" else None
    count = room if drafts is None else len(drafts)
    if count == 0:
        return 0
    bs = w.pool.block_size
    need = -(-(req.num_computed_tokens + 1 + count) // bs) - len(req.block_ids)
    # New blocks only while every running request could still take one: never a preemption.
    if need > 0 and (
        w.pool.num_free - need < len(w.running)
        or not transitions.grow(w, req, req.num_computed_tokens + 1 + count)
    ):
        return 0
    if drafts is None:
        d.draft_counts[req.request_id] = count
    else:
        d.drafts[req.request_id] = drafts
    return count


def _tokens_to_run(req: Request, budget: int, limits: Limits) -> int:
    remaining = req.num_tokens - req.num_computed_tokens
    return min(remaining, budget, limits.max_prefill_chunk) if remaining > 1 else 1


def _usable_hashes(req: Request, block_size: int) -> list[bytes]:
    """Its full blocks a prefix-cache hit may cover: never the one holding its last token."""
    return req.block_hashes_for(block_size)[: (req.num_tokens - 1) // block_size]
