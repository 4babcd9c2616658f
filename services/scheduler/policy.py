"""The scheduling policy: which requests run in a worker's next step, and how many tokens
each. Pure functions over a WorkerState; no sockets, no Redis, no clock of their own.

One step = one token budget (max_num_batched_tokens) and at most max_num_seqs requests:

  1. Running requests first, most important first: a decode takes 1 token, an unfinished
     prefill takes its next chunk (at most max_prefill_chunk). When blocks run out, the
     least important running request is preempted (blocks freed, recomputed later with
     the tokens it generated) — never an error.
  2. Then waiting requests, in priority order with aging, while budget, sequence slots
     and blocks last. A new request reuses the longest chain of cached prefix blocks; one
     whose next prefix block another request is computing right now waits for it (a
     step or two) rather than computing the same blocks again.

Priority: lower `priority` first, then earlier arrival. Aging lowers a waiting request's
effective priority by one level every `aging_seconds`, so nobody waits forever behind a
flood of more important work. Because a running request is decoded every step and only
the least important one is preempted, a long generation is not starved by short ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.block_pool import NoFreeBlocks, hash_blocks
from services.scheduler.request import Request, Status
from services.scheduler.worker_state import WorkerState


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512  # caps one request's share, so a long prompt never takes a whole step
    aging_seconds: float = 10.0


@dataclass
class Decision:
    scheduled: dict[str, int] = field(default_factory=dict)  # request_id -> tokens, in batch order
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.scheduled.values())


def running_key(req: Request):
    return (req.priority, req.arrival_time)


def waiting_key(now: float, aging_seconds: float):
    def key(req: Request):
        waited = max(0.0, now - req.arrival_time)
        return (req.priority - int(waited // aging_seconds), req.arrival_time)

    return key


def schedule(w: WorkerState, limits: Limits, now: float) -> Decision:
    d = Decision()
    budget = limits.max_num_batched_tokens
    w.running.sort(key=running_key)

    i = 0
    while i < len(w.running) and budget > 0:
        req = w.running[i]
        n = _tokens_to_run(req, budget, limits)
        while not _grow_blocks(w, req, req.num_computed_tokens + n):
            victim = w.running[-1]  # least important; never one already scheduled (index < i)
            preempt(w, victim)
            d.preempted.append(victim)
            if victim is req:
                break
        if req.status is not Status.RUNNING:
            break  # it preempted itself: everything after it is gone too
        d.scheduled[req.request_id] = n
        budget -= n
        i += 1

    # A step that had to preempt admits nobody: the freed blocks go to running requests.
    if d.preempted or w.leaving:
        return d
    w.waiting.sort(key=waiting_key(now, limits.aging_seconds))
    caching = w.pool.enable_prefix_caching
    computing = _prefix_blocks_being_computed(w) if caching else set()
    i = 0
    while i < len(w.waiting) and budget > 0 and len(w.running) < limits.max_num_seqs:
        req = w.waiting[i]
        if caching and computing and _waits_for_prefix(w, req, computing):
            i += 1  # its prefix is being computed right now: it will hit the cache in a step or two
            continue
        n = _admit(w, req, budget, limits)
        if n == 0:
            break  # the most important waiting request does not fit: don't let others pass it
        w.waiting.pop(i)
        if caching:
            computing.update(req.block_hashes[req.num_cached_blocks:])
        w.running.append(req)
        req.status = Status.RUNNING
        req.worker_id = w.worker_id
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        d.admitted.append(req)
        d.scheduled[req.request_id] = n
        budget -= n
    return d


def _prefix_blocks_being_computed(w: WorkerState) -> set[bytes]:
    """Hashes of full prompt blocks that running requests are still prefilling."""
    pending: set[bytes] = set()
    for r in w.running:
        if r.num_computed_tokens < len(r.prompt_token_ids):
            pending.update(r.block_hashes[r.num_computed_tokens // w.pool.block_size:])
    return pending


def _waits_for_prefix(w: WorkerState, req: Request, computing: set[bytes]) -> bool:
    """True if the first block `req` would have to compute is one another request is
    computing now: admitting it this step would compute the same prefix twice."""
    bs = w.pool.block_size
    req.block_hashes = hash_blocks(req.all_token_ids, bs, req.cache_salt, prior=req.block_hashes)
    usable = req.block_hashes[: (req.num_tokens - 1) // bs]
    hit = len(w.pool.match_prefix(usable))
    return hit < len(usable) and usable[hit] in computing


def preempt(w: WorkerState, req: Request) -> None:
    """Recompute-style preemption: free the blocks, keep the tokens, queue again."""
    w.pool.free(req.block_ids)
    if req.on_worker:
        w.to_drop.append(req.request_id)
    w.running.remove(req)
    req.reset_placement()
    req.num_preemptions += 1
    w.waiting.append(req)


def _tokens_to_run(req: Request, budget: int, limits: Limits) -> int:
    remaining = req.num_tokens - req.num_computed_tokens
    return min(remaining, budget, limits.max_prefill_chunk) if remaining > 1 else 1


def _grow_blocks(w: WorkerState, req: Request, num_tokens: int) -> bool:
    need = -(-num_tokens // w.pool.block_size) - len(req.block_ids)
    if need <= 0:
        return True
    try:
        new = w.pool.allocate(need)
    except NoFreeBlocks:
        return False
    req.block_ids.extend(new)
    req.new_block_ids.extend(new)
    return True


def _admit(w: WorkerState, req: Request, budget: int, limits: Limits) -> int:
    """Place `req` on the worker: prefix-cache hit, then blocks for its first chunk.
    Returns the tokens scheduled, or 0 (changing nothing) if its blocks do not fit."""
    bs = w.pool.block_size
    tokens = req.all_token_ids
    req.block_hashes = hash_blocks(tokens, bs, req.cache_salt, prior=req.block_hashes)
    # At least the last token is always computed: its logits are what we sample from.
    hit = w.pool.match_prefix(req.block_hashes[: (len(tokens) - 1) // bs])
    hit_tokens = len(hit) * bs
    n = min(len(tokens) - hit_tokens, budget, limits.max_prefill_chunk)
    need = -(-(hit_tokens + n) // bs) - len(hit)
    w.pool.touch(hit)  # before allocating, so eviction cannot take the blocks we reuse
    try:
        new = w.pool.allocate(need)
    except NoFreeBlocks:
        w.pool.free(hit)
        return 0
    w.pool.record_prefix_query(len(tokens), hit_tokens)
    if req.num_preemptions == 0 and not req.output_token_ids:
        req.num_cached_tokens = hit_tokens
    req.block_ids = hit + new
    req.new_block_ids = list(new)
    req.num_cached_blocks = len(hit)
    req.num_computed_tokens = hit_tokens
    return n


def cache_computed_blocks(w: WorkerState, req: Request) -> None:
    """Register the request's blocks that are now full and computed in the prefix cache."""
    bs = w.pool.block_size
    full = req.num_computed_tokens // bs
    if full <= req.num_cached_blocks:
        return
    req.block_hashes = hash_blocks(req.all_token_ids, bs, req.cache_salt, prior=req.block_hashes)
    for i in range(req.num_cached_blocks, full):
        w.pool.cache_block(req.block_ids[i], req.block_hashes[i])
    req.num_cached_blocks = full
