"""Prometheus metrics, named `conveyor:*` as vLLM names its own `vllm:*`.

Two sources:
- this gateway's own view, per scheduler request (one per choice): latency histograms and
  `request_success_total{finished_reason}` with the reason the client saw (a stop string
  is "stop", a client that went away is "abort");
- the scheduler's figures in Redis, read at scrape time: gauges of the running system and
  its cumulative counters. Those are system-wide: every gateway replica reports the same
  values, so aggregate them with max(), not sum().
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.figures import SchedulerFigures, SystemStatus

log = logging.getLogger(__name__)

PREFIX = "conveyor:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                         0.75, 1.0, 2.5, 5.0)


class GatewayMetrics:
    def __init__(self, read_status: Callable[[], SystemStatus]):
        disable_created_metrics()  # no `*_created` series beside every counter and histogram
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry

        def seconds(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name + "_seconds", doc, buckets=buckets, registry=r)

        self.time_to_first_token = seconds("time_to_first_token", "Arrival at the gateway to the first generated token.")
        self.inter_token_latency = seconds("inter_token_latency", "Time between successive generated tokens.",
                                           TOKEN_LATENCY_BUCKETS)
        self.e2e_request_latency = seconds("e2e_request_latency", "Arrival at the gateway to the request's finish.")
        self.request_queue_time = seconds("request_queue_time", "Time a request waited in the scheduler's queue.")
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by the finish reason the client saw "
            "(abort: the client went away).", ["finished_reason"], registry=r)
        self.requests_rejected = Counter(
            PREFIX + "requests_rejected", "Requests refused before enqueueing, by HTTP status.",
            ["status"], registry=r)
        r.register(SchedulerCollector(read_status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SchedulerCollector:
    """A custom collector: the scheduler's figures, read from Redis on every scrape."""

    def __init__(self, read_status: Callable[[], SystemStatus]):
        self.read_status = read_status

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; keeps Redis out of start-up

    def collect(self) -> Iterable[Metric]:
        try:
            status = self.read_status()
        except (redis.RedisError, ValueError) as e:  # unreachable, or a record that does not decode
            log.warning("metrics: scheduler figures left out: %s", e)
            return
        s, workers = status.scheduler or SchedulerFigures(updated_at=0.0), status.workers
        usage = [w.kv_usage for w in workers.values()]
        yield _gauge("num_requests_running", "Requests running on the workers.", s.running)
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield _gauge("num_workers", "Workers registered with the scheduler.", len(workers))
        yield _gauge("kv_cache_usage_perc", "KV cache blocks in use, mean over workers (1 = 100%).",
                     sum(usage) / len(usage) if usage else 0.0)
        yield _counter("prompt_tokens", "Prompt tokens of the requests the scheduler accepted.", s.prompt_tokens)
        yield _counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield _counter("num_preemptions", "Requests preempted when KV blocks ran out.", s.preemptions)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits)
        # vLLM's spec-decode counters (mean accepted length = 1 + accepted / drafts).
        yield _counter("spec_decode_num_drafts", "Decodes checked with speculative proposals.", s.spec_drafts)
        yield _counter("spec_decode_num_draft_tokens", "Speculative tokens proposed.", s.spec_draft_tokens)
        yield _counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted.", s.spec_accepted_tokens)
        finished = CounterMetricFamily(PREFIX + "scheduler_request_finished",
                                       "Requests the scheduler finished, by its finish reason "
                                       "(a stop string matched at a gateway shows as abort).",
                                       labels=["finished_reason"])
        for reason, n in s.finished.items():
            finished.add_metric([reason], n)
        yield finished


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)
