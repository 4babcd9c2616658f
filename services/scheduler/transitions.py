"""Every move of a request after its arrival, in one place (policy and core call these).
Until it finishes a request is either in the one waiting list every worker admits from
(core.waiting, where core.add_request puts it) or in one worker's running list:

    QUEUED (waiting) ──admit on w──▶ RUNNING on w ──finish──▶ FINISHED / ERROR
       │  ▲                              │
       │  └── requeue (preempted, its step failed) or migrate (w is gone)
       └──finish (aborted, timed out, too long for every worker)──▶ FINISHED / ERROR

A request is bound to a worker only while it runs there. Leaving a worker frees its blocks
and drops its row there; its tokens, generated ones included, are kept: it is recomputed
and continues, on whichever worker admits it next.
"""

from __future__ import annotations

from services.scheduler.block_pool import NoFreeBlocks
from services.scheduler.request import Request
from services.scheduler.worker_state import WorkerState
from shared.messages import ErrorCode, FinishReason, RequestStatus


def admit(
    w: WorkerState, waiting: list[Request], req: Request, hit: list[int], num_tokens: int, now: float
) -> bool:
    """Queued in `waiting` → running on `w`, reusing the cached blocks `hit` and given blocks
    up to `num_tokens`. Returns False, changing nothing, if those blocks are not free."""
    w.pool.touch(hit)  # before allocating, so eviction cannot take the blocks we reuse
    req.block_ids = list(hit)
    if not grow(w, req, num_tokens):
        w.pool.free(hit)
        req.block_ids = []
        return False
    hit_tokens = len(hit) * w.pool.block_size
    if not req.needs_prompt_logprobs:  # it never looked the cache up (as vLLM counts it)
        w.pool.record_prefix_query(req.num_tokens, hit_tokens)
    if req.num_preemptions == 0 and not req.output_token_ids:
        req.num_cached_tokens = hit_tokens
    req.num_cached_blocks, req.num_computed_tokens = len(hit), hit_tokens
    waiting.remove(req)
    w.running.append(req)
    req.worker_id = w.worker_id
    req.status = RequestStatus.RUNNING
    if req.first_scheduled_time is None:
        req.first_scheduled_time = now
    return True


def grow(w: WorkerState, req: Request, num_tokens: int) -> bool:
    """Blocks for `num_tokens` of `req`; False (nothing allocated) if they are not free."""
    need = -(-num_tokens // w.pool.block_size) - len(req.block_ids)
    if need <= 0:  # the common case, a decode inside its last block
        return True
    try:
        new = w.pool.allocate(need)
    except NoFreeBlocks:
        return False
    req.block_ids.extend(new)
    req.new_block_ids.extend(new)
    return True


def computed(w: WorkerState, req: Request, num_tokens: int) -> None:
    """A step computed `num_tokens` more of `req`: its blocks now full join the prefix cache."""
    req.num_computed_tokens += num_tokens
    full = req.num_computed_tokens // w.pool.block_size
    if full <= req.num_cached_blocks:
        return
    hashes = req.block_hashes_for(w.pool.block_size)
    for i in range(req.num_cached_blocks, full):
        w.pool.cache_block(req.block_ids[i], hashes[i])
    req.num_cached_blocks = full


def requeue(w: WorkerState, waiting: list[Request], req: Request, *, preempted: bool) -> None:
    """Running on `w` → queued in `waiting`, to be recomputed from its tokens."""
    _leave(w, req)
    req.num_preemptions += preempted
    waiting.append(req)


def migrate(waiting: list[Request], req: Request) -> None:
    """Its worker is gone, with its blocks and row: only its tokens remain; queued again."""
    _forget_placement(req)
    waiting.append(req)


def finish(
    w: WorkerState | None,
    waiting: list[Request],
    req: Request,
    reason: FinishReason,
    error_code: ErrorCode | None = None,
    error: str | None = None,
) -> None:
    """Final, exactly once: off its worker `w`, blocks freed, or (w None: it runs on none)
    out of `waiting` if it is there."""
    assert not req.status.is_final, f"{req.request_id} finished twice"
    assert (reason is FinishReason.ERROR) == (error_code is not None) or reason is FinishReason.ABORT, reason
    if w is not None:
        _leave(w, req)
    elif req in waiting:
        waiting.remove(req)
    _forget_placement(req)
    req.status = RequestStatus.ERROR if reason is FinishReason.ERROR else RequestStatus.FINISHED
    req.finish_reason, req.error_code, req.error = reason, error_code, error


def _leave(w: WorkerState, req: Request) -> None:
    if req in w.running:
        w.running.remove(req)
        w.pool.free(req.block_ids)
    if req.on_worker:
        w.to_drop.append(req.request_id)
    _forget_placement(req)


def _forget_placement(req: Request) -> None:
    req.block_ids, req.new_block_ids = [], []
    req.num_cached_blocks = req.num_computed_tokens = 0
    req.on_worker = False
    req.worker_id = None
    req.status = RequestStatus.QUEUED
