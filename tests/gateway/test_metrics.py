"""/metrics as a vLLM dashboard reads it: vLLM's series (prefixed `conveyor:`) with a
`model_name` label on every one and a `worker` label on each worker's, vLLM's buckets, and
per-request histograms observed as vLLM's frontend observes them. No Redis: the scheduler's
figures are hand-made."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.generation import Generation
from services.gateway.metrics import GatewayMetrics, RequestTimes
from services.gateway.protocol import CompletionRequest
from services.gateway.validation import completion_plan
from shared.figure_records import SchedulerFigures, SystemStatus
from shared.messages import FinishReason, RequestOutput, Usage
from tests.gateway.conftest import metric_value
from tests.shared.helpers import worker_figures

TOKEN_COUNTS = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
]  # vLLM's 1-2-5 buckets up to max_model_len 2048
PER_TOKEN = [
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
]
PER_REQUEST = [
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
]
VLLM_BUCKETS = {  # as vllm/v1/metrics/loggers.py defines them
    "time_to_first_token_seconds": [
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
    ],
    "inter_token_latency_seconds": PER_TOKEN,
    "time_per_output_token_seconds": PER_TOKEN,
    "request_time_per_output_token_seconds": PER_TOKEN,
    "e2e_request_latency_seconds": PER_REQUEST,
    "request_queue_time_seconds": PER_REQUEST,
    "request_inference_time_seconds": PER_REQUEST,
    "request_prefill_time_seconds": PER_REQUEST,
    "request_decode_time_seconds": PER_REQUEST,
    "request_prompt_tokens": TOKEN_COUNTS,
    "request_generation_tokens": TOKEN_COUNTS,
    "request_params_max_tokens": TOKEN_COUNTS,
    "request_max_num_generation_tokens": TOKEN_COUNTS,
    "request_params_n": [1, 2, 5, 10, 20],
    "iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
}
PER_WORKER = [
    "kv_cache_usage_perc",
    "gpu_cache_usage_perc",
    "worker_num_requests_running",
    "worker_generation_tokens",
    "iteration_tokens_total",
    "cache_config_info",
]


def _status() -> SystemStatus:
    # w1 stepped 3 times: 1, 5 and 40 tokens (buckets le=1, le=8, le=64).
    steps = [1, 1, 0, 0, 1, *[0] * 9]
    workers = {
        "w1": worker_figures(
            "w1", kv_usage=0.5, running=2, tokens_generated=9, iteration_tokens=steps, iteration_tokens_sum=46
        ),
        "w2": worker_figures("w2", kv_usage=0.25),
    }
    scheduler = SchedulerFigures(
        updated_at=1000.0,
        running=2,
        waiting=3,
        prompt_tokens=40,
        generation_tokens=9,
        preemptions=1,
        prefix_queries=40,
        prefix_hits=16,
        spec_drafts=4,
        spec_draft_tokens=12,
        spec_accepted_tokens=6,
        finished={"stop": 5},
    )
    return SystemStatus(scheduler=scheduler, workers=workers, errors=[], queue_length=0, pending=0)


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics("tiny", 2048, _status)


def _families(metrics: GatewayMetrics) -> dict:
    text = metrics.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("conveyor:")}


def test_every_series_names_the_model_and_each_workers_names_the_worker(metrics):
    families = _families(metrics)
    for family in families.values():
        for sample in family.samples:
            assert sample.labels.get("model_name") == "tiny", sample
    for name in PER_WORKER:
        workers = {s.labels["worker"] for s in families[f"conveyor:{name}"].samples}
        assert workers == {"w1", "w2"}, name
    text = metrics.render().decode()
    assert metric_value(text, "conveyor:kv_cache_usage_perc", 'worker="w1"') == 0.5
    assert metric_value(text, "conveyor:kv_cache_usage_perc", 'worker="w2"') == 0.25
    assert metric_value(text, "conveyor:gpu_cache_usage_perc", 'worker="w2"') == 0.25, "vLLM's old name too"
    assert metric_value(text, "conveyor:num_requests_waiting") == 3, (
        "the scheduler's, with what no worker holds yet"
    )
    assert metric_value(text, "conveyor:cache_config_info", 'block_size="16",num_gpu_blocks="64"') == 2
    for name, value in [
        ("prompt_tokens_total", 40),
        ("generation_tokens_total", 9),
        ("num_preemptions_total", 1),
        ("prefix_cache_queries_total", 40),
        ("prefix_cache_hits_total", 16),
        ("spec_decode_num_drafts_total", 4),
        ("spec_decode_num_accepted_tokens_total", 6),
    ]:
        assert metric_value(text, f"conveyor:{name}", 'model_name="tiny"') == value, name
    for reason in FinishReason:  # every reason served from the start, as vLLM's
        assert f'conveyor:request_success_total{{finished_reason="{reason}",model_name="tiny"}} 0.0' in text


def test_histograms_have_vllms_buckets(metrics):
    families = _families(metrics)
    for name, buckets in VLLM_BUCKETS.items():
        samples = [s for s in families[f"conveyor:{name}"].samples if s.name.endswith("_bucket")]
        bounds = [float(s.labels["le"]) for s in samples if s.labels.get("worker", "w1") == "w1"]
        assert bounds == [*buckets, float("inf")], name


def test_a_workers_steps_are_counted_in_vllms_step_buckets(metrics):
    text = metrics.render().decode()
    w1 = 'worker="w1"'
    assert [
        metric_value(text, "conveyor:iteration_tokens_total_bucket", f'{w1},le="{le}"')
        for le in ("1.0", "8.0", "16.0", "64.0", "+Inf")
    ] == [1, 2, 2, 3, 3]
    assert metric_value(text, "conveyor:iteration_tokens_total_sum", w1) == 46
    assert metric_value(text, "conveyor:iteration_tokens_total_count", 'worker="w2"') == 0, "no step yet"


def test_a_requests_times_become_vllms_intervals(metrics):
    """Arrival at 100; scheduled 0.25 s later; tokens come at 101 (first), 101.5 (two, a
    speculative step) and 102; it finishes at 102.1."""
    times = RequestTimes(arrival=100.0)
    metrics.on_output(times, 1, 0.25, 101.0)
    metrics.on_output(times, 2, None, 101.5)
    metrics.on_output(times, 1, None, 102.0)
    metrics.on_finished(
        times, FinishReason.LENGTH, 102.1, num_prompt_tokens=7, num_generation_tokens=4, max_tokens=4
    )
    text = metrics.render().decode()

    def observed(name: str) -> tuple[float, float]:
        return (
            metric_value(text, f"conveyor:{name}_count"),
            round(metric_value(text, f"conveyor:{name}_sum"), 6),
        )

    assert observed("time_to_first_token_seconds") == (1, 1.0)
    assert observed("inter_token_latency_seconds") == (2, 1.0), "one interval per output, as vLLM"
    assert observed("time_per_output_token_seconds") == (2, 1.0)
    assert observed("request_queue_time_seconds") == (1, 0.25)
    assert observed("request_prefill_time_seconds") == (1, 0.75), "time to first token less the queue"
    assert observed("request_decode_time_seconds") == (1, 1.0)
    assert observed("request_inference_time_seconds") == (1, 1.75)
    assert observed("request_time_per_output_token_seconds") == (1, round(1.0 / 3, 6))
    assert observed("e2e_request_latency_seconds") == (1, 2.1)
    assert observed("request_prompt_tokens") == (1, 7) and observed("request_generation_tokens") == (1, 4)
    assert observed("request_params_max_tokens") == (1, 4)
    assert metric_value(text, "conveyor:request_success_total", 'finished_reason="length"') == 1


def test_a_request_without_a_token_is_counted_but_not_timed(metrics):
    metrics.on_finished(
        RequestTimes(arrival=10.0),
        FinishReason.ERROR,
        12.0,
        num_prompt_tokens=3,
        num_generation_tokens=0,
        max_tokens=16,
    )
    metrics.abandoned()
    text = metrics.render().decode()
    assert metric_value(text, "conveyor:e2e_request_latency_seconds_count") == 1
    assert metric_value(text, "conveyor:request_prefill_time_seconds_count") == 0
    assert metric_value(text, "conveyor:request_success_total", 'finished_reason="error"') == 1
    assert metric_value(text, "conveyor:request_success_total", 'finished_reason="abort"') == 1


def test_a_prompts_n_and_its_longest_choice_are_observed_once_it_finishes(metrics, served_model):
    """Two choices of one prompt, as the scheduler would answer them."""
    plan = completion_plan(
        CompletionRequest.model_validate({"prompt": "hello", "n": 2, "max_tokens": 3}), served_model
    )
    engine = _Engine()
    gen = Generation(plan, served_model, engine, metrics)
    first, second = (c.request_id for c in plan.choices)
    usage = Usage(len(plan.prompt_token_ids), 3)

    async def run() -> None:
        await gen.start()
        for out in [
            RequestOutput(first, [5], queue_time_s=0.01),
            RequestOutput(second, [6], queue_time_s=0.02),
            RequestOutput(first, [7, 8], index=1, finish_reason=FinishReason.LENGTH, usage=usage),
            RequestOutput(
                second, [9], index=1, finish_reason=FinishReason.STOP, stop_token_id=9, usage=usage
            ),
        ]:
            engine.queue.put_nowait(out)
        async for _ in gen.deltas():
            pass

    asyncio.run(asyncio.wait_for(run(), 10))
    text = metrics.render().decode()
    assert metric_value(text, "conveyor:request_params_n_count") == 1
    assert metric_value(text, "conveyor:request_params_n_sum") == 2
    assert metric_value(text, "conveyor:request_max_num_generation_tokens_sum") == 3
    assert metric_value(text, "conveyor:request_generation_tokens_sum") == 5
    assert metric_value(text, "conveyor:time_to_first_token_seconds_count") == 2
    assert metric_value(text, "conveyor:request_queue_time_seconds_count") == 2
    assert metric_value(text, "conveyor:request_success_total", 'finished_reason="stop"') == 1


class _Engine:
    """The scheduler's side of EngineClient, as far as a Generation uses it: the test answers."""

    reply_to = "tcp://test"

    def register(self, ids: list[str], queue: asyncio.Queue) -> None:
        self.queue = queue

    async def submit(self, requests: list) -> None:
        pass

    def unregister(self, ids: list[str]) -> None:
        pass
