"""Tracing through the real processes: a gateway and a scheduler started with
--otlp-traces-endpoint export a request's spans by OTLP/HTTP to a collector (a plain HTTP
server in the test), in one trace under the caller's traceparent."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conveyor.tiny_model import make_model
from tests.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=1, seed=9)


class _Collector(ThreadingHTTPServer):
    def __init__(self):
        self.spans: list[tuple[str, str, bytes]] = []  # (service, span name, trace id)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        export = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource in export.resource_spans:
                service = next(
                    a.value.string_value for a in resource.resource.attributes if a.key == "service.name"
                )
                for scope in resource.scope_spans:
                    self.server.spans += [(service, s.name, s.trace_id) for s in scope.spans]
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


def test_the_gateway_and_scheduler_export_one_trace_by_otlp(redis_server, model_dir, tmp_path, monkeypatch):
    collector = _Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export within 0.2 s, not 5
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler("--otlp-traces-endpoint", endpoint)
        stack.start_worker("w1")
        port = stack.start_gateway("gw", "--otlp-traces-endpoint", endpoint)
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            headers={"traceparent": CALLER},
            timeout=60,
            json={"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text

        def exported() -> bool:
            with collector.lock:
                return {"gateway.request", "scheduler.request", "queue"} <= {
                    name for _, name, _ in collector.spans
                }

        stack.wait_until(exported, "the spans at the collector", timeout_s=30.0)
        with collector.lock:
            spans = list(collector.spans)
        assert {trace for _, _, trace in spans} == {bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")}
        assert {(s, n) for s, n, _ in spans} >= {
            ("conveyor-gateway", "gateway.request"),
            ("conveyor-scheduler", "scheduler.request"),
            ("conveyor-scheduler", "queue"),
            ("conveyor-scheduler", "step"),
        }
    finally:
        stack.stop()
        collector.shutdown()
