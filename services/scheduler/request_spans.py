"""The scheduler's part of a traced request (shared/tracing.py): a span from its arrival to
its finish, under the gateway's, holding a `queue` span (arrival to its first step) and a
`step` span for each worker step it took part in (plan sent to result back, with the
worker's own timings), and an event at its first token. Only requests that came with a
traceparent are traced, and only when the scheduler exports traces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import messages as m
from shared.tracing import child_of


@dataclass
class _Step:
    step_id: int
    sent_ns: int
    tokens: dict[str, int]  # traced request -> tokens scheduled


class RequestSpans:
    def __init__(self, tracer: trace.Tracer | None):
        self.tracer = tracer
        self.spans: dict[str, trace.Span] = {}  # request_id -> its span
        self._queued: dict[str, trace.Span] = {}
        self._first: set[str] = set()  # those whose first token was seen
        self._steps: dict[str, _Step] = {}  # worker_id -> its step in flight, when it holds traced requests

    def started(self, msg: m.SubmitRequest) -> None:
        if self.tracer is None or not msg.traceparent:
            return
        parent = TraceContextTextMapPropagator().extract({"traceparent": msg.traceparent})
        start = int(msg.arrival_time * 1e9)
        span = self.tracer.start_span(
            "scheduler.request",
            context=parent,
            start_time=start,
            attributes={
                "gen_ai.request.id": msg.request_id,
                "gen_ai.usage.prompt_tokens": len(msg.prompt_token_ids),
                "gen_ai.request.max_tokens": msg.sampling.max_tokens,
                "conveyor.priority": msg.priority,
            },
        )
        self.spans[msg.request_id] = span
        self._queued[msg.request_id] = self.tracer.start_span(
            "queue", context=child_of(span), start_time=start
        )

    def step_sent(self, worker_id: str, plan: m.StepPlan) -> None:
        if not self.spans:
            return
        tokens = {rid: n for rid, n in plan.num_scheduled_tokens.items() if rid in self.spans}
        if not tokens:
            return
        now = time.time_ns()
        for rid in tokens:
            queued = self._queued.pop(rid, None)
            if queued is not None:
                queued.set_attribute("conveyor.worker", worker_id)
                queued.end(end_time=now)
        self._steps[worker_id] = _Step(plan.step_id, now, tokens)

    def step_done(self, result: m.StepResult) -> None:
        step = self._steps.get(result.worker_id)
        if step is None or step.step_id != result.step_id or self.tracer is None:
            return
        del self._steps[result.worker_id]
        end, t = time.time_ns(), result.timings
        for rid, n in step.tokens.items():
            parent = self.spans.get(rid)
            if parent is None:
                continue
            span = self.tracer.start_span(
                "step",
                context=child_of(parent),
                start_time=step.sent_ns,
                attributes={
                    "conveyor.worker": result.worker_id,
                    "conveyor.step_id": result.step_id,
                    "conveyor.scheduled_tokens": n,
                    "conveyor.worker_forward_ms": t.forward_ms,
                    "conveyor.worker_total_ms": t.total_ms,
                    "conveyor.accepted_tokens": len(result.accepted_token_ids.get(rid, ())),
                    "conveyor.error": result.error or "",
                },
            )
            span.end(end_time=end)

    def output(self, out: m.RequestOutput) -> None:
        span = self.spans.get(out.request_id)
        if span is None:
            return
        if out.token_ids and out.request_id not in self._first:
            self._first.add(out.request_id)
            span.add_event("first_token")
        if out.finish_reason is None:
            return
        queued = self._queued.pop(out.request_id, None)
        if queued is not None:  # it ended before its first step (aborted, timed out)
            queued.end()
        span.set_attributes(
            {
                "gen_ai.response.finish_reasons": [out.finish_reason.value],
                "gen_ai.usage.completion_tokens": out.usage.completion_tokens if out.usage else 0,
                **({"conveyor.error": out.error} if out.error else {}),
            }
        )
        span.end()
        del self.spans[out.request_id]
        self._first.discard(out.request_id)
