"""What the core reports about a request, built from its state (core.py decides when): its
outputs to the gateway that sent it and the fields of its status in Redis, which the service
drains after each event, as it does the errors to record.
"""

from __future__ import annotations

from typing import TypedDict

import msgspec

from services.scheduler.request import Request
from shared.messages import (
    ErrorCode,
    FinishReason,
    RequestOutput,
    RequestStatus,
    SubmitRequest,
    TokenLogprobs,
    Usage,
)


class StatusFields(TypedDict, total=False):
    """The fields of a request's status hash in Redis that one event sets."""

    status: RequestStatus
    worker: str
    preempted: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str
    error_code: ErrorCode


class _ErrorPlace(TypedDict, total=False):
    worker: str
    step_id: int


class CoreError(_ErrorPlace):
    """An error for the service to record (shared.figure_records.ErrorRecord, once it adds the time):
    what went wrong and, for a failed step, where."""

    error: str


def refused_output(msg: SubmitRequest, why: str) -> RequestOutput:
    """The only output of a request the core would not queue."""
    return RequestOutput(
        msg.request_id, finish_reason=FinishReason.ERROR, error_code=ErrorCode.INVALID_REQUEST, error=why
    )


def tokens_output(req: Request, start: int, logprobs: list[TokenLogprobs]) -> RequestOutput:
    """Its tokens from `start` on, with their `logprobs` where it asked for them. Its first
    output (preempted before it or not) also says its queue time, arrival to first scheduled,
    and carries its prompt logprobs."""
    kept = req.output_token_ids[start:]
    queue_time_s = None
    if start == 0:
        assert req.first_scheduled_time is not None, f"{req.request_id}: tokens before it was scheduled"
        queue_time_s = req.first_scheduled_time - req.arrival_time
    with_prompt = start == 0 and req.sampling.prompt_logprobs is not None
    return RequestOutput(
        req.request_id,
        kept,
        logprobs[: len(kept)],
        index=start,
        queue_time_s=queue_time_s,
        prompt_logprobs=req.take_prompt_logprobs() if with_prompt else [],
    )


def final_output(req: Request, last: RequestOutput | None = None) -> RequestOutput:
    """A finished request's last output: `last` (the tokens of the step that ended it) or an
    empty one, with its finish reason, usage and error."""
    assert req.finish_reason is not None, f"{req.request_id} has not finished"
    out = last or RequestOutput(req.request_id, index=len(req.output_token_ids))
    return msgspec.structs.replace(
        out,
        finish_reason=req.finish_reason,
        stop_token_id=req.output_token_ids[-1] if req.finish_reason is FinishReason.STOP else None,
        usage=usage(req),
        error_code=req.error_code,
        error=req.error,
    )


def final_status(req: Request) -> StatusFields:
    """A finished request's status: how it ended, its usage, its error if any."""
    assert req.finish_reason is not None, f"{req.request_id} has not finished"
    u = usage(req)
    fields = StatusFields(
        status=req.status,
        finish_reason=req.finish_reason,
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_tokens=u.cached_tokens,
    )
    if req.error:
        fields["error"] = req.error
    if req.error_code:
        fields["error_code"] = req.error_code
    return fields


def usage(req: Request) -> Usage:
    return Usage(len(req.prompt_token_ids), len(req.output_token_ids), req.num_cached_tokens)
