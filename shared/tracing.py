"""OpenTelemetry tracing of a request's life, as vLLM's `--otlp-traces-endpoint`: off unless
an endpoint is set, and then exported by OTLP (gRPC, or HTTP with the otlp_traces_protocol
setting, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf as vLLM reads it). Off costs nothing: no
SDK is imported and no span is made (the services hold None for their tracer).

The trace context crosses processes as a W3C `traceparent` string: from an HTTP request's
header (a caller's trace) or the gateway's span, in SubmitRequest.traceparent through Redis
to the scheduler, which records the queue wait and each worker step under it.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_for(service: str, endpoint: str | None, protocol: str = "grpc") -> trace.Tracer | None:
    """A tracer exporting to `endpoint` (None or "": tracing off, None returned) by OTLP over
    `protocol`, the service's otlp_traces_protocol setting."""
    if not endpoint:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=endpoint)
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(endpoint=endpoint)
    else:
        raise ValueError(f"otlp_traces_protocol {protocol!r}: grpc or http/protobuf")
    provider = TracerProvider(resource=Resource.create({"service.name": f"conveyor-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("conveyor")


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent of `span`, to carry to another process."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from `traceparent` (and `tracestate`) headers, or None."""
    wanted = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    return _PROPAGATOR.extract(wanted) if "traceparent" in wanted else None


def child_of(span: trace.Span) -> Context:
    return trace.set_span_in_context(span)
