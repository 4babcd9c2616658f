"""Which worker a waiting request goes to: the one holding most of its prefix in cache,
weighed against how busy each worker is. It only reads; the core places the request."""

from __future__ import annotations

from typing import Iterable, Optional

from services.scheduler.request import Request
from services.scheduler.worker_state import WorkerState


def choose_worker(req: Request, workers: Iterable[WorkerState], max_num_seqs: int) -> Optional[WorkerState]:
    """Score = share of the request's tokens already cached there − share of its sequence
    slots in use (both in [0, 1]). A full prefix hit beats an idle worker; among workers
    with no hit, the least loaded wins. Each worker's cache is matched with hashes for
    its own block size."""
    candidates = [w for w in workers if req.num_tokens < w.max_len]
    if not candidates:
        return None

    def score(w: WorkerState):
        bs = w.pool.block_size
        # A request computing its whole prompt (for prompt logprobs) gains nothing from a hit.
        hit_blocks = [] if req.needs_prompt_logprobs else w.pool.match_prefix(req.block_hashes_for(bs))
        hit_tokens = len(hit_blocks) * bs
        return (hit_tokens / req.num_tokens - w.load / max_num_seqs, -w.load, w.worker_id)

    return max(candidates, key=score)
