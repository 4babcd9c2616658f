"""A traced request's life (shared/tracing.py) in one process, with the SDK's in-memory
exporter: the gateway's Generation opens the request's span under the caller's trace and
hands its context on in SubmitRequest; the scheduler's spans (queue, each worker step) hang
under it; both mark the first token; every stage has a duration."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.gateway.generation import Generation
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import CompletionRequest
from services.gateway.validation import completion_plan
from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from services.scheduler.request_spans import RequestSpans
from shared.config import GatewaySettings, SchedulerSettings, parse_settings
from shared.figure_records import SystemStatus
from shared.tracing import context_from, tracer_for
from tests.scheduler.fake_worker import FakeWorker

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a client's own trace


class _Engine:
    """The EngineClient's part a Generation uses; keeps what it submits."""

    reply_to = "tcp://test"

    def register(self, ids, queue) -> None:
        self.queue = queue

    async def submit(self, requests) -> None:
        self.submitted = requests

    def unregister(self, ids) -> None:
        pass


async def _serve_through_the_scheduler(gen: Generation, engine: _Engine, spans: RequestSpans) -> int:
    """The Generation's request through a scheduler core and a fake worker, every span
    recorded; the number of steps that scheduled it."""
    core, worker = SchedulerCore(Limits(max_prefill_chunk=2)), FakeWorker("w1")
    core.add_worker(worker.register(), 0.0)
    await gen.start()
    (submitted,) = engine.submitted
    assert submitted.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-"), "the caller's trace"
    assert core.add_request(submitted)
    spans.started(submitted)
    steps = 0
    while (plan := core.next_plan("w1", 0.0, 0.0)) is not None:
        spans.step_sent("w1", plan)
        result = worker.execute(plan)
        spans.step_done(result)
        core.on_step_result(result)
        steps += submitted.request_id in plan.num_scheduled_tokens  # not a plan that only drops its row
        for _, out in core.outputs:
            spans.output(out)
            gen._queue.put_nowait(out)
        core.outputs.clear()
    async for _ in gen.deltas():
        pass
    gen.close()
    return steps


def _check_trace(by_name: dict[str, list], steps: int) -> None:
    """One trace under the caller's: gateway > scheduler > queue and steps, each with a
    duration, the first token marked on both sides, the usage on both."""
    (gateway,), (scheduler,), (queue,) = (
        by_name["gateway.request"],
        by_name["scheduler.request"],
        by_name["queue"],
    )
    assert len(by_name["step"]) == steps >= 5, "its prefill chunk(s), then a step per further token"
    trace_id = gateway.context.trace_id
    assert trace_id == 0x0AF7651916CD43DD8448EB211C80319C, "under the caller's trace"
    assert gateway.parent.span_id == 0xB7AD6B7169203331
    assert scheduler.parent.span_id == gateway.context.span_id
    assert queue.parent.span_id == scheduler.context.span_id
    assert all(s.parent.span_id == scheduler.context.span_id for s in by_name["step"])
    assert {s.context.trace_id for spans_ in by_name.values() for s in spans_} == {trace_id}
    for s in [gateway, scheduler, queue, *by_name["step"]]:
        assert s.end_time >= s.start_time, s.name
    assert queue.end_time <= by_name["step"][0].start_time <= scheduler.end_time
    assert [e.name for e in gateway.events] == ["first_token"] and [e.name for e in scheduler.events] == [
        "first_token"
    ]
    assert scheduler.attributes["gen_ai.usage.completion_tokens"] == 5
    assert gateway.attributes["gen_ai.usage.completion_tokens"] == 5
    assert by_name["step"][0].attributes["conveyor.worker"] == "w1"


def test_a_trace_shows_every_stage_of_a_request_with_durations(served_model):
    metrics = GatewayMetrics(
        "tiny", 2048, lambda: SystemStatus(scheduler=None, workers={}, errors=[], queue_length=0, pending=0)
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    plan = completion_plan(
        CompletionRequest.model_validate({"prompt": "hello there", "max_tokens": 5, "ignore_eos": True}),
        served_model,
    )
    span = tracer.start_span(
        "gateway.request", context=context_from({"traceparent": CALLER}), kind=SpanKind.SERVER
    )
    engine = _Engine()
    gen = Generation(plan, served_model, engine, metrics, span=span)
    steps = asyncio.run(asyncio.wait_for(_serve_through_the_scheduler(gen, engine, RequestSpans(tracer)), 10))
    by_name: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        by_name.setdefault(s.name, []).append(s)
    _check_trace(by_name, steps)


def test_tracing_is_off_without_an_endpoint_and_untraced_requests_make_no_spans():
    assert tracer_for("gateway", None) is None and tracer_for("gateway", "") is None
    spans = RequestSpans(None)
    from shared.messages import SamplingParams, SubmitRequest

    spans.started(SubmitRequest("r", [1, 2], SamplingParams(), "tcp://x", 0.0, traceparent=CALLER))
    assert spans.spans == {}


def test_the_protocol_is_a_setting_read_from_opentelemetrys_own_variable(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert (
        GatewaySettings().otlp_traces_protocol == SchedulerSettings().otlp_traces_protocol == "http/protobuf"
    )
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
    assert GatewaySettings().otlp_traces_protocol == "grpc"
    flag = parse_settings(SchedulerSettings, ["--otlp-traces-protocol", "http/protobuf"])
    assert flag.otlp_traces_protocol == "http/protobuf"
    with pytest.raises(ValueError, match="otlp_traces_protocol"):
        GatewaySettings(otlp_traces_protocol="http/json")
    with pytest.raises(ValueError, match="otlp_traces_protocol 'http/json'"):
        tracer_for("gateway", "http://127.0.0.1:9/v1/traces", "http/json")
