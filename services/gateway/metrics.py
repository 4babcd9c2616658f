"""Prometheus metrics under vLLM's names, `conveyor:*` where vLLM's are `vllm:*`, with its
units, buckets and `model_name` label, so a dashboard made for vLLM reads them once the
prefix is changed (docs/http_api.md maps each series to vLLM's).

Two sources:
- this gateway's own view of each scheduler request (one per choice): the per-request
  histograms and `request_success_total{finished_reason}` with the reason the client saw
  (a stop string is "stop", a client that went away is "abort");
- the scheduler's figures in Redis, read at scrape time: gauges of the running system and
  its cumulative counters, system-wide or per worker (a `worker` label). Every gateway
  replica reports the same values for them, so aggregate them with max(), not sum().
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from shared.figure_records import ITERATION_TOKENS_BUCKETS, SchedulerFigures, SystemStatus
from shared.messages import FinishReason

log = logging.getLogger(__name__)

PREFIX = "conveyor:"
# vLLM's buckets (vllm/v1/metrics/loggers.py): the same quantiles come out of the same panels.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: vLLM's buckets of token counts (up to max_model_len)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


@dataclass
class RequestTimes:
    """One scheduler request's times as this gateway saw them (time.monotonic()). vLLM's
    engine stamps when a request is scheduled and when its tokens come; here the scheduler
    sends its queue time with the first output and the gateway stamps the tokens, so
    prefill = time to first token - queue time, and decode = first token to last."""

    arrival: float
    queue_s: float | None = None  # arrival in the scheduler's queue -> first scheduled
    first_token: float | None = None
    last_token: float | None = None


class GatewayMetrics:
    def __init__(self, model_name: str, max_model_len: int, read_status: Callable[[], SystemStatus]):
        disable_created_metrics()  # no `*_created` series beside every counter and histogram
        self.registry = CollectorRegistry(auto_describe=False)
        self._model_name = model_name
        self._add_latency_histograms()
        self._add_size_histograms(buckets_1_2_5(max_model_len))
        success = Counter(
            PREFIX + "request_success",
            "Finished requests by the finish reason the client saw (abort: the client went away).",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._success = {reason: success.labels(model_name, reason.value) for reason in FinishReason}
        self._rejected = Counter(
            PREFIX + "requests_rejected",
            "Requests refused before enqueueing, by HTTP status.",
            ["model_name", "status"],
            registry=self.registry,
        )
        self.registry.register(SchedulerCollector(model_name, read_status))

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        # One child per series, made now: each series is served (at 0) before any request.
        return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(
            self._model_name
        )

    def _add_latency_histograms(self) -> None:
        """Each request's times: to its first token, between its outputs, and its phases."""
        hist = self._histogram
        self.time_to_first_token = hist(
            "time_to_first_token_seconds",
            "Arrival at the gateway to the first generated token.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = hist(
            "inter_token_latency_seconds",
            "Time between successive outputs of a request (one step's tokens).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.time_per_output_token = hist(
            "time_per_output_token_seconds",
            "The same as inter_token_latency_seconds (vLLM's name for it before 0.11).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.request_time_per_output_token = hist(
            "request_time_per_output_token_seconds",
            "A request's decode time over its generated tokens after the first.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency = hist(
            "e2e_request_latency_seconds",
            "Arrival at the gateway to the request's finish.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = hist(
            "request_queue_time_seconds",
            "Time a request waited in the scheduler's queue before it was first scheduled.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_inference_time = hist(
            "request_inference_time_seconds",
            "First scheduled to last token (prefill + decode).",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = hist(
            "request_prefill_time_seconds", "First scheduled to first token.", REQUEST_LATENCY_BUCKETS
        )
        self.request_decode_time = hist(
            "request_decode_time_seconds", "First token to last token.", REQUEST_LATENCY_BUCKETS
        )

    def _add_size_histograms(self, tokens: tuple[int, ...]) -> None:
        """Each finished request's tokens and parameters (`tokens`: buckets up to max_model_len)."""
        hist = self._histogram
        self.request_prompt_tokens = hist(
            "request_prompt_tokens", "Prompt tokens of each finished request.", tokens
        )
        self.request_generation_tokens = hist(
            "request_generation_tokens", "Tokens generated by each finished request.", tokens
        )
        self.request_params_max_tokens = hist(
            "request_params_max_tokens", "The max_tokens of each finished request.", tokens
        )
        self.request_params_n = hist(
            "request_params_n", "The n of each finished prompt (its choices).", N_BUCKETS
        )
        self.request_max_num_generation_tokens = hist(
            "request_max_num_generation_tokens",
            "The most tokens any choice of a finished prompt generated.",
            tokens,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def rejected(self, status: int) -> None:
        self._rejected.labels(self._model_name, str(status)).inc()

    def abandoned(self) -> None:
        """A request whose client went away: counted, not timed."""
        self._success[FinishReason.ABORT].inc()

    def on_output(self, times: RequestTimes, num_tokens: int, queue_time_s: float | None, now: float) -> None:
        """An output with `num_tokens` new tokens came for the request."""
        if num_tokens == 0:
            return
        if times.first_token is None:
            times.first_token = now
            self.time_to_first_token.observe(now - times.arrival)
        elif times.last_token is not None:  # always: set with first_token
            # As vLLM: one interval per output, however many tokens it carries (speculation).
            self.inter_token_latency.observe(now - times.last_token)
            self.time_per_output_token.observe(now - times.last_token)
        if queue_time_s is not None and times.queue_s is None:
            times.queue_s = max(queue_time_s, 0.0)
        times.last_token = now

    def on_finished(
        self,
        times: RequestTimes,
        reason: FinishReason,
        now: float,
        *,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        max_tokens: int,
    ) -> None:
        """The request finished (as the client saw it): its histograms, as vLLM observes a
        finished request's. Without a token there is no prefill or decode to time."""
        self._success[reason].inc()
        self.e2e_request_latency.observe(now - times.arrival)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        self.request_params_max_tokens.observe(max_tokens)
        if times.first_token is None or times.last_token is None:
            return
        decode = times.last_token - times.first_token
        self.request_decode_time.observe(decode)
        if num_generation_tokens > 1:
            self.request_time_per_output_token.observe(decode / (num_generation_tokens - 1))
        if times.queue_s is not None:
            prefill = max(times.first_token - times.arrival - times.queue_s, 0.0)
            self.request_queue_time.observe(times.queue_s)
            self.request_prefill_time.observe(prefill)
            self.request_inference_time.observe(prefill + decode)

    def on_prompt_finished(self, n: int, max_generation_tokens: int) -> None:
        """Every choice of one prompt finished (vLLM's parent request with its n children)."""
        self.request_params_n.observe(n)
        self.request_max_num_generation_tokens.observe(max_generation_tokens)


class SchedulerCollector:
    """A custom collector: the scheduler's figures, read from Redis on every scrape."""

    def __init__(self, model_name: str, read_status: Callable[[], SystemStatus]):
        self.model_name = model_name
        self.read_status = read_status

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; keeps Redis out of start-up

    def collect(self) -> Iterable[Metric]:
        try:
            status = self.read_status()
        except (redis.RedisError, ValueError) as e:  # unreachable, or a record that does not decode
            log.warning("metrics: scheduler figures left out: %s", e)
            return
        s, model = status.scheduler or SchedulerFigures(updated_at=0.0), [self.model_name]
        yield self._gauge("num_requests_running", "Requests running on the workers.", s.running)
        yield self._gauge(
            "num_requests_waiting", "Requests waiting to be scheduled (one queue for all workers).", s.waiting
        )
        yield self._gauge("num_workers", "Workers registered with the scheduler.", len(status.workers))
        yield self._counter(
            "prompt_tokens", "Prompt tokens of the requests the scheduler accepted.", s.prompt_tokens
        )
        yield self._counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._counter("num_preemptions", "Requests preempted when KV blocks ran out.", s.preemptions)
        yield self._counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries
        )
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits)
        # vLLM's spec-decode counters (mean accepted length = 1 + accepted / drafts).
        yield self._counter(
            "spec_decode_num_drafts", "Decodes checked with speculative proposals.", s.spec_drafts
        )
        yield self._counter(
            "spec_decode_num_draft_tokens", "Speculative tokens proposed.", s.spec_draft_tokens
        )
        yield self._counter(
            "spec_decode_num_accepted_tokens", "Speculative tokens accepted.", s.spec_accepted_tokens
        )
        finished = CounterMetricFamily(
            PREFIX + "scheduler_request_finished",
            "Requests the scheduler finished, by its finish reason "
            "(a stop string matched at a gateway shows as abort).",
            labels=["model_name", "finished_reason"],
        )
        for reason, n in s.finished.items():
            finished.add_metric([*model, reason], n)
        yield finished
        yield from self._per_worker(status)

    def _per_worker(self, status: SystemStatus) -> Iterable[Metric]:
        """What each worker holds: its KV pool (one per worker, as one per vLLM engine) and running
        requests (none waits for one worker: they wait for all, num_requests_waiting)."""
        labels = ["model_name", "worker"]
        kv = GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc", "KV cache blocks in use (1 = 100%).", labels=labels
        )
        old_kv = GaugeMetricFamily(
            PREFIX + "gpu_cache_usage_perc",
            "The same as kv_cache_usage_perc (vLLM's name for it before 0.9).",
            labels=labels,
        )
        running = GaugeMetricFamily(
            PREFIX + "worker_num_requests_running", "Requests running on the worker.", labels=labels
        )
        generated = CounterMetricFamily(
            PREFIX + "worker_generation_tokens",
            "Tokens the worker generated (since it registered).",
            labels=labels,
        )
        steps = HistogramMetricFamily(
            PREFIX + "iteration_tokens_total",
            "Tokens computed in each step of the "
            "worker (prefill chunks, decodes and the drafts they verify).",
            labels=labels,
        )
        config = GaugeMetricFamily(
            PREFIX + "cache_config_info",
            "The worker's KV cache (always 1).",
            labels=[*labels, "block_size", "num_gpu_blocks"],
        )
        for wid, w in sorted(status.workers.items()):
            ids = [self.model_name, wid]
            kv.add_metric(ids, w.kv_usage)
            old_kv.add_metric(ids, w.kv_usage)
            running.add_metric(ids, w.running)
            generated.add_metric(ids, w.tokens_generated)
            steps.add_metric(ids, _buckets(w.iteration_tokens), w.iteration_tokens_sum)
            config.add_metric([*ids, str(w.registered.block_size), str(w.registered.num_blocks)], 1)
        yield from (kv, old_kv, running, generated, steps, config)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """A worker's step counts per ITERATION_TOKENS_BUCKETS bucket as Prometheus' cumulative
    buckets, +Inf last (all zero before its first step)."""
    counts = (
        counts
        if len(counts) == len(ITERATION_TOKENS_BUCKETS) + 1
        else [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    )
    out: list[tuple[str, float]] = []
    total = 0
    for le, n in zip([*map(float, ITERATION_TOKENS_BUCKETS), float("inf")], counts):
        total += n
        out.append((floatToGoString(le), total))
    return out
