"""A worker's next step as it is sent (StepPlan): the policy's decision (policy.py) as deltas
against the rows the worker keeps. A request new to the worker comes whole; one it holds
comes with the blocks added since its last step.
"""

from __future__ import annotations

import msgspec

from services.scheduler.policy import Decision
from services.scheduler.request import Request
from services.scheduler.worker_state import WorkerState
from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan


def build_plan(step_id: int, w: WorkerState, d: Decision) -> StepPlan:
    """The plan of `d` for `w`; from here on `w` holds a row for each request in it."""
    new: list[NewRequest] = []
    cached: list[CachedRequest] = []
    by_id = {r.request_id: r for r in w.running}
    for rid in d.scheduled:
        req = by_id[rid]
        if not req.on_worker:
            new.append(
                NewRequest(
                    rid,
                    req.all_token_ids,
                    len(req.prompt_token_ids),
                    worker_sampling(req),
                    list(req.block_ids),
                    req.num_computed_tokens,
                )
            )
            req.on_worker = True
        else:
            cached.append(CachedRequest(rid, req.new_block_ids, req.num_computed_tokens))
        req.new_block_ids = []
    plan = StepPlan(
        step_id,
        new,
        cached,
        dict(d.scheduled),
        w.to_drop,
        draft_token_ids=dict(d.drafts),
        num_draft_tokens=dict(d.draft_counts),
    )
    w.to_drop = []
    return plan


def worker_sampling(req: Request) -> SamplingParams:
    """The sampling a worker gets: without prompt_logprobs once they were delivered, so a
    request resumed after its first token (preempted, migrated) does not compute them again."""
    if req.sampling.prompt_logprobs is not None and not req.needs_prompt_logprobs:
        return msgspec.structs.replace(req.sampling, prompt_logprobs=None)
    return req.sampling
